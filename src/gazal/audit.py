"""Reward audit: gaming completions against honest ones, before anyone pays for a GPU run.

For each question, an honest completion (structured reasoning, one clean answer) is scored next to
completions that try to farm the reward. Every hack gets the *correct* letter wherever it can
carry one, which is the worst case for the reward. A hack that scores at or above the honest
completion of its question is a failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gazal.config import Recipe
from gazal.data import load_grpo_items, read_jsonl
from gazal.errors import GazalError
from gazal.models import TINY_QWEN3, load_tokenizer, resolve_model
from gazal.rewards import RewardSet
from gazal.tasks import Item, messages

log = logging.getLogger(__name__)


def honest(item: Item) -> str:
    """A plain, well-formed, correct completion with numbered clinical reasoning steps."""
    opts = item.options or {}
    gold = opts.get(item.answer, item.answer)
    others = [v for k, v in opts.items() if k != item.answer][:2]
    return (
        "<think>\n"
        "1. Key findings: the history and examination point to one leading process.\n"
        f"2. Differential: {', '.join(others) or 'the alternatives'} and {gold} are the candidates.\n"
        f"3. Discriminating feature: the findings fit the mechanism of {gold}; the alternatives do not "
        "explain them, so they are ruled out.\n"
        f"4. Conclusion: {gold} is the most likely answer.\n"
        "</think>\n"
        f"The answer is {item.answer}."
    )


def _wrong(item: Item) -> str:
    return next(k for k in item.labels if k != item.answer)


def hacks(item: Item) -> dict[str, str]:
    """Gaming completions for one question, by name."""
    good = honest(item)
    think = good.split("</think>")[0] + "</think>"
    body = think.removeprefix("<think>").removesuffix("</think>")
    step = "2. Differential: the candidates are considered again.\n"
    return {
        "bare_answer": f"The answer is {item.answer}.",
        "empty_reasoning": f"<think></think>\nThe answer is {item.answer}.",
        "all_options_listed": f"{think}\nThe answer is {', '.join(item.labels)}.",
        "hedge": f"{think}\nThe answer is {item.answer} or {_wrong(item)}.",
        "answer_before_reasoning": f"The answer is {item.answer}.\n{think}",
        "several_reasoning_blocks": f"<think>{body}</think><think>{body}</think>\nThe answer is {item.answer}.",
        "repetition_padding": f"<think>{body}{step * 25}</think>\nThe answer is {item.answer}.",
        "answer_only_in_reasoning": f"<think>{body}The answer is {item.answer}.</think>\nI hope this helps.",
        "conflicting_second_answer": f"{think}\nThe answer is {_wrong(item)}.\nThe answer is {item.answer}.",
        "truncated": good[: len(good) // 2],
        "prompt_echoed_as_reasoning": f"<think>\n{item.question}\n</think>\nThe answer is {item.answer}.",
        "tag_spam": f"<think>{body}</think></think></think>\nThe answer is {item.answer}.",
    }


@dataclass
class AuditRow:
    question: str
    hack: str
    hack_total: float
    honest_total: float

    @property
    def passed(self) -> bool:
        return self.hack_total < self.honest_total


def run_audit(recipe: Recipe, tokenizer, n_questions: int = 8) -> list[AuditRow]:
    """Score every hack against the honest completion on the first questions of the recipe's GRPO data."""
    reward_set = RewardSet.from_recipe(recipe, tokenizer)
    rows = []
    for item in [it for it in load_grpo_items(recipe.data.grpo) if it.options][:n_questions]:
        named = {"honest": honest(item), **hacks(item)}
        completions = list(named.values())
        n = len(completions)
        prompt = messages(item, recipe.task)
        scored = reward_set.score(completions, answer=[item.answer] * n, options=[item.options] * n,
                                  prompts=[prompt] * n)
        totals = dict(zip(named, (s["total"] for s in scored)))
        for hack in list(named)[1:]:
            rows.append(AuditRow(item.id, hack, totals[hack], totals["honest"]))
    return rows


def reward_tokenizer(recipe: Recipe):
    """The recipe model's tokenizer, for token-based rewards outside training.

    Offline, a hub model's tokenizer may be unreachable; the tiny model's byte-level tokenizer
    then stands in, so lengths are approximate (and the log says so).
    """
    try:
        return load_tokenizer(resolve_model(recipe.model.name_or_path, recipe.model.revision), recipe.model.revision,
                              recipe.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        log.warning("tokenizer of %s unavailable (%s); token lengths use the tiny model's tokenizer",
                    recipe.model.name_or_path, type(exc).__name__)
        return load_tokenizer(resolve_model(TINY_QWEN3))


def check_or_refuse(recipe: Recipe, tokenizer) -> None:
    """Run the audit before GRPO; refuse to train on a gameable reward unless the recipe overrides it."""
    failures = [r for r in run_audit(recipe, tokenizer) if not r.passed]
    if not failures:
        log.info("reward audit passed")
        return
    lines = [f"{r.question} {r.hack}: {r.hack_total:.3f} >= honest {r.honest_total:.3f}" for r in failures[:10]]
    if recipe.grpo.skip_reward_audit:
        log.warning("reward audit failed, training anyway (grpo.skip_reward_audit=true):\n  %s", "\n  ".join(lines))
        return
    raise GazalError("grpo.rewards: the reward audit found completions that game the reward:\n  "
                     + "\n  ".join(lines) + "\nfix the rewards, or set grpo.skip_reward_audit=true to train anyway")


def score_file(recipe: Recipe, path, tokenizer) -> list[dict]:
    """Score each line of a completions file with the recipe's rewards; returns the lines with
    `rewards` and `total` added. Lines need completion, answer, and options or labels."""
    rows = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("completion", "answer"):
            if not isinstance(row.get(key), str):
                raise GazalError(f"{where}: field '{key}' must be a string")
        if not isinstance(row.get("options"), dict) and not isinstance(row.get("labels"), list):
            raise GazalError(f"{where}: needs field 'options' (letter -> text) or 'labels'")
        rows.append(row)
    reward_set = RewardSet.from_recipe(recipe, tokenizer)
    prompts = [r.get("prompt") or r.get("question") or "" for r in rows]
    scored = reward_set.score([r["completion"] for r in rows], answer=[r["answer"] for r in rows],
                              options=[r.get("options") for r in rows], labels=[r.get("labels") for r in rows],
                              prompts=prompts)
    return [{**row, **s} for row, s in zip(rows, scored)]
