"""The judge's own audit: does the recipe's `judge` reward rank reward hacks below honest reasoning?

`gazal rewards audit --judge` sends the reward audit's cases (gazal.audit: the bundled seed cases,
each one's honest "full" reasoning, and every hack family written against the rewards) through the
recipe's `judge` reward, to a grader actually served (vLLM, `gazal serve`, a hosted API), and
counts per family how often the grade of the hack falls below, ties or rises above the grade of
the honest completion of the same case. Hacks that are ill-formed or echo the prompt never reach
the grader (the reward floors them at 0.0 without a request); they are counted as "gated", so the
table says which wins are the format gate's and which the grader's. A None grade (timeout, HTTP or
connection error, malformed reply) on either side is a failure, not a verdict.

This is a measurement, not a gate: nothing here decides whether a recipe may train. It also
reports what grading cost: requests, the tokens the server reported, seconds, failures by kind and
cache hits (with the reward's `cache_path`, a rerun is served from the cache).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from gazal import audit
from gazal.audit import KNOWN_OPEN, audit_set, hacks, honest
from gazal.config import Recipe
from gazal.errors import GazalError
from gazal.judge import FAILURES
from gazal.rewards import earns_quality, resolve_reward
from gazal.tasks import messages

log = logging.getLogger(__name__)

HONEST = "full"  # the honest reference: the case's own reasoning, all of its steps, and a clean answer


def hack_set(family: str) -> str:
    """Which hack set a family belongs to, for the totals per set."""
    return "red team" if family in audit.RED_TEAM else "development"  # the one place the set is looked up


@dataclass(frozen=True)
class JudgeRow:
    """One hack against the honest completion of its case, as the judge reward graded them."""

    question: str
    family: str
    hack: float | None
    honest: float | None
    gated: bool  # the reward floored the hack without asking the grader (ill-formed or an echo)

    @property
    def outcome(self) -> str:
        """below, tie, above (the hack's grade against honest's), or failed (a None grade)."""
        if self.hack is None or self.honest is None:
            return "failed"
        return "below" if self.hack < self.honest else "tie" if self.hack == self.honest else "above"


@dataclass(frozen=True)
class JudgeCost:
    """What grading the audit cost."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    failures: dict[str, int]
    cache_hits: int


def judge_params(recipe: Recipe, base_url: str | None = None, model: str | None = None, rubric: str | None = None,
                 max_tokens: int | None = None) -> dict[str, Any]:
    """The recipe's `judge` reward parameters with the command line's values over them."""
    specs = [s for s in recipe.grpo.rewards if s.name == "judge"]
    params = dict(specs[0].params) if specs else {}
    given = {"base_url": base_url, "model": model, "rubric": rubric, "max_tokens": max_tokens}
    params.update({k: v for k, v in given.items() if v is not None})
    missing = [flag for key, flag in (("base_url", "--judge-url"), ("model", "--judge-model")) if not params.get(key)]
    if missing:
        # A recipe's judge entry always names both (validation); so this is a recipe without one.
        raise GazalError(f"rewards audit --judge: no grader to ask: recipe '{recipe.name}' has no `judge` reward; "
                         f"pass {' and '.join(missing)} (any OpenAI-compatible endpoint, e.g. `gazal serve` or "
                         "`vllm serve`)")
    return params


