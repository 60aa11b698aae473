"""The GRPO difficulty filter: keep the questions whose pass rate under the starting policy lies in a band.

A GRPO group whose completions are all right or all wrong has no accuracy variance, so it teaches
nothing about correctness. Before training, each question is sampled k times from the starting
policy with the rollouts' decoding and scored with `tasks.score` (the extractor the accuracy reward
and evaluation share); a question is kept when at least `min_correct` completions are right and at
least `min_wrong` are wrong. TRL 1.16 has no DAPO dynamic sampling (resampling zero-variance groups
during training), so the filtering happens once, before training.

Questions are estimated in a seeded shuffle, cut into fixed generate calls of `prompts_per_call`,
each call with its own seed (seed + call index). One row per question, {id, key, correct, samples,
pass_rate}, is appended to grpo/pass_rates.jsonl as each call ends (under `accelerate launch`,
process r of w takes the calls whose index is r modulo w; processes other than the main one append
to grpo/pass_rates.parts/<r>.jsonl, merged by the main process at the end). `key` is a digest of the
question and of everything that shapes its samples (model weights, decoding, task prompt, seed, k),
so a rerun reuses exactly the rows those same inputs produced and samples the rest, as an
uninterrupted run would; a stale estimate is never reused.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gazal import rundir
from gazal.config import DifficultyFilterSettings, Recipe
from gazal.errors import GazalError
from gazal.generation import Decoding, make_generator
from gazal.tasks import Item, messages, score

log = logging.getLogger(__name__)

# (questions, seed) -> k completion texts per question, with the rollouts' decoding.
SampleFn = Callable[[list[Item], int], list[list[str]]]

ROWS = "pass_rates.jsonl"
PARTS = "pass_rates.parts"  # other processes' rows while they estimate
FILES = (ROWS, PARTS)  # what the GRPO stage folder keeps across reruns (rows carry their own key)
POLL_S = 1.0  # how often a process waiting for the others' rows looks again


def selection(items: list[Item], settings: DifficultyFilterSettings, seed: int) -> list[int]:
    """Positions of the questions to estimate, in estimation order: a seeded shuffle, cut to max_prompts.
    The cut is a prefix, so raising max_prompts keeps the earlier calls (and their rows) as they were."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return order[:settings.max_prompts]


