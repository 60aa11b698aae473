"""Evaluation: generate answers to benchmark questions, score them with the shared extractor.

Each finished item is appended to eval/<benchmark>/samples.jsonl as soon as its batch completes;
a rerun skips the items already there, so a killed evaluation loses at most one batch.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from gazal import rundir
from gazal.answer import STATUSES
from gazal.benchmarks import PAPER, BenchmarkUnavailable, benchmarks_dir, describe, load_benchmark
from gazal.config import Recipe
from gazal.models import load_model, load_tokenizer
from gazal.tasks import Item, messages, score

log = logging.getLogger(__name__)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


class TransformersGenerator:
    """Batched generation with transformers: left padding, greedy or sampled decoding."""

    def __init__(self, model_path: str, recipe: Recipe):
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=recipe.model.trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_path, recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code)
        self.model.eval()
        self.cfg = recipe.eval
        self.eos_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict[str, str]]]) -> list[tuple[str, int, bool]]:
        """(completion text, completion tokens, truncated) for each conversation."""
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = self.cfg.temperature > 0
        out = self.model.generate(
            **enc,
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=sampling,
            temperature=self.cfg.temperature if sampling else None,
            top_p=self.cfg.top_p if sampling else None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        results = []
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            ids = row if end is None else row[:end]
            # Keep special tokens such as <think> that a tokenizer may mark special; pads are cut above.
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            results.append((text, len(ids), end is None))
        return results


def _done_ids(path: Path) -> set[str]:
    """Ids already scored. A line torn by a kill is cut off so new rows append cleanly after it."""
    if not path.is_file():
        return set()
    done, good = set(), []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith("\n"):
            break
        done.add(row["id"])
        good.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(good), encoding="utf-8")
    tmp.replace(path)
    return done


def _read_samples(path: Path, ids: set[str]) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("id") in ids:
                rows.append(row)
    return rows


def metrics(samples: list[dict]) -> dict:
    """Accuracy with a 95% CI, per-category accuracy, extractor status rates, lengths, truncation."""
    n = len(samples)
    correct = sum(s["correct"] for s in samples)
    low, high = wilson_interval(correct, n)
    statuses = Counter(s["status"] for s in samples)
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        if s.get("category"):
            by_cat[s["category"]].append(s["correct"])
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95": [low, high],
        "per_category": {c: {"n": len(v), "accuracy": sum(v) / len(v)} for c, v in sorted(by_cat.items())},
        "status_rates": {st: statuses.get(st, 0) / n if n else 0.0 for st in STATUSES},
        "mean_completion_tokens": sum(s["completion_tokens"] for s in samples) / n if n else 0.0,
        "truncation_rate": sum(s["truncated"] for s in samples) / n if n else 0.0,
    }


def evaluate_items(name: str, items: list[Item], generator: TransformersGenerator, recipe: Recipe, folder: Path) -> dict:
    """Generate and score every item not already in folder/samples.jsonl, then compute metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "samples.jsonl"
    done = _done_ids(path)
    todo = [it for it in items if it.id not in done]
    if done:
        log.info("%s: resuming, %d of %d items already scored", name, len(items) - len(todo), len(items))
    size = recipe.eval.batch_size
    with path.open("a", encoding="utf-8") as fh, tqdm(total=len(items), initial=len(items) - len(todo), desc=name) as bar:
        for start in range(0, len(todo), size):
            batch = todo[start:start + size]
            outputs = generator.generate([messages(it, recipe.task) for it in batch])
            for it, (text, n_tokens, truncated) in zip(batch, outputs):
                extraction, correct = score(text, it.answer, it.labels, it.options)
                row = {"id": it.id, "category": it.category, "answer": it.answer, "prediction": extraction.label,
                       "status": extraction.status, "correct": correct, "completion_tokens": n_tokens,
                       "truncated": truncated, "completion": text}
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            bar.update(len(batch))
    return metrics(_read_samples(path, {it.id for it in items}))


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
    generator: TransformersGenerator | None = None
    results: dict = {"model": model_path, "prompt": {"system": recipe.task.system_prompt,
                     "mcq_instruction": recipe.task.mcq_instruction,
                     "yesno_instruction": recipe.task.yesno_instruction},
                     "decoding": {"max_new_tokens": recipe.eval.max_new_tokens, "temperature": recipe.eval.temperature,
                                  "top_p": recipe.eval.top_p},
                     "benchmarks": {}}
    for name in recipe.eval.benchmarks:
        entry = {"definition": describe(name, recipe.eval.mmlu_pro_categories), "paper_accuracy": PAPER[name] / 100}
        try:
            items = load_benchmark(name, directory, recipe.eval.mmlu_pro_categories, recipe.eval.limit)
        except BenchmarkUnavailable as exc:
            log.warning("skipping %s: %s", name, exc)
            results["benchmarks"][name] = {**entry, "skipped": str(exc)}
            continue
        if generator is None:
            generator = TransformersGenerator(model_path, recipe)
        entry.update(evaluate_items(name, items, generator, recipe, out / name))
        entry["limit"] = recipe.eval.limit
        results["benchmarks"][name] = entry
        log.info("%s: accuracy %.3f (n=%d)", name, entry["accuracy"], entry["n"])
    results["peak_rss_mb"] = rundir.peak_rss_mb()
    rundir.write_json(out / "results.json", results)
    rundir.finish_stage(run_dir, "eval")
    return results
