"""The reward audit's questions and honest completions: the bundled seed SFT cases with lettered
options, and their own reasoning at several lengths. Shared by the development hacks
(gazal.audit) and the red-team hacks (gazal.redteam), which are written apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gazal.answer import extract_answer
from gazal.data import read_jsonl, seed_path
from gazal.tasks import Item

_OPTION_LINE = re.compile(r"^([A-J])\. (.+)$", re.MULTILINE)
_STEP = re.compile(r"(?:^|\s)(\d)\.\s+")


@dataclass(frozen=True)
class Case:
    """A seed case as a question, with its reasoning steps and the seed's answer sentence."""

    item: Item
    steps: list[str]
    answer_text: str
    specialty: str


def seed_cases() -> list[Case]:
    """The bundled SFT cases that have lettered options and a four-step reasoning."""
    cases = []
    for _, row in read_jsonl(seed_path("seed:sft")):
        options = dict(_OPTION_LINE.findall(row["case"]))
        steps = [s.strip() for s in _STEP.split(row["reasoning"])[2::2]]
        if len(options) < 2 or len(steps) < 3:
            continue
        label = extract_answer(row["answer"], list(options), options).label
        if label is None:
            continue
        question = row["case"][: _OPTION_LINE.search(row["case"]).start()].strip()
        cases.append(Case(Item(row["id"], question, label, options, category=row["category"]), steps, row["answer"],
                          row.get("specialty", "")))
    return cases


def honest(case: Case) -> dict[str, str]:
    """The case's own reasoning at several lengths, each ending in one clean answer."""
    s, letter = case.steps, case.item.answer

    def think(steps: list[str]) -> str:
        return "<think>\n" + "\n".join(f"{i}. {x}" for i, x in enumerate(steps, 1)) + "\n</think>\n"

    return {
        "full_explained": think(s) + case.answer_text,
        "full": think(s) + f"The answer is {letter}.",
        "findings_discriminating_conclusion": think([s[0], *s[2:]]) + f"The answer is {letter}.",
        "discriminating_conclusion": think(s[2:]) + f"The answer is {letter}.",
    }
