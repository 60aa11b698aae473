"""PubMedQA's labelled pool (PQA-L less its 500-item test set) as SFT and GRPO data.

A recipe names it as a data source:
- `pubmedqa:train`: `pubmedqa_train.jsonl` in the benchmarks folder (eval.benchmarks_dir, else
  $GAZAL_BENCHMARKS_DIR), else the hub's `qiaojin/PubMedQA` (pqa_labeled) less the test ids;
- `pubmedqa:PATH`: a local JSONL file in the shape of ../shared/benchmarks (id, question, context,
  long_answer, answer), or a local folder shaped like the hub repository (pqa_labeled/*.parquet with
  pubid, question, context{contexts}, long_answer, final_decision).

Hub-shaped rows are the whole PQA-L set, so its test ids are removed; a JSONL file claims to be
training data, so a test id there is refused, naming file, line and id. Either way a training row
never shares an id with the test file.

The pool is cut into label-stratified folds (the PubMedQA authors cross-validate on 10 folds of 50);
`data.pool_folds` gives each stage its folds, so SFT, GRPO and the held-out validation slice are
disjoint. An SFT example is the evaluation prompt itself (context, question, yes/no/maybe
instruction) with the abstract's conclusion as the reasoning inside <think>.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from gazal.answer import YES_NO_MAYBE
from gazal.benchmarks import BenchmarkUnavailable, benchmarks_dir, load_benchmark
from gazal.config import PoolFolds, Recipe
from gazal.data import _hub_dataset, load_grpo_items, read_jsonl, require_str
from gazal.errors import GazalError
from gazal.tasks import Item, user_text

log = logging.getLogger(__name__)

PREFIX = "pubmedqa:"
HUB_ID = "qiaojin/PubMedQA"
HUB_DATA_DIR = "pqa_labeled"
TRAIN_FILE = "pubmedqa_train.jsonl"


def is_pool(spec: str) -> bool:
    """Whether a data source names the PubMedQA pool."""
    return spec.startswith(PREFIX)


def test_ids(recipe: Recipe) -> tuple[set[str], str]:
    """The PubMedQA test set's ids and where they came from (the benchmark loader's own source)."""
    directory = benchmarks_dir(recipe.eval.benchmarks_dir)
    try:
        items = load_benchmark("pubmedqa", directory)
    except BenchmarkUnavailable as exc:
        raise GazalError(f"PubMedQA training data: the test set is needed to keep training disjoint from it: {exc}") from None
    return {it.id for it in items}, str(directory / "pubmedqa_test.jsonl") if directory else "the hub's PubMedQA test set"


def _item(row: dict[str, Any], where: str) -> Item:
    question = require_str(row, "question", where)
    context = require_str(row, "context", where)
    conclusion = require_str(row, "long_answer", where)
    answer = require_str(row, "answer", where).strip().lower()
    if answer not in YES_NO_MAYBE:
        raise GazalError(f"{where}: field 'answer' is {answer!r}, not one of yes, no, maybe")
    if row.get("id") is None:
        raise GazalError(f"{where}: missing field 'id'")
    return Item(id=str(row["id"]), question=question, answer=answer, context=context,
                extra={"long_answer": conclusion, "where": where})


def _hub_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows of the hub repository, or of a local folder shaped like it, in the JSONL file's shape."""
    ds = _hub_dataset(path, None, "train", None, data_dir=HUB_DATA_DIR)
    rows = []
    for i, r in enumerate(ds):
        context = r.get("context")
        contexts = context.get("contexts") if isinstance(context, dict) else context
        rows.append((f"{path}[{i}]", {"id": str(r.get("pubid")), "question": r.get("question"),
                                      "context": "\n".join(contexts) if isinstance(contexts, list) else contexts,
                                      "long_answer": r.get("long_answer"), "answer": r.get("final_decision")}))
    return rows


