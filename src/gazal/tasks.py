"""A question, how it is put to the model, and how its answer is scored.

GRPO rollouts and evaluation both build prompts with `messages()` and score with `score()`, so the
training signal and the benchmark number cannot drift apart.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from gazal.answer import YES_NO_MAYBE, Extraction, extract_answer, is_correct


@dataclass(frozen=True)
class Item:
    """One question with its gold label. `options` is None for yes/no/maybe questions."""

    id: str
    question: str
    answer: str
    options: dict[str, str] | None = None
    context: str | None = None
    category: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.options) if self.options else list(YES_NO_MAYBE)

    def to_dict(self) -> dict:
        return asdict(self)


class TaskSettings(BaseModel):
    """How questions are put to the model; shared by GRPO and evaluation so they cannot drift.

    The recipe's `task` section, defined here beside the code that uses it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    system_prompt: str | None = None
    """System message placed before every question (None: the chat template's default)."""
    mcq_instruction: str = (
        "Think through the problem step by step inside <think> and </think>. "
        "Then give the final answer on its own line as 'The answer is' followed by the option letter."
    )
    """Instruction appended after a multiple-choice question and its lettered options."""
    yesno_instruction: str = (
        "Think through the problem step by step inside <think> and </think>. "
        "Then give the final answer on its own line as 'The answer is' followed by yes, no or maybe."
    )
    """Instruction appended after a yes/no/maybe question (PubMedQA)."""


def user_text(item: Item, task: TaskSettings) -> str:
    """The question as the user turn: context, question, lettered options, instruction."""
    parts = []
    if item.context:
        parts.append(f"Context: {item.context}")
    parts.append(f"Question: {item.question}" if item.context else item.question)
    if item.options:
        parts.append("\n".join(f"{k}. {v}" for k, v in item.options.items()))
        parts.append(task.mcq_instruction)
    else:
        parts.append(task.yesno_instruction)
    return "\n\n".join(parts)


def messages(item: Item, task: TaskSettings) -> list[dict[str, str]]:
    """Chat messages for one item (system prompt only when the recipe sets one)."""
    msgs = []
    if task.system_prompt:
        msgs.append({"role": "system", "content": task.system_prompt})
    msgs.append({"role": "user", "content": user_text(item, task)})
    return msgs


def score(completion: str, answer: str, labels: Sequence[str], options: Mapping[str, str] | None) -> tuple[Extraction, bool]:
    """Extract the answer of one completion and judge it against the gold label."""
    extraction = extract_answer(completion, labels, options)
    return extraction, is_correct(extraction, answer)


def completion_text(completion: Any) -> str:
    """TRL passes plain strings for text prompts and [{'role': 'assistant', 'content': ...}] for chat."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role", "assistant") == "assistant")


def prompt_text(prompt: Any) -> str:
    """The user-visible text of a prompt (string or chat messages)."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m.get("role") != "assistant")


# Tags a completion must be able to spell. Some tokenizers make them special tokens, which
# `skip_special_tokens=True` (TRL's decoding) would drop while evaluation read them.
REASONING_TAGS = ("<think>", "</think>")


@functools.lru_cache(maxsize=8)
def _dropped_ids(tokenizer: Any) -> frozenset[int]:
    vocab = tokenizer.get_vocab()
    keep = {vocab[t] for t in REASONING_TAGS if t in vocab}
    return frozenset(set(tokenizer.all_special_ids) - keep)


def decode_completion(tokenizer: Any, ids: Sequence[int]) -> str:
    """The one decode rule for completions, used by evaluation (both backends) and by the GRPO
    rewards: special tokens (end of turn, padding, end of text) are dropped, except those that spell
    the reasoning tags, so the reward reads the same text that evaluation scores."""
    dropped = _dropped_ids(tokenizer)
    return tokenizer.decode([i for i in ids if i not in dropped], skip_special_tokens=False)


def direct_task(task: TaskSettings, instruction: str) -> TaskSettings:
    """The task with its reasoning instruction replaced by a direct-answer one ({what}: what to give)."""
    return task.model_copy(update={"mcq_instruction": instruction.format(what="option letter"),
                                   "yesno_instruction": instruction.format(what="yes, no or maybe")})
