"""GRPO reward components, in TRL's contract: fn(completions, **dataset_columns) -> list[float | None].

Each component is a factory taking its recipe parameters and returning a small pure function;
REWARDS maps recipe names to factories (open-r1 style); a dotted 'package.module:function' path
admits a user's own factory. Factories may also declare `tokenizer` or `max_completion_length`
keyword arguments, which Gazal fills in from the recipe.

Anti-hacking rules (see issue 4 and the audit in gazal.audit):
- accuracy uses the shared extractor: hedges and non-options are wrong, a bad gold label is None;
- length and quality rewards pay only well-formed completions (one non-empty <think> block first,
  then exactly one clean answer statement, nothing substantive after it); everything else gets the
  *floor* of the component's range, so dropping the format can never dodge a penalty;
- lengths are in tokens, and every component's output is clipped to its documented range.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gazal.answer import HEDGE, NO_ANSWER, OK, YES_NO_MAYBE, answer_statements
from gazal.errors import GazalError
from gazal.tasks import completion_text, prompt_text, score

RewardFn = Callable[..., list[float | None]]


def _choices(options: Mapping[str, str | None] | None, labels: Sequence[str] | None) -> tuple[list[str], dict | None]:
    # Arrow stores a column of option dicts as one struct with every letter seen in the column;
    # letters a row does not have come back as None and are dropped here.
    opts = {k: v for k, v in (options or {}).items() if v is not None} or None
    if opts:
        return list(opts), opts
    return list(labels or YES_NO_MAYBE), None


def _row(i: int, options: list | None, labels: list | None) -> tuple[list[str], dict | None]:
    return _choices(options[i] if options else None, labels[i] if labels else None)


def _gold(answer: Any, labels: Sequence[str]) -> str | None:
    if not isinstance(answer, str) or answer.strip().lower() not in {x.lower() for x in labels}:
        return None
    return answer.strip()


# One reasoning block, first, non-empty, closed; no reasoning tag after it.
_FORMAT = re.compile(r"^\s*<think>(?P<think>(?:(?!<think>|</think>).)+?)</think>(?P<after>.*)$", re.DOTALL)


@dataclass(frozen=True)
class Parsed:
    """A completion judged for form: its reasoning, its answer part, and whether it is well-formed."""

    think: str
    after: str
    well_formed: bool
    reason: str


def parse(text: str, labels: Sequence[str], options: Mapping[str, str] | None, max_trailing_chars: int = 200) -> Parsed:
    """Check the Gazal answer format: <think>reasoning</think> then one clean final answer statement."""
    m = _FORMAT.match(text)
    if not m or not m.group("think").strip():
        return Parsed("", "", False, "no single non-empty reasoning block first")
    think, after = m.group("think"), m.group("after")
    if "<think>" in after or "</think>" in after:
        return Parsed(think, after, False, "reasoning tags after the reasoning block")
    statements = answer_statements(after, labels, options)
    if not statements:
        return Parsed(think, after, False, "no answer statement after the reasoning")
    if any(s.extraction.status != OK for s in statements):
        return Parsed(think, after, False, "an answer statement is a hedge, not an option, or empty")
    if len({s.extraction.label for s in statements}) > 1:
        return Parsed(think, after, False, "conflicting answer statements")
    if len(after[statements[-1].end:].strip()) > max_trailing_chars:
        return Parsed(think, after, False, "substantive text after the final answer")
    return Parsed(think, after, True, "ok")


def earns_quality(text: str, labels: Sequence[str], options: Mapping[str, str] | None, prompt: Any = None) -> bool:
    """Whether length and quality rewards may pay this completion: well-formed, and its reasoning is
    not the prompt copied back (an echo is short, tidy and says nothing, which a length reward loves)."""
    parsed = parse(text, labels, options)
    return parsed.well_formed and not echoes_prompt(parsed.think, prompt_text(prompt))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def echoes_prompt(think: str, prompt: str, threshold: float = 0.6) -> bool:
    """True when most of the reasoning's word trigrams are copied from the prompt."""
    grams = _ngrams(_words(think), 3)
    if not grams:
        return False
    source = set(_ngrams(_words(prompt), 3))
    return sum(g in source for g in grams) / len(grams) >= threshold


def _lengths(completions: list, completion_ids: list | None, tokenizer) -> list[int]:
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    if tokenizer is None:
        raise GazalError("this reward measures tokens: pass completion_ids or build it with a tokenizer")
    return [len(tokenizer(completion_text(c), add_special_tokens=False)["input_ids"]) for c in completions]


