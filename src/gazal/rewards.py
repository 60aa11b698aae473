"""GRPO reward components, in TRL's contract: fn(completions, **dataset_columns) -> list[float | None].

Each component is a factory taking its recipe parameters and returning a small pure function;
REWARDS maps recipe names to factories (open-r1 style). A dotted 'package.module:function' path
admits a user's own factory.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gazal.answer import YES_NO_MAYBE
from gazal.errors import GazalError
from gazal.tasks import score

RewardFn = Callable[..., list[float | None]]


def completion_text(completion: Any) -> str:
    """TRL passes plain strings for text prompts and [{'role': 'assistant', 'content': ...}] for chat."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role", "assistant") == "assistant")


def _labels_for(options: Mapping[str, str | None] | None, labels: Sequence[str] | None) -> tuple[list[str], dict | None]:
    # Arrow stores a column of option dicts as one struct with every letter seen in the column;
    # letters a row does not have come back as None and are dropped here.
    opts = {k: v for k, v in (options or {}).items() if v is not None} or None
    if opts:
        return list(opts), opts
    return list(labels or YES_NO_MAYBE), None


def accuracy() -> RewardFn:
    """1.0 for the gold answer, 0.0 otherwise (hedges and non-options are wrong).

    A row without a usable gold answer returns None, so TRL skips it instead of paying for it.
    """

    def accuracy_reward(completions: list, answer: list[str | None], options: list | None = None,
                        labels: list | None = None, **_: Any) -> list[float | None]:
        out: list[float | None] = []
        for i, completion in enumerate(completions):
            lab, opts = _labels_for(options[i] if options else None, labels[i] if labels else None)
            gold = answer[i]
            if not isinstance(gold, str) or gold.strip().lower() not in {x.lower() for x in lab}:
                out.append(None)
                continue
            _, correct = score(completion_text(completion), gold.strip(), lab, opts)
            out.append(1.0 if correct else 0.0)
        return out

    return accuracy_reward


_FORMAT = re.compile(r"^\s*<think>(?P<think>(?:(?!<think>|</think>).)+?)</think>(?P<after>.*)$", re.DOTALL)


def format_() -> RewardFn:
    """1.0 for one non-empty <think> block first, closed, followed by a non-empty answer; else 0.0."""

    def format_reward(completions: list, **_: Any) -> list[float]:
        out = []
        for completion in completions:
            text = completion_text(completion)
            m = _FORMAT.match(text)
            ok = bool(m and m.group("think").strip() and m.group("after").strip() and "<think>" not in m.group("after")
                      and "</think>" not in m.group("after"))
            out.append(1.0 if ok else 0.0)
        return out

    return format_reward


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "accuracy": accuracy,
    "format": format_,
}


def resolve_reward(name: str, params: Mapping[str, Any] | None = None) -> RewardFn:
    """Build a reward function from a registered name or 'package.module:function'."""
    params = dict(params or {})
    if name in REWARDS:
        factory = REWARDS[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise GazalError(f"cannot import reward {name!r} ({exc})") from None
    else:
        raise GazalError(f"unknown reward {name!r} (known: {', '.join(REWARDS)}; or 'package.module:function')")
    fn = factory(**params)
    fn.__name__ = name.split(":")[-1]  # TRL logs rewards/<__name__>/mean
    return fn