def row_key(item: Item, key: str) -> str:
    """The digest that ties a row to its question and to what sampled it."""
    blob = json.dumps([key, item.to_dict()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def verdict(correct: int, samples: int, settings: DifficultyFilterSettings) -> str:
    """'kept', 'too_hard' (fewer than min_correct right) or 'too_easy' (fewer than min_wrong wrong)."""
    if correct < settings.min_correct:
        return "too_hard"
    if samples - correct < settings.min_wrong:
        return "too_easy"
    return "kept"


def _rows(path: Path) -> list[dict]:
    """Every finished row: the main file, then the other processes' parts."""
    return [row for p in [path, *sorted((path.parent / PARTS).glob("*.jsonl"))] for row in rundir.appended_rows(p)]


def _await(path: Path, wanted: set[str]) -> dict[str, dict]:
    """Wait until the other processes have written a row for every wanted key (they finish their
    shares in their own time); the rows by key."""
    said = time.monotonic()
    while True:
        done = {r["key"]: r for r in _rows(path) if r["key"] in wanted}
        if len(done) == len(wanted):
            return done
        if time.monotonic() - said > 60:
            log.info("difficulty filter: waiting for %d questions from the other processes", len(wanted) - len(done))
            said = time.monotonic()
        time.sleep(POLL_S)


def _estimate(todo: list[tuple[int, range]], order: list[int], items: list[Item], keys: list[str],
              done: dict[str, dict], sample_fn: SampleFn, k: int, seed: int, own: Path, bar: bool) -> None:
    """Sample and score the calls in `todo`, appending a row per question to `own` as each call ends."""
    own.parent.mkdir(parents=True, exist_ok=True)
    with own.open("a", encoding="utf-8") as fh, \
            tqdm(total=sum(len(span) for _, span in todo), desc="difficulty filter", unit="question",
                 disable=not bar) as progress:
        for c, span in todo:
            batch = [items[order[i]] for i in span]
            # One seed per fixed call: the same samples whether resumed or not, whichever process draws it.
            completions = sample_fn(batch, seed + c)
            if len(completions) != len(batch) or any(len(texts) != k for texts in completions):
                raise ValueError(f"sample_fn returned {[len(t) for t in completions]} completions for {len(batch)} "
                                 f"questions; expected {k} each")
            for i, item, texts in zip(span, batch, completions):
                if keys[i] in done:
                    continue  # finished before a kill cut its call short
                correct = sum(score(t, item.answer, item.labels, item.options)[1] for t in texts)
                row = {"id": item.id, "key": keys[i], "correct": correct, "samples": k, "pass_rate": correct / k}
                fh.write(json.dumps(row) + "\n")
                done[keys[i]] = row
            fh.flush()
            progress.update(len(span))


def filter_items(items: list[Item], sample_fn: SampleFn, settings: DifficultyFilterSettings, path: Path, seed: int,
                 key: dict[str, Any] | None = None, rank: int = 0, world: int = 1) -> tuple[list[Item], dict[str, Any]]:
    """The items inside the band (in their original order) and the counts.

    `path` is the rows file (grpo/pass_rates.jsonl); `key` describes what `sample_fn` samples from
    (model, decoding, task), which with k and `seed` must match for a row to be reused. Process
    `rank` of `world` samples its share of the calls; every process returns the same result.
    Counts: questions, estimated, not_estimated (beyond max_prompts; not trained on), kept, too_easy,
    too_hard, samples (k) and the band, by_correct (questions by right answers), mean_pass_rate,
    reused (rows of an earlier run), sampled (in this run, by all processes), seconds.
    """
    start = time.monotonic()
    k = settings.samples
    base = json.dumps({"samples": k, "seed": seed, **(key or {})}, sort_keys=True, default=str)
    order = selection(items, settings, seed)
    keys = [row_key(items[p], base) for p in order]
    wanted = set(keys)
    own = path if rank == 0 else path.parent / PARTS / f"{rank}.jsonl"
    rundir.finished_rows(own)  # cut a line a kill tore (only this process writes this file)
    found = _rows(path)
    done = {r["key"]: r for r in found if r["key"] in wanted}
    stale = sum(r["key"] not in wanted for r in found)
    if stale:
        log.info("difficulty filter: %d rows in %s came from other settings, model or questions; not reused",
                 stale, path.parent)
    size = settings.prompts_per_call
    calls = [range(j, min(j + size, len(order))) for j in range(0, len(order), size)]
    todo = [(c, span) for c, span in enumerate(calls)
            if c % world == rank and any(keys[i] not in done for i in span)]
    reused = sum(rk in done for rk in keys)
    if reused:
        log.info("difficulty filter: resuming, %d of %d questions already estimated", reused, len(order))
    if todo:
        _estimate(todo, order, items, keys, done, sample_fn, k, seed, own, bar=rank == 0)
    if world > 1:
        done = _await(path, wanted)
    if rank == 0:
        # One file in estimation order, without stale rows; the parts are merged into it.
        path.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_text(path, "".join(json.dumps(done[rk]) + "\n" for rk in keys))
        shutil.rmtree(path.parent / PARTS, ignore_errors=True)

    verdicts = [verdict(done[rk]["correct"], k, settings) for rk in keys]
    kept = [items[p] for p in sorted(p for p, v in zip(order, verdicts) if v == "kept")]
    by_correct = [0] * (k + 1)
    for rk in keys:
        by_correct[done[rk]["correct"]] += 1
    counts = {
        "questions": len(items), "estimated": len(order), "not_estimated": len(items) - len(order),
        "kept": len(kept), "too_easy": verdicts.count("too_easy"), "too_hard": verdicts.count("too_hard"),
        "samples": k, "min_correct": settings.min_correct, "min_wrong": settings.min_wrong,
        "by_correct": {str(c): n for c, n in enumerate(by_correct)},
        "mean_pass_rate": round(sum(done[rk]["pass_rate"] for rk in keys) / len(keys), 4) if keys else None,
        "reused": reused, "sampled": len(order) - reused, "seconds": round(time.monotonic() - start, 1),
    }
    log.info("difficulty filter: kept %d of %d questions (%d too easy, %d too hard, %d not estimated); "
             "k=%d, mean pass rate %s, %d reused", counts["kept"], len(items), counts["too_easy"], counts["too_hard"],
             counts["not_estimated"], k, counts["mean_pass_rate"], reused)
    return kept, counts


def _weights_stamp(model_path: str) -> list | str:
    """Name, size and modification time of a local model's files, so a retrained model in the same
    folder (an SFT stage run again) does not reuse the old model's estimate; a hub id as it is."""
    folder = Path(model_path)
    if not folder.is_dir():
        return model_path
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()]


class PolicySampler:
    """The starting policy as a SampleFn: k completions per question with the rollouts' decoding.

    The generator (the recipe's eval.backend) loads on first use, so a finished estimate loads no
    model, and `close` frees it before the trainer loads its own.
    """

    def __init__(self, model_path: str, recipe: Recipe):
        g, trl = recipe.grpo, recipe.grpo.trl
        self.model_path, self.recipe = model_path, recipe
        # TRL's rollouts read top_k, min_p and chat_template_kwargs from GRPOConfig (grpo.trl); so does the estimate.
        self.decoding = Decoding(g.max_completion_length, g.temperature, g.top_p, top_k=trl.get("top_k") or None,
                                 min_p=trl.get("min_p"), n=g.difficulty_filter.samples,
                                 chat_template_kwargs=dict(trl.get("chat_template_kwargs") or {}))
        unmatched = sorted({"repetition_penalty", "generation_kwargs"} & set(trl))
        if unmatched:
            log.warning("grpo.difficulty_filter: the estimate samples without grpo.trl %s, which the rollouts use",
                        ", ".join(unmatched))
        self.generator = None

    def key(self) -> dict[str, Any]:
        """What shapes the samples besides the seed and k."""
        r = self.recipe
        return {"model": self.model_path, "weights": _weights_stamp(self.model_path), "revision": r.model.revision,
                "dtype": r.model.dtype, "backend": r.eval.backend, "decoding": dataclasses.asdict(self.decoding),
                "task": r.task.model_dump(mode="json")}

    def __call__(self, items: list[Item], seed: int) -> list[list[str]]:
        if self.generator is None:
            log.info("difficulty filter: sampling %d completions per question from %s", self.decoding.n,
                     self.model_path)
            self.generator = make_generator(self.model_path, self.recipe)
        conversations = [messages(it, self.recipe.task) for it in items]
        return [[c.text for c in outs] for outs in self.generator.generate(conversations, self.decoding, seed=seed)]

    def close(self) -> None:
        """Free the generator's model (and the CUDA cache)."""
        self.generator = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run(items: list[Item], recipe: Recipe, model_path: str, folder: Path) -> tuple[list[Item], dict[str, Any]]:
    """Filter the GRPO questions by their pass rate under `model_path` (the starting policy), with
    rows in folder/pass_rates.jsonl; GazalError when no question is kept."""
    settings = recipe.grpo.difficulty_filter
    sampler = PolicySampler(model_path, recipe)
    try:
        kept, counts = filter_items(items, sampler, settings, folder / ROWS, recipe.seed, key=sampler.key(),
                                    rank=int(os.environ.get("RANK", "0")), world=int(os.environ.get("WORLD_SIZE", "1")))
    finally:
        sampler.close()
    counts["model"] = model_path
    if not kept:
        raise GazalError(f"grpo.difficulty_filter: no question kept of {counts['estimated']} estimated "
                         f"({counts['too_easy']} too easy, {counts['too_hard']} too hard with "
                         f"min_correct={settings.min_correct}, min_wrong={settings.min_wrong} of "
                         f"samples={settings.samples}; right answers per question: {counts['by_correct']}); "
                         f"widen the band, or train the starting policy more (SFT)")
    return kept, counts