# ---------------------------------------------------------------------------------------------
# Components


def accuracy() -> RewardFn:
    """1.0 for the gold answer, 0.0 otherwise (hedges and non-options are wrong); None for a bad gold label."""

    def accuracy_reward(completions: list, answer: list, options: list | None = None, labels: list | None = None,
                        log_metric: Callable | None = None, **_: Any) -> list[float | None]:
        out: list[float | None] = []
        statuses = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            gold = _gold(answer[i], lab)
            extraction, correct = score(completion_text(completion), gold or "", lab, opts)
            statuses.append(extraction.status)
            out.append(None if gold is None else float(correct))
        if log_metric and statuses:
            log_metric("gazal/hedge_rate", statuses.count(HEDGE) / len(statuses))
            log_metric("gazal/no_answer_rate", statuses.count(NO_ANSWER) / len(statuses))
        return out

    return accuracy_reward


def format_(max_trailing_chars: int = 200) -> RewardFn:
    """1.0 for one non-empty <think> block first, then exactly one clean answer statement and nothing
    substantive after it (at most `max_trailing_chars`); else 0.0."""

    def format_reward(completions: list, options: list | None = None, labels: list | None = None,
                      log_metric: Callable | None = None, **_: Any) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            out.append(1.0 if parse(completion_text(completion), lab, opts, max_trailing_chars).well_formed else 0.0)
        if log_metric and out:
            log_metric("gazal/format_failure_rate", out.count(0.0) / len(out))
        return out

    return format_reward


def cosine_length(min_value_wrong: float = -0.5, max_value_wrong: float = 0.0, min_value_correct: float = 0.5,
                  max_value_correct: float = 1.0, max_len: int = 1024, tokenizer=None) -> RewardFn:
    """Cosine length scaling in tokens (Yeo et al. 2025): for a correct answer the reward falls from
    max_value_correct (0 tokens) to min_value_correct (max_len); for a wrong one it rises from
    min_value_wrong to max_value_wrong. Ill-formed completions, and reasoning that echoes the prompt,
    get the floor of the whole range."""
    if max_len <= 0:
        raise ValueError("max_len must be positive")
    floor = min(min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)

    def cosine(t: int, start: float, end: float) -> float:
        progress = min(max(t, 0), max_len) / max_len
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))

    def cosine_length_reward(completions: list, answer: list, options: list | None = None, labels: list | None = None,
                             completion_ids: list | None = None, prompts: list | None = None,
                             **_: Any) -> list[float | None]:
        lengths = _lengths(completions, completion_ids, tokenizer)
        out: list[float | None] = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            gold = _gold(answer[i], lab)
            text = completion_text(completion)
            if gold is None:
                out.append(None)
            elif not earns_quality(text, lab, opts, prompts[i] if prompts else None):
                out.append(floor)
            elif score(text, gold, lab, opts)[1]:
                out.append(cosine(lengths[i], max_value_correct, min_value_correct))
            else:
                out.append(cosine(lengths[i], min_value_wrong, max_value_wrong))
        return out

    return cosine_length_reward


def repetition(ngram_size: int = 3, max_penalty: float = -1.0) -> RewardFn:
    """Penalty in [max_penalty, 0] for repeated word n-grams: max_penalty * (1 - unique / total).
    Ill-formed completions, and reasoning that echoes the prompt, get max_penalty."""
    if max_penalty > 0 or ngram_size < 1:
        raise ValueError("max_penalty must be <= 0 and ngram_size >= 1")

    def repetition_reward(completions: list, options: list | None = None, labels: list | None = None,
                          prompts: list | None = None, **_: Any) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            text = completion_text(completion)
            if not earns_quality(text, lab, opts, prompts[i] if prompts else None):
                out.append(max_penalty)
                continue
            grams = _ngrams(_words(text), ngram_size)
            out.append(0.0 if not grams else max_penalty * (1.0 - len(set(grams)) / len(grams)))
        return out

    return repetition_reward


_CLINICAL_CUES = (
    "finding", "history", "exam", "differential", "diagnos", "most likely", "rule out", "risk", "probability",
    "mechanism", "pathophysiolog", "management", "treatment", "contraindicat", "comorbid", "prognos",
    "evidence", "next step", "first-line", "therefore", "because",
)


