"""MedQA, MMLU-Pro (medical) and PubMedQA: from local JSONL or the hub, checked item by item.

Local files use the shape of ../shared/benchmarks (id, question, options, answer[, context,
category]); hub rows are mapped into the same shape and go through the same checks.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

from gazal.answer import YES_NO_MAYBE
from gazal.data import mcq_item, read_jsonl, require_str
from gazal.errors import GazalError
from gazal.tasks import Item

log = logging.getLogger(__name__)

LOCAL_FILES = {
    "medqa": "medqa_test.jsonl",
    "mmlu_pro": "mmlu_pro_medical_test.jsonl",
    "pubmedqa": "pubmedqa_test.jsonl",
    "medmcqa": "medmcqa_dev.jsonl",
}
MMLU_PRO_SIZES = {"health": 818, "biology": 717, "psychology": 798}
OFFICIAL_SIZES = {"medqa": 1273, "pubmedqa": 500, "medmcqa": 4183}
# Gazal-R1's reported accuracy (%), shown beside every result.
PAPER = {"medqa": 87.1, "mmlu_pro": 81.6, "pubmedqa": 79.6}
TITLES = {"medqa": "MedQA (USMLE, 4 options, test)", "mmlu_pro": "MMLU-Pro medical", "pubmedqa": "PubMedQA (PQA-L test)",
          "medmcqa": "MedMCQA (dev)"}
# Hub sources: (repo, config, split, revision). MedQA is pinned to a commit; MMLU-Pro and
# PubMedQA name a branch until a commit matching the shared copies is verified (see README).
HUB = {
    "medqa": ("GBaker/MedQA-USMLE-4-options", None, "test", "0fb93dd23a7339b6dcd27e241cb9b5eca62d4d18"),
    "mmlu_pro": ("TIGER-Lab/MMLU-Pro", None, "test", "main"),
    "pubmedqa": ("bigbio/pubmedqa", "pubmedqa_source", "test", "refs/convert/parquet"),
    "medmcqa": ("openlifescienceai/medmcqa", None, "validation", "main"),
}


# How to do without the hub, for the offline error (gazal.hub).
BENCHMARK_ALTERNATIVE = ("set eval.benchmarks_dir=/path/to/benchmarks or $GAZAL_BENCHMARKS_DIR to a folder "
                         "holding {file}")


class BenchmarkUnavailable(Exception):
    """Neither a local copy nor the hub could provide the benchmark."""


def describe(name: str, categories: list[str]) -> str:
    """What the benchmark is, printed with every result."""
    if name == "mmlu_pro":
        return f"MMLU-Pro test, categories: {', '.join(categories)}"
    return TITLES[name]


def benchmarks_dir(configured: str | None) -> Path | None:
    """The recipe's directory, else $GAZAL_BENCHMARKS_DIR, else None (use the hub)."""
    value = configured or os.environ.get("GAZAL_BENCHMARKS_DIR")
    return Path(value).expanduser() if value else None


def _item(name: str, row: dict, where: str) -> Item:
    if name == "pubmedqa":
        question = require_str(row, "question", where)
        context = require_str(row, "context", where)
        answer = require_str(row, "answer", where).strip().lower()
        if answer not in YES_NO_MAYBE:
            raise GazalError(f"{where}: field 'answer' is {answer!r}, not one of yes, no, maybe")
        return Item(id=str(row.get("id", where)), question=question, answer=answer, context=context)
    item = mcq_item(row, where)
    # Per-category breakdowns: MedQA step 1 vs steps 2&3, MMLU-Pro category, MedMCQA subject.
    category = {"medqa": row.get("meta_info"), "medmcqa": row.get("subject")}.get(name, row.get("category"))
    return Item(id=str(row.get("id", where)), question=item.question, answer=item.answer, options=item.options,
                category=category)


