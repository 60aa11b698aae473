"""From completions to numbers: score prediction files and summarise accuracy honestly.

`gazal score` runs any system's generations through the same extractor and metrics Gazal uses
for its own, so numbers from elsewhere are comparable.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean, stdev

from gazal.answer import STATUSES, YES_NO_MAYBE
from gazal.data import check_options, read_jsonl, require_str
from gazal.errors import GazalError
from gazal.tasks import score


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def interval(item_acc: list[float], single: bool) -> tuple[float, float]:
    """95% interval of a mean accuracy over items: Wilson with one sample per item (each item 0 or
    1), else the normal approximation over per-item means."""
    n = len(item_acc)
    if single:
        return wilson_interval(round(sum(item_acc)), n)
    centre = mean(item_acc) if n else 0.0
    half = 1.96 * stdev(item_acc) / math.sqrt(n) if n > 1 else 0.0
    return (max(0.0, centre - half), min(1.0, centre + half))


def metrics(rows: list[dict]) -> dict:
    """Accuracy with a 95% CI, per category, extractor status rates, lengths and truncation.

    With several samples per item, accuracy is the mean over samples and the interval is over
    per-item means (normal approximation); with one sample it is a Wilson interval.
    """
    per_item: dict[str, list[bool]] = defaultdict(list)
    category: dict[str, str | None] = {}
    for r in rows:
        per_item[r["id"]].append(bool(r["correct"]))
        category[r["id"]] = r.get("category")
    n = len(per_item)
    item_acc = [sum(v) / len(v) for v in per_item.values()]
    accuracy = mean(item_acc) if n else 0.0
    single = all(len(v) == 1 for v in per_item.values())
    by_cat: dict[str, list[float]] = defaultdict(list)
    for item_id, acc in zip(per_item, item_acc):
        if category[item_id]:
            by_cat[category[item_id]].append(acc)
    statuses = Counter(r["status"] for r in rows)
    total = len(rows) or 1
    return {
        "n": n,
        "samples_per_item": (len(rows) / n) if n else 0,
        "correct": sum(bool(r["correct"]) for r in rows),
        "accuracy": accuracy,
        "ci95": list(interval(item_acc, single)),
        "per_category": {c: {"n": len(v), "accuracy": mean(v), "ci95": list(interval(v, single))}
                         for c, v in sorted(by_cat.items())},
        "status_rates": {st: statuses.get(st, 0) / total for st in STATUSES},
        "mean_completion_tokens": (sum(r.get("completion_tokens", 0) for r in rows) / total) if rows else None,
        "truncation_rate": (sum(bool(r.get("truncated")) for r in rows) / total) if rows else None,
        # The format reward's rule (one <think> block, then one clean answer), where rows record it.
        "format_rate": (sum(bool(r["well_formed"]) for r in rows) / total) if rows and all(
            "well_formed" in r for r in rows) else None,
    }


def _labels_of(row: dict, where: str) -> tuple[list[str], dict[str, str] | None]:
    if "options" in row and row["options"] is not None:
        options = check_options(row, where)
        return list(options), options
    labels = row.get("labels", list(YES_NO_MAYBE) if "labels" not in row else None)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise GazalError(f"{where}: field 'labels' must be a non-empty list of strings (or give 'options')")
    return labels, None


def score_rows(path: str | Path) -> list[dict]:
    """Score every line of a predictions file; each line gains prediction, status and correct."""
    out = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if row.get("id") is None:
            raise GazalError(f"{where}: missing field 'id'")
        completion = require_str(row, "completion", where, allow_empty=True)
        answer = require_str(row, "answer", where).strip()
        if "options" not in row and "labels" not in row:
            raise GazalError(f"{where}: needs field 'options' (letter -> text) or 'labels' (e.g. [\"yes\", \"no\", \"maybe\"])")
        labels, options = _labels_of(row, where)
        if answer.lower() not in {x.lower() for x in labels}:
            raise GazalError(f"{where}: field 'answer' is {answer!r}, not one of {', '.join(labels)}")
        extraction, correct = score(completion, answer, labels, options)
        out.append({**row, "prediction": extraction.label, "status": extraction.status, "correct": correct})
    return out


def score_file(path: str | Path, out: str | Path | None = None) -> tuple[Path, dict]:
    """Score a predictions file into `out` (default: <name>.scored.jsonl beside it); returns path and metrics.

    Every line is checked before anything is written, so a bad file leaves no partial output.
    """
    rows = score_rows(path)
    out = Path(out) if out else Path(path).with_suffix(".scored.jsonl")
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    tmp.replace(out)
    return out, metrics(rows)