def clinical_structure(target_steps: int = 3, target_cues: int = 4, echo_threshold: float = 0.6) -> RewardFn:
    """Score in [0, 1] for structured clinical reasoning: half for numbered steps (up to target_steps),
    half for distinct clinical-reasoning cues (up to target_cues). Zero for ill-formed completions and
    for reasoning that mostly echoes the prompt."""
    if target_steps < 1 or target_cues < 1:
        raise ValueError("target_steps and target_cues must be >= 1")

    def clinical_structure_reward(completions: list, prompts: list | None = None, options: list | None = None,
                                  labels: list | None = None, **_: Any) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            parsed = parse(completion_text(completion), lab, opts)
            prompt = prompt_text(prompts[i]) if prompts else ""
            if not parsed.well_formed or echoes_prompt(parsed.think, prompt, echo_threshold):
                out.append(0.0)
                continue
            steps = len(set(re.findall(r"(?m)^\s*(\d{1,2})[.)]\s+\S", parsed.think))
                        | set(re.findall(r"(?<![\d.])(\d{1,2})\.\s+[A-Z]", parsed.think)))
            lowered = parsed.think.lower()
            cues = sum(cue in lowered for cue in _CLINICAL_CUES)
            out.append(0.5 * min(1.0, steps / target_steps) + 0.5 * min(1.0, cues / target_cues))
        return out

    return clinical_structure_reward


def overlong(cache: int = 64, max_completion_length: int = 256, tokenizer=None) -> RewardFn:
    """DAPO soft overlong punishment in [-1, 0]: 0 up to max_completion_length - cache tokens, then a
    linear ramp to -1 at the limit (and -1 beyond)."""
    if cache <= 0 or cache >= max_completion_length:
        raise ValueError("cache must be positive and below max_completion_length")

    def overlong_reward(completions: list, completion_ids: list | None = None, **_: Any) -> list[float]:
        out = []
        for length in _lengths(completions, completion_ids, tokenizer):
            start = max_completion_length - cache
            out.append(0.0 if length <= start else max(-1.0, (start - length) / cache))
        return out

    return overlong_reward


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "accuracy": accuracy,
    "format": format_,
    "cosine_length": cosine_length,
    "repetition": repetition,
    "clinical_structure": clinical_structure,
    "overlong": overlong,
}


def resolve_reward(name: str, params: Mapping[str, Any] | None = None, tokenizer=None,
                   max_completion_length: int | None = None) -> RewardFn:
    """Build a reward function from a registered name or 'package.module:function'.

    `tokenizer` and `max_completion_length` are passed to factories that declare them (unless the
    recipe sets them), so token-based rewards measure what the trainer generates.
    """
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
    accepted = inspect.signature(factory).parameters
    if "tokenizer" in accepted and "tokenizer" not in params:
        params["tokenizer"] = tokenizer
    if "max_completion_length" in accepted and "max_completion_length" not in params and max_completion_length:
        params["max_completion_length"] = max_completion_length
    fn = factory(**params)
    fn.__name__ = name.split(":")[-1]  # TRL logs rewards/<__name__>/mean
    return fn


@dataclass
class RewardSet:
    """A recipe's reward components with their weights, scored the way the trainer combines them."""

    names: list[str]
    weights: list[float]
    functions: list[RewardFn]

    @classmethod
    def from_recipe(cls, recipe, tokenizer=None) -> RewardSet:
        specs = recipe.grpo.rewards
        fns = [resolve_reward(s.name, s.params, tokenizer, recipe.grpo.max_completion_length) for s in specs]
        return cls([fn.__name__ for fn in fns], [s.weight for s in specs], fns)

    def score(self, completions: list, answer: list, options: list | None = None, labels: list | None = None,
              prompts: list | None = None, completion_ids: list | None = None) -> list[dict[str, Any]]:
        """Per completion: each component's value and `total`, the weighted sum of the non-None values
        (as TRL's GRPOTrainer sums them)."""
        columns = {"answer": answer, "options": options, "labels": labels, "prompts": prompts,
                   "completion_ids": completion_ids}
        values = [fn(completions=completions, **columns) for fn in self.functions]
        rows = []
        for i in range(len(completions)):
            rewards = {name: vals[i] for name, vals in zip(self.names, values)}
            total = sum(w * v for w, v in zip(self.weights, rewards.values()) if v is not None)
            rows.append({"rewards": rewards, "total": total})
        return rows