def load_pool(spec: str, recipe: Recipe) -> list[Item]:
    """Every item of the pool a `pubmedqa:` source names, checked against the test set's ids."""
    name = spec[len(PREFIX):]
    directory = benchmarks_dir(recipe.eval.benchmarks_dir)
    if name == "train":
        local = directory / TRAIN_FILE if directory else None
        path = str(local) if local and local.is_file() else HUB_ID
    else:
        path = str(Path(name).expanduser())
    ids, test_source = test_ids(recipe)
    if Path(path).is_file():
        items = [_item(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]
        for it in items:
            if it.id in ids:
                raise GazalError(f"{it.extra['where']}: id {it.id} is in the PubMedQA test set ({test_source}); "
                                 "training on it would leak the test set into the model")
    else:
        rows = _hub_rows(path)
        items = [_item(row, where) for where, row in rows if row["id"] not in ids]
        log.info("%s: %d PQA-L rows, %d test ids removed", path, len(rows), len(rows) - len(items))
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise GazalError(f"{it.extra['where']}: id {it.id} appears twice in {path}")
        seen.add(it.id)
    log.info("PubMedQA pool %s: %d items (%s)", spec, len(items),
             ", ".join(f"{label} {sum(it.answer == label for it in items)}" for label in YES_NO_MAYBE))
    return items


def folds(items: list[Item], k: int, seed: int) -> dict[str, int]:
    """Item id -> fold in 0..k-1: each label's items, shuffled with the seed, dealt round-robin, so
    every fold holds each label in the pool's proportion (to within one item)."""
    out: dict[str, int] = {}
    rng = random.Random(seed)
    start = 0
    for label in sorted({it.answer for it in items}):
        members = sorted(it.id for it in items if it.answer == label)
        rng.shuffle(members)
        for j, item_id in enumerate(members):
            out[item_id] = (start + j) % k
        start = (start + len(members)) % k  # the next label continues the deal: folds stay equal in size
    return out


def stage_items(spec: str, recipe: Recipe, part: str, items: list[Item] | None = None) -> list[Item]:
    """The pool's items for one part ('sft', 'grpo' or 'validation') under `data.pool_folds`
    (without it, every item for either stage and none for validation)."""
    items = load_pool(spec, recipe) if items is None else items
    cfg: PoolFolds | None = recipe.data.pool_folds
    if cfg is None:
        return [] if part == "validation" else items
    fold = folds(items, cfg.k, recipe.seed)
    wanted = set({"sft": cfg.sft, "grpo": cfg.grpo, "validation": cfg.validation}[part])
    return [it for it in items if fold[it.id] in wanted]


def sft_row(item: Item, recipe: Recipe) -> dict[str, str]:
    """One SFT example: the evaluation prompt, the conclusion as reasoning, the label as the answer."""
    return {"case": user_text(item, recipe.task), "reasoning": item.extra["long_answer"],
            "answer": f"The answer is {item.answer}.", "where": item.extra["where"]}


def overlap(items: list[Item], recipe: Recipe, n: int = 6) -> dict[str, Any]:
    """Shared ids and shared word n-grams between training items and the PubMedQA test set (the
    question and context of each; the conclusion as well for training items)."""
    from gazal.curate import ngram_hashes  # here: curate loads torch, and `gazal validate` reads this module

    ids, source = test_ids(recipe)
    test = load_benchmark("pubmedqa", benchmarks_dir(recipe.eval.benchmarks_dir))
    test_grams: set[int] = set()
    for it in test:
        test_grams |= ngram_hashes(f"{it.question}\n{it.context}", n)
    shares = []
    for it in items:
        grams = ngram_hashes(f"{it.question}\n{it.context}\n{it.extra['long_answer']}", n)
        shares.append((len(grams & test_grams) / max(1, len(grams)), it.id))
    hits = sorted((s for s in shares if s[0] > 0), reverse=True)
    return {"test_source": source, "training_items": len(items), "shared_ids": sorted(ids & {it.id for it in items}),
            "ngram": n, "items_sharing_an_ngram": len(hits),
            "largest_shared_fraction": hits[0][0] if hits else 0.0,
            "most_shared": [{"id": i, "fraction": round(f, 4)} for f, i in hits[:5]]}


def sft_sources(recipe: Recipe) -> tuple[dict[str, list[dict[str, str]]], list[dict[str, str]], dict[str, Any]]:
    """For each `pubmedqa:` SFT source: its SFT-fold examples (by path), the validation folds'
    examples, and the overlap check of what SFT trains on against the test set (by path)."""
    loaded, validation, checks = {}, [], {}
    for source in recipe.data.sft:
        if not is_pool(source.path):
            continue
        items = load_pool(source.path, recipe)
        train = stage_items(source.path, recipe, "sft", items)
        loaded[source.path] = [sft_row(it, recipe) for it in train]
        validation += [sft_row(it, recipe) for it in stage_items(source.path, recipe, "validation", items)]
        checks[source.path] = overlap(train, recipe)
    return loaded, validation, checks


def grpo_questions(recipe: Recipe) -> list[Item]:
    """GRPO's questions: the pool's GRPO folds for a `pubmedqa:` source, else `data.grpo` as a
    multiple-choice file, seed set or hub set; at most `data.grpo_limit` of them."""
    if not is_pool(recipe.data.grpo):
        return load_grpo_items(recipe.data.grpo, recipe.data.grpo_limit)
    items = stage_items(recipe.data.grpo, recipe, "grpo")
    return items[:recipe.data.grpo_limit] if recipe.data.grpo_limit else items
