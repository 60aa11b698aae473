"""Evaluation: generate answers to benchmark questions, score them with the shared extractor.

Items are cut into fixed batches (by position in the benchmark), and each batch's rows are
appended to eval/<benchmark>/samples.jsonl as soon as it completes. A rerun skips finished
batches and regenerates unfinished ones whole, so a killed evaluation loses at most the batch in
flight and greedy results equal an uninterrupted run's (same batches, same padding).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from gazal import rundir
from gazal.benchmarks import PAPER, BenchmarkUnavailable, benchmarks_dir, describe, load_benchmark
from gazal.config import Recipe
from gazal.generation import make_generator
from gazal.scoring import metrics
from gazal.tasks import Item, messages, score

log = logging.getLogger(__name__)


def evaluate_items(name: str, items: list[Item], generator, recipe: Recipe, folder: Path) -> dict:
    """Generate and score every unfinished batch into folder/samples.jsonl, then compute metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "samples.jsonl"
    n = recipe.eval.num_samples
    counts: dict[str, int] = {}
    for row in rundir.finished_rows(path):
        counts[row["id"]] = counts.get(row["id"], 0) + 1
    size = recipe.eval.batch_size
    batches = [items[i:i + size] for i in range(0, len(items), size)]
    todo = [b for b in batches if any(counts.get(it.id, 0) < n for it in b)]
    if len(todo) < len(batches):
        log.info("%s: resuming, %d of %d batches already scored", name, len(batches) - len(todo), len(batches))
    with path.open("a", encoding="utf-8") as fh, tqdm(total=len(items), desc=name, unit="item",
                                                     initial=len(items) - sum(len(b) for b in todo)) as bar:
        for batch in todo:
            outputs = generator.generate([messages(it, recipe.task) for it in batch], n)
            for it, completions in zip(batch, outputs):
                if counts.get(it.id, 0) >= n:
                    continue  # finished before a kill cut its batch short
                for k, c in enumerate(completions):
                    extraction, correct = score(c.text, it.answer, it.labels, it.options)
                    fh.write(json.dumps({
                        "id": it.id, "sample": k, "category": it.category, "answer": it.answer,
                        "prediction": extraction.label, "status": extraction.status, "correct": correct,
                        "completion_tokens": c.tokens, "truncated": c.truncated, "completion": c.text}) + "\n")
            fh.flush()
            bar.update(len(batch))
    wanted = {it.id for it in items}
    return metrics([r for r in rundir.finished_rows(path) if r["id"] in wanted])


def _resumable(run_dir: Path, recipe: Recipe, model_path: str) -> tuple[str, ...]:
    """Benchmark folders to keep: only from an unfinished evaluation of the same model and settings."""
    folder = run_dir / "eval"
    if rundir.is_done(run_dir, "eval") or not (folder / "model.txt").is_file() or not (folder / "recipe.yaml").is_file():
        return ()
    previous = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
    same = ((folder / "model.txt").read_text().strip() == model_path
            and previous.get("eval") == recipe.eval.model_dump(mode="json")
            and previous.get("task") == recipe.task.model_dump(mode="json"))
    return tuple(recipe.eval.benchmarks) if same else ()


def main(recipe: Recipe, run_dir: Path) -> dict:
    """Evaluate the newest model of the run on the recipe's benchmarks; write eval/results.json."""
    model_path = rundir.model_for(run_dir, "eval", recipe)
    out = rundir.start_stage(run_dir, "eval", recipe, keep=_resumable(run_dir, recipe, model_path))
    (out / "model.txt").write_text(model_path + "\n")
    directory = benchmarks_dir(recipe.eval.benchmarks_dir)
    generator = None
    cfg = recipe.eval
    results: dict = {
        "model": model_path,
        "backend": cfg.backend,
        "prompt": {"system": recipe.task.system_prompt, "mcq_instruction": recipe.task.mcq_instruction,
                   "yesno_instruction": recipe.task.yesno_instruction},
        "decoding": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "num_samples": cfg.num_samples},
        "benchmarks": {},
    }
    for name in cfg.benchmarks:
        entry = {"definition": describe(name, cfg.mmlu_pro_categories),
                 "paper_accuracy": PAPER[name] / 100 if name in PAPER else None, "limit": cfg.limit}
        try:
            items = load_benchmark(name, directory, cfg.mmlu_pro_categories, cfg.limit)
        except BenchmarkUnavailable as exc:
            log.warning("skipping %s: %s", name, exc)
            results["benchmarks"][name] = {**entry, "skipped": str(exc)}
            continue
        if generator is None:  # loaded once, and only when something can be evaluated
            generator = make_generator(model_path, recipe)
        entry.update(evaluate_items(name, items, generator, recipe, out / name))
        results["benchmarks"][name] = entry
        log.info("%s: accuracy %.3f (n=%d)", name, entry["accuracy"], entry["n"])
    results.update(rundir.peak_memory())
    rundir.write_json(out / "results.json", results)
    rundir.finish_stage(run_dir, "eval")
    return results