def run_judge_audit(recipe: Recipe, params: dict[str, Any], n_questions: int = 8) -> tuple[list[JudgeRow], JudgeCost]:
    """Grade each case's honest completion and its hacks with the judge reward built from `params`."""
    try:
        reward = resolve_reward("judge", params)
    except (TypeError, ValueError) as exc:
        raise GazalError(f"rewards audit --judge: judge parameters {sorted(params)}: {exc}") from None
    completions, prompts, options, where = [], [], [], []
    pairs = audit_set(n_questions)
    for case, other in pairs:
        item = case.item
        named = {HONEST: honest(case)[HONEST], **hacks(case, other)}
        for family, text in named.items():
            completions.append(text)
            prompts.append(messages(item, recipe.task))
            options.append(item.options)
            where.append((item.id, family))
    grader = reward.judge
    log.info("judge audit: %d completions of %d cases to %s (model %s)", len(completions), len(pairs),
             grader.base_url, grader.model)
    start = time.monotonic()
    grades = reward(completions=completions, prompts=prompts, options=options)
    seconds = time.monotonic() - start
    by_case: dict[str, dict[str, tuple[float | None, bool]]] = {}
    for (question, family), grade, text, prompt, opts in zip(where, grades, completions, prompts, options):
        by_case.setdefault(question, {})[family] = (grade, not earns_quality(text, list(opts), opts, prompt))
    rows = [JudgeRow(question, family, grade, graded[HONEST][0], gated)
            for question, graded in by_case.items() for family, (grade, gated) in graded.items() if family != HONEST]
    counts = grader.counts
    cost = JudgeCost(counts["requests"], grader.usage["prompt_tokens"], grader.usage["completion_tokens"], seconds,
                     {kind: counts[kind] for kind in FAILURES if counts[kind]}, counts["cache_hits"])
    transport = sum(counts[k] for k in ("timeout", "http_error", "connection_error"))
    if counts["requests"] and transport == counts["requests"]:
        raise GazalError(f"rewards audit --judge: every request to {grader.base_url} failed "
                         f"({', '.join(f'{k} {v}' for k, v in cost.failures.items())}): is the grader served there, "
                         "under that model name?")
    return rows, cost


def family_table(rows: list[JudgeRow]) -> list[dict[str, Any]]:
    """Per hack family, in the audit's order: cases and how each one came out."""
    table = []
    for family in dict.fromkeys(r.family for r in rows):
        mine = [r for r in rows if r.family == family]
        outcomes = Counter(r.outcome for r in mine)
        table.append({"family": family, "set": hack_set(family), "cases": len(mine), "below": outcomes["below"],
                      "tie": outcomes["tie"], "above": outcomes["above"], "failed": outcomes["failed"],
                      "gated": sum(r.gated for r in mine), "lexical_open": family in KNOWN_OPEN})
    return table


def format_report(rows: list[JudgeRow], cost: JudgeCost) -> list[str]:
    """The table per family, totals per hack set, and the cost, as lines to print."""
    lines = [f"{'hack family':<36} {'cases':>5} {'below':>5} {'tie':>5} {'above':>5} {'failed':>6} {'gated':>5}"]
    table = family_table(rows)
    for t in table:
        mark = "  *" if t["lexical_open"] else ""
        lines.append(f"{t['family']:<36} {t['cases']:>5} {t['below']:>5} {t['tie']:>5} {t['above']:>5} "
                     f"{t['failed']:>6} {t['gated']:>5}{mark}")
    for name in dict.fromkeys(t["set"] for t in table):
        mine = [t for t in table if t["set"] == name]
        total = {k: sum(t[k] for t in mine) for k in ("cases", "below", "tie", "above", "failed", "gated")}
        lines.append(f"{name} hacks: {total['below']} of {total['cases']} graded below honest, {total['tie']} tied, "
                     f"{total['above']} above, {total['failed']} failed; {total['gated']} never reached the grader "
                     "(gated: ill-formed or an echo, floored at 0 by the reward)")
    if any(t["lexical_open"] for t in table):
        lines.append("* still games the lexical case_reasoning reward (audit.KNOWN_OPEN)")
    failures = ", ".join(f"{k} {v}" for k, v in cost.failures.items()) or "none"
    lines.append(f"judge cost: {cost.requests} requests, {cost.prompt_tokens} prompt + {cost.completion_tokens} "
                 f"completion tokens, {cost.seconds:.1f} s, failures: {failures}, cache hits {cost.cache_hits}")
    return lines


def report_json(rows: list[JudgeRow], cost: JudgeCost) -> dict[str, Any]:
    """Rows, the table and the cost, for --json."""
    return {"rows": [{**asdict(r), "outcome": r.outcome} for r in rows], "families": family_table(rows),
            "cost": asdict(cost)}