def _hub_rows(name: str) -> list[dict]:
    from gazal import hub

    repo, config, split, revision = HUB[name]
    try:
        ds = hub.load_dataset(repo, config, split, revision, None, BENCHMARK_ALTERNATIVE.format(file=LOCAL_FILES[name]))
    except hub.HubUnavailable as exc:
        raise BenchmarkUnavailable(f"{name}: no local copy, and {exc}") from None
    except Exception as exc:  # missing repo, auth: all mean unavailable
        raise BenchmarkUnavailable(f"{name}: no local copy and the hub is unreachable ({type(exc).__name__})") from None
    rows = []
    for i, r in enumerate(ds):
        if name == "medqa":
            rows.append({"id": f"medqa_us_test_{i:04d}", "question": r["question"], "options": r["options"],
                         "answer": r["answer_idx"], "meta_info": r.get("meta_info")})
        elif name == "mmlu_pro":
            letters = [chr(ord("A") + j) for j in range(len(r["options"]))]
            rows.append({"id": f"mmlu_pro_{r['question_id']}", "question": r["question"],
                         "options": dict(zip(letters, r["options"])), "answer": r["answer"], "category": r["category"]})
        elif name == "medmcqa":
            rows.append({"id": r["id"], "question": r["question"],
                         "options": {"A": r["opa"], "B": r["opb"], "C": r["opc"], "D": r["opd"]},
                         "answer": "ABCD"[int(r["cop"])], "subject": r.get("subject_name")})
        else:
            rows.append({"id": str(r["pubid"]), "question": r["QUESTION"], "context": "\n".join(r["CONTEXTS"]),
                         "answer": r["final_decision"]})
    return rows


def _largest_remainder(sizes: dict, total: int) -> dict:
    """`total` split over groups in proportion to `sizes`, each share within one of its exact quota
    (Hamilton's method: floors first, then the largest remainders; ties broken by group order)."""
    whole = sum(sizes.values())
    quota = {k: total * v / whole for k, v in sizes.items()}
    out = {k: int(q) for k, q in quota.items()}
    for k in sorted(quota, key=lambda k: out[k] - quota[k])[: total - sum(out.values())]:
        out[k] += 1
    return out


def select(items: list[Item], limit: int | None, strategy: str = "stratified", seed: int = 0) -> list[Item]:
    """`limit` items of a benchmark, in file order: the first ones, or a seeded sample stratified by
    gold label and then by category.

    The label split is exact to within one item of the full set's proportions (labels first, then
    categories within each label), so a limited PubMedQA run keeps its yes/no/maybe mix and a limited
    MedQA run its answer-letter mix. The same seed gives the same items whatever else changes."""
    if not limit or limit >= len(items):
        return list(items)
    if strategy == "first":
        return items[:limit]
    by_label: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_label.setdefault(it.answer, []).append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for label, n in _largest_remainder({k: len(v) for k, v in sorted(by_label.items())}, limit).items():
        by_cat: dict[str, list[int]] = {}
        for i in by_label[label]:
            by_cat.setdefault(items[i].category or "", []).append(i)
        for cat, m in _largest_remainder({k: len(v) for k, v in sorted(by_cat.items())}, n).items():
            chosen += rng.sample(by_cat[cat], m)
    return [items[i] for i in sorted(chosen)]


def load_benchmark(name: str, directory: Path | None, categories: list[str] | None = None,
                   limit: int | None = None) -> list[Item]:
    """All items of a benchmark (MMLU-Pro filtered to `categories`), checked against official sizes;
    with `limit`, the first `limit` of them (see `select` for a stratified sample)."""
    categories = categories or ["health"]
    if directory is not None:
        path = directory / LOCAL_FILES[name]
        if not path.is_file():
            raise BenchmarkUnavailable(f"{name}: {path} not found")
        rows = [(f"{path}:{lineno}", row) for lineno, row in read_jsonl(path)]
        source = str(path)
    else:
        rows = [(f"{HUB[name][0]}[{i}]", row) for i, row in enumerate(_hub_rows(name))]
        source = HUB[name][0]
    items = [_item(name, row, where) for where, row in rows]
    if name == "mmlu_pro":
        unknown = [c for c in categories if c not in MMLU_PRO_SIZES]
        if unknown:
            raise GazalError(f"eval.mmlu_pro_categories: unknown categories {unknown} (known: {', '.join(MMLU_PRO_SIZES)})")
        items = [it for it in items if it.category in categories]
        expected = sum(MMLU_PRO_SIZES[c] for c in categories)
    else:
        expected = OFFICIAL_SIZES[name]
    if len(items) != expected:
        raise GazalError(f"{source}: {name} has {len(items)} items, the official test set has {expected}")
    log.info("%s: %d items from %s", name, len(items), source)
    return items[:limit] if limit else items
