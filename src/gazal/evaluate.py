"""Evaluation: generate answers to benchmark questions, score them with the shared extractor.

Items are sorted by prompt length and cut into fixed batches, so a batch pads little and its
contents depend only on the benchmark, the limit and the batch size. Under `accelerate launch` /
torchrun (or with vLLM replicas, `eval.vllm_data_parallel_size`) process r of w generates the
batches whose index is r modulo w, appending rows to eval/<benchmark>/parts/<r>.jsonl as each
batch completes; the main process waits for every item and merges the parts into samples.jsonl
in item order. A rerun, with any number of processes, skips finished batches and regenerates
unfinished ones whole, with the same per-batch sampling seed, so a killed evaluation loses at most
the batches in flight (with `eval.generation_batch_size`, the packed call's) and its results equal an
uninterrupted single-process run's.

Modes: 'reasoning' asks the task's question (think, then answer) and writes
eval/<benchmark>/samples.jsonl; 'direct' asks for the answer at once and writes
eval/<benchmark>/direct/samples.jsonl. With both, `recall_vs_reasoning` pairs them item by item.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from gazal import card, evalcache, manifest, rundir, trackers
from gazal.benchmarks import PAPER, BenchmarkUnavailable, benchmarks_dir, describe, load_benchmark, select
from gazal.config import Recipe
from gazal.recipes import load_recipe
from gazal.errors import GazalError
from gazal.generation import Decoding, make_generator
from gazal.models import resolve_model
from gazal.rewards import parse
from gazal.scoring import metrics
from gazal.tasks import Item, direct_task, messages, score

log = logging.getLogger(__name__)

SHARD_ENV = "GAZAL_EVAL_SHARD"  # "r/w": set for the vLLM replicas `gazal eval` starts


def shard() -> tuple[int, int]:
    """This process's (rank, processes) for evaluation: a vLLM replica's, else the launcher's."""
    if os.environ.get(SHARD_ENV):
        r, w = os.environ[SHARD_ENV].split("/")
        return int(r), int(w)
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def batches(items: list[Item], recipe: Recipe, mode: str) -> list[list[Item]]:
    """Fixed batches: items ordered by prompt length (characters, so the order does not depend on
    the model), ties by position, then cut every `eval.batch_size`."""
    task = _task(recipe, mode)
    order = sorted(range(len(items)), key=lambda i: (sum(len(m["content"]) for m in messages(items[i], task)), i))
    size = recipe.eval.batch_size
    return [[items[i] for i in order[j:j + size]] for j in range(0, len(order), size)]


def _task(recipe: Recipe, mode: str):
    return direct_task(recipe.task, recipe.eval.direct_instruction) if mode == "direct" else recipe.task


def _folder(out: Path, name: str, mode: str) -> Path:
    return out / name if mode == "reasoning" else out / name / mode


def _rows(folder: Path) -> dict[tuple[str, int], dict]:
    """Every finished (item, sample) row of a benchmark folder: merged file first, then the parts;
    the first copy of a row wins (a batch regenerated after a kill may repeat rows)."""
    found: dict[tuple[str, int], dict] = {}
    for path in [folder / "samples.jsonl", *sorted((folder / "parts").glob("*.jsonl"))]:
        for row in rundir.appended_rows(path):
            found.setdefault((row["id"], row.get("sample", 0)), row)
    return found


def evaluate_shares(work: list[tuple[str, list[Item], Path]], generator, recipe: Recipe, mode: str,
                    rank: int = 0, world: int = 1) -> None:
    """Generate and score this process's unfinished batches of each (benchmark, items, folder) into
    folder/parts/<rank>.jsonl. Under greedy reasoning-mode decoding with `eval.generation_batch_size`,
    fixed batches (of any of the benchmarks) share generate calls; rows are written, per benchmark, as
    each call ends."""
    decoding = Decoding.of(recipe.eval, mode)
    task = _task(recipe, mode)
    pending = []  # (benchmark, batch index, batch, rows already written, part file)
    with contextlib.ExitStack() as files:
        for name, items, folder in work:
            parts = folder / "parts"
            parts.mkdir(parents=True, exist_ok=True)
            own = parts / f"{rank}.jsonl"
            rundir.finished_rows(own)  # cut a line a kill tore (only this process writes this file)
            done = _rows(folder)
            mine = [(b, batch) for b, batch in enumerate(batches(items, recipe, mode)) if b % world == rank]
            todo = [(b, batch) for b, batch in mine
                    if any((it.id, k) not in done for it in batch for k in range(decoding.n))]
            if len(todo) < len(mine):
                log.info("%s (%s): resuming, %d of %d batches already scored", name, mode, len(mine) - len(todo),
                         len(mine))
            fh = files.enter_context(own.open("a", encoding="utf-8"))
            pending += [(name, b, batch, done, fh) for b, batch in todo]
        names = ", ".join(name for name, _, _ in work)
        with tqdm(total=sum(len(p[2]) for p in pending), desc=f"{names} ({mode})", unit="item") as bar:
            for group in _packed(pending, recipe, decoding, mode):
                conversations = [messages(it, task) for _, _, batch, _, _ in group for it in batch]
                # One seed per fixed batch (a group's first): the same samples whichever process
                # draws it, resumed or not. Only greedy batches are packed, and they draw nothing.
                outputs = iter(generator.generate(conversations, decoding, seed=recipe.seed + group[0][1]))
                for _, _, batch, done, fh in group:
                    for it in batch:
                        for k, c in enumerate(next(outputs)):
                            if (it.id, k) in done:
                                continue  # finished before a kill cut its batch short
                            fh.write(json.dumps(score_row(it, k, c.text, c.tokens, c.truncated)) + "\n")
                    fh.flush()
                bar.update(sum(len(batch) for _, _, batch, _, _ in group))


def score_row(it: Item, sample: int, text: str, tokens: int, truncated: bool) -> dict:
    """One evaluation row: the completion scored by the shared extractor, and whether it keeps the
    trained format (one <think> block, then one clean answer statement: the format reward's rule)."""
    extraction, correct = score(text, it.answer, it.labels, it.options)
    return {"id": it.id, "sample": sample, "category": it.category, "answer": it.answer,
            "prediction": extraction.label, "status": extraction.status, "correct": correct,
            "well_formed": parse(text, it.labels, it.options).well_formed,
            "completion_tokens": tokens, "truncated": truncated, "completion": text}


def _packed(pending: list, recipe: Recipe, decoding: Decoding, mode: str) -> list[list]:
    """Consecutive fixed batches packed into generate calls of at most `eval.generation_batch_size`
    sequences when reasoning-mode decoding is greedy; otherwise one batch per call. Direct answers
    are a few tokens: their cost is the prompt, which a packed call pads to its longest (measured on
    the demo: packed 55 s against 45 s unpacked, while reasoning took 182 s against 224 s)."""
    limit = recipe.eval.generation_batch_size
    if limit is None or decoding.temperature > 0 or mode == "direct":
        return [[p] for p in pending]
    groups: list[list] = []
    size = 0
    for p in pending:
        rows = len(p[2]) * decoding.n
        if groups and size + rows <= limit:
            groups[-1].append(p)
            size += rows
        else:
            groups.append([p])
            size = rows
    return groups


def missing(items: list[Item], folder: Path, n: int) -> int:
    """(item, sample) rows not yet written by any process."""
    done = _rows(folder)
    return sum((it.id, k) not in done for it in items for k in range(n))


def _await_rows(name: str, mode: str, items: list[Item], folder: Path, n: int) -> None:
    """Wait until the other processes have written every row (they finish their shares in their own
    time). Files are reread only when their sizes change: a full evaluation's rows run to hundreds
    of megabytes."""
    seen, said = None, time.monotonic()
    while True:
        sizes = sorted((p.name, p.stat().st_size) for p in (folder / "parts").glob("*.jsonl"))
        if sizes != seen:
            seen = sizes
            if not (left := missing(items, folder, n)):
                return
        if time.monotonic() - said > 60:
            log.info("%s (%s): waiting for %d rows from the other processes", name, mode, left)
            said = time.monotonic()
        time.sleep(1)


def merge(items: list[Item], folder: Path, n: int) -> list[dict]:
    """Write folder/samples.jsonl from every process's rows, in item and sample order, and drop the parts."""
    done = _rows(folder)
    rows = [done[(it.id, k)] for it in items for k in range(n) if (it.id, k) in done]
    rundir.write_text(folder / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for part in (folder / "parts").glob("*.jsonl"):
        part.unlink()
    return rows


def recall_vs_reasoning(reasoning: list[dict], direct: list[dict], max_new_tokens: int) -> dict:
    """Direct answers against reasoned ones, item by item (each reasoning sample against the item's
    direct answer): how often reasoning turned a right recall wrong and the reverse, and reasoning
    accuracy by completion length."""
    direct_right = {r["id"]: bool(r["correct"]) for r in direct}
    pairs = [(direct_right[r["id"]], bool(r["correct"])) for r in reasoning if r["id"] in direct_right]
    n = len(pairs) or 1
    table = {"both_right": sum(d and x for d, x in pairs), "both_wrong": sum(not d and not x for d, x in pairs),
             "reasoning_fixed": sum(not d and x for d, x in pairs), "reasoning_broke": sum(d and not x for d, x in pairs)}
    edges = [max_new_tokens // 8, max_new_tokens // 4, max_new_tokens // 2, max_new_tokens]
    buckets = []
    low = 0
    for high in edges:
        rows = [r for r in reasoning if low < r.get("completion_tokens", 0) <= high and not r.get("truncated")]
        buckets.append({"tokens": f"{low + 1}-{high}", "n": len(rows),
                        "accuracy": sum(bool(r["correct"]) for r in rows) / len(rows) if rows else None})
        low = high
    cut = [r for r in reasoning if r.get("truncated")]
    buckets.append({"tokens": "truncated", "n": len(cut),
                    "accuracy": sum(bool(r["correct"]) for r in cut) / len(cut) if cut else None})
    return {"pairs": len(pairs), **table, **{f"{k}_rate": v / n for k, v in table.items()},
            "by_length": buckets}


def _same_settings(run_dir: Path, recipe: Recipe) -> bool:
    """Whether an unfinished evaluation in the run used this recipe's evaluation settings."""
    folder = run_dir / "eval"
    if rundir.is_done(run_dir, "eval") or not (folder / "recipe.yaml").is_file():
        return False
    previous = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
    return (previous.get("seed") == recipe.seed
            and previous.get("eval") == recipe.eval.model_dump(mode="json")
            and previous.get("task") == recipe.task.model_dump(mode="json"))


def stage_models(run_dir: Path, recipe: Recipe) -> list[tuple[str, str]]:
    """(stage, model path) of each model to evaluate, in stage order; the last is the run's newest.

    `eval.stages` lists them ('base', 'sft', 'grpo'; a training stage only once it finished);
    without it, only the newest finished stage's model."""
    finished = {s: str(run_dir / s / "merged") for s in ("sft", "grpo")
                if rundir.is_done(run_dir, s) and (run_dir / s / "merged" / "config.json").is_file()}
    base = resolve_model(recipe.model.name_or_path, recipe.model.revision)
    if recipe.eval.stages is None:
        newest = "grpo" if "grpo" in finished else "sft" if "sft" in finished else "base"
        return [(newest, finished.get(newest, base))]
    out = []
    for stage in dict.fromkeys(recipe.eval.stages):
        if stage == "base":
            out.append(("base", base))
        elif stage in finished:
            out.append((stage, finished[stage]))
        else:
            log.warning("eval.stages: %s has no finished model in %s; left out of the card", stage, run_dir)
    return out


def stage_folder(out: Path, stage: str, final: str) -> Path:
    """The newest model's evaluation is eval/ itself (as without a card); the others eval/stages/<stage>."""
    return out if stage == final else out / "stages" / stage


def _claim(folder: Path, model_path: str, keep: bool) -> None:
    """Prepare a stage's folder for `model_path`: its rows are kept only when `keep` and they were
    written for the same model (eval/stages is left to the stages it holds)."""
    marker = folder / "model.txt"
    if not (keep and marker.is_file() and marker.read_text().strip() == model_path):
        for child in (folder.iterdir() if folder.is_dir() else []):
            if child.is_dir() and child.name != "stages":
                shutil.rmtree(child)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(model_path + "\n")


def _cache_keys(recipe: Recipe, model_path: str, items: dict[str, list[Item] | str],
                sources: dict[str, dict]) -> dict[tuple[str, str], tuple[str, dict]]:
    """(benchmark, mode) -> (cache key, what it covers), for a model whose content can be hashed and
    a benchmark whose source the manifest hashed (`sources`: manifest.eval_benchmarks): the same ids
    in an edited benchmark file are other questions, so the file's hash is part of the key."""
    digest = evalcache.model_digest(model_path)
    if digest is None:
        return {}
    cfg = recipe.eval
    evaluated = {name: [it.id for it in v] for name, v in items.items() if not isinstance(v, str)}
    hashes = {name: (sources.get(name) or {}).get("sha256") for name in evaluated}
    chosen = {name: ids for name, ids in evaluated.items() if hashes[name]}
    out = {}
    for mode in cfg.modes:
        decoding = Decoding.of(cfg, mode)
        for name, ids in chosen.items():
            what = {"benchmark": name, "benchmark_sha256": sources[name]["sha256"], "mode": mode, "ids": ids,
                    "decoding": asdict(decoding),
                    "task": _task(recipe, mode).model_dump(mode="json"), "seed": recipe.seed,
                    "batch_size": cfg.batch_size, "backend": cfg.backend, "dtype": recipe.model.dtype,
                    "model_kwargs": recipe.model.model_dump(mode="json", exclude={"name_or_path"}),
                    "max_model_len": cfg.max_model_len}
            if cfg.generation_batch_size and mode != "direct" and decoding.temperature == 0:
                # Packed greedy calls mix benchmarks: a batch's neighbours (and padding) are part of its key.
                if not all(hashes.values()):
                    continue  # a neighbour's content is unknown
                what.update(generation_batch_size=cfg.generation_batch_size, all_ids=evaluated, all_sha256=hashes)
            out[(name, mode)] = (evalcache.key(digest, what), {**what, "model_path": model_path})
    return out


def _fill_from_cache(keys: dict, items: dict[str, list[Item] | str], folder: Path, n_of: dict[str, int]) -> None:
    """Write the cached evaluations of this model into its folder (scored again), so generation skips them."""
    for (name, mode), (cache_key, _) in keys.items():
        target = _folder(folder, name, mode)
        chosen = items[name]
        if isinstance(chosen, str) or not missing(chosen, target, n_of[mode]):
            continue
        rows = evalcache.lookup(cache_key)
        if rows is None:
            continue
        by_id = {it.id: it for it in chosen}
        fresh = [score_row(by_id[r["id"]], r["sample"], r["completion"], r["completion_tokens"], r["truncated"])
                 for r in rows]
        target.mkdir(parents=True, exist_ok=True)
        rundir.write_text(target / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in fresh))
        log.info("%s (%s): %d rows from the evaluation cache", name, mode, len(fresh))


def benchmark_items(recipe: Recipe, directory: Path | None = None) -> dict[str, list[Item] | str]:
    """Each benchmark's items (the limited selection), or why it is unavailable; from `directory`
    when given (a resumed evaluation's recorded folder), else the recipe's lookup."""
    cfg = recipe.eval
    directory = directory or benchmarks_dir(cfg.benchmarks_dir)
    seed = recipe.seed if cfg.limit_seed is None else cfg.limit_seed
    out: dict[str, list[Item] | str] = {}
    for name in cfg.benchmarks:
        try:
            out[name] = select(load_benchmark(name, directory, cfg.mmlu_pro_categories), cfg.limits.get(name, cfg.limit),
                               cfg.limit_strategy, seed)
        except BenchmarkUnavailable as exc:
            out[name] = str(exc)
    return out


def _wait(run_dir: Path) -> None:
    """Hold the other processes until the main one has prepared the stage folder."""
    if rundir.distributed() and not os.environ.get(SHARD_ENV):
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _replicas(recipe: Recipe, run_dir: Path, folder: Path) -> None:
    """Start the vLLM replicas, each on its own `vllm_tensor_parallel_size` GPUs, and wait for them."""
    cfg = recipe.eval
    tp, dp = cfg.vllm_tensor_parallel_size, cfg.vllm_data_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(gpus) < tp * dp:
        raise GazalError(f"eval.vllm_data_parallel_size={dp} x eval.vllm_tensor_parallel_size={tp} needs {tp * dp} "
                         f"GPUs; CUDA_VISIBLE_DEVICES has {len(gpus)}")
    procs = []
    for r in range(dp):
        env = {**os.environ, SHARD_ENV: f"{r}/{dp}", "CUDA_VISIBLE_DEVICES": ",".join(gpus[r * tp:(r + 1) * tp])}
        procs.append(subprocess.Popen([sys.executable, "-m", "gazal.evaluate", str(run_dir), str(folder)], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise GazalError(f"evaluation replicas exited with {codes}; rerun to resume (finished batches are kept)")


def generate_shares(recipe: Recipe, folder: Path, items: dict[str, list[Item] | str], rank: int, world: int) -> None:
    """This process's share of every benchmark and mode for the model named in folder/model.txt, with
    one model load (none when every row is already there)."""
    available = [(name, chosen) for name, chosen in items.items() if not isinstance(chosen, str)]
    if not any(missing(chosen, _folder(folder, name, mode), Decoding.of(recipe.eval, mode).n)
               for name, chosen in available for mode in recipe.eval.modes):
        return
    generator = make_generator((folder / "model.txt").read_text().strip(), recipe)
    for mode in recipe.eval.modes:
        evaluate_shares([(name, chosen, _folder(folder, name, mode)) for name, chosen in available],
                        generator, recipe, mode, rank, world)
    del generator
    gc.collect()


def _generate(recipe: Recipe, run_dir: Path, folder: Path, items: dict[str, list[Item] | str]) -> None:
    """Every process's (or vLLM replica's) share of one model's evaluation."""
    if recipe.eval.backend == "vllm":
        # vLLM engines span GPUs themselves: the main process runs one, or starts the replicas; the
        # other processes of a `gazal run` launch have nothing to generate.
        if rundir.is_main_process():
            if recipe.eval.vllm_data_parallel_size > 1:
                _replicas(recipe, run_dir, folder)
            else:
                generate_shares(recipe, folder, items, 0, 1)
    else:
        rank, world = shard()
        generate_shares(recipe, folder, items, rank, world)


def _collect(recipe: Recipe, folder: Path, items: dict[str, list[Item] | str], model_path: str, world: int,
             keys: dict) -> tuple[dict, dict[str, dict[str, list[dict]]]]:
    """Merge one model's rows (waiting for the other processes), cache them, and compute its results."""
    cfg = recipe.eval
    seed = recipe.seed if cfg.limit_seed is None else cfg.limit_seed
    results: dict = {
        "model": model_path,
        "backend": cfg.backend,
        "processes": cfg.vllm_data_parallel_size if cfg.backend == "vllm" else world,
        "prompt": {"system": recipe.task.system_prompt, "mcq_instruction": recipe.task.mcq_instruction,
                   "yesno_instruction": recipe.task.yesno_instruction, "direct_instruction": cfg.direct_instruction,
                   "direct_prefill": cfg.direct_prefill},
        "decoding": {"preset": cfg.preset, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                     "top_p": cfg.top_p, "top_k": cfg.top_k, "min_p": cfg.min_p, "num_samples": cfg.num_samples,
                     "chat_template_kwargs": cfg.chat_template_kwargs},
        "modes": list(cfg.modes),
        "direct_method": direct_method(cfg) if "direct" in cfg.modes else None,
        "benchmarks": {},
    }
    all_rows: dict[str, dict[str, list[dict]]] = {}
    for name, chosen in items.items():
        limit = cfg.limits.get(name, cfg.limit)
        entry = {"definition": describe(name, cfg.mmlu_pro_categories),
                 "paper_accuracy": PAPER[name] / 100 if name in PAPER else None, "limit": limit}
        if isinstance(chosen, str):
            results["benchmarks"][name] = {**entry, "skipped": chosen}
            continue
        if limit:
            entry["selection"] = {"strategy": cfg.limit_strategy, "seed": seed if cfg.limit_strategy == "stratified"
                                  else None, "ids": [it.id for it in chosen]}
        merged = {}
        for mode in cfg.modes:
            target = _folder(folder, name, mode)
            n = Decoding.of(cfg, mode).n
            _await_rows(name, mode, chosen, target, n)
            merged[mode] = merge(chosen, target, n)
            if (name, mode) in keys:
                evalcache.store(keys[(name, mode)][0], merged[mode], keys[(name, mode)][1])
        reasoning = "reasoning" if "reasoning" in merged else cfg.modes[0]
        entry.update(metrics(merged[reasoning]))
        entry["mode"] = reasoning
        if "direct" in merged and reasoning != "direct":
            entry["direct"] = metrics(merged["direct"])
            entry["recall_vs_reasoning"] = recall_vs_reasoning(merged[reasoning], merged["direct"], cfg.max_new_tokens)
        results["benchmarks"][name] = entry
        all_rows[name] = merged
        log.info("%s: accuracy %.3f (n=%d)", name, entry["accuracy"], entry["n"])
    return results, all_rows


def direct_method(cfg) -> str:
    """How direct answers were obtained, said beside every direct figure."""
    if cfg.direct_prefill:
        return (f"generated, greedy, up to {cfg.direct_max_new_tokens} tokens after the prefill "
                f"{cfg.direct_prefill!r} (the answer turn opens closed-thinking)")
    return f"generated, greedy, up to {cfg.direct_max_new_tokens} tokens, no prefill"


def main(recipe: Recipe, run_dir: Path) -> dict:
    """Evaluate the run's model(s) on the recipe's benchmarks; write eval/results.json (and, with
    `eval.stages`, every stage's results and the stage report card).

    Every process evaluates its share; only the main process merges and writes results."""
    cfg = recipe.eval
    stages = stage_models(run_dir, recipe)
    final = stages[-1][0]
    keep = _same_settings(run_dir, recipe)
    # A resumed evaluation reads the benchmark files its finished batches were made from (checked
    # against their recorded hashes), not whatever the environment points at now.
    recorded = manifest.resume_benchmarks(run_dir, recipe) if keep else None
    out = rundir.start_stage(run_dir, "eval", recipe, keep=("stages", *cfg.benchmarks, "model.txt") if keep else ())
    items = benchmark_items(recipe, recorded)
    manifest.record_stage(run_dir, "eval", recipe, stages[-1][1], models=dict(stages) if len(stages) > 1 else None,
                          benchmarks=items, benchmarks_from=recorded)
    for name, chosen in items.items():
        if isinstance(chosen, str):
            log.warning("skipping %s: %s", name, chosen)
    n_of = {mode: Decoding.of(cfg, mode).n for mode in cfg.modes}
    keys: dict[str, dict] = {}
    if rundir.is_main_process():
        if not keep:
            shutil.rmtree(out / "stages", ignore_errors=True)
        for stage, model_path in stages:
            folder = stage_folder(out, stage, final)
            _claim(folder, model_path, keep)
            if cfg.cache:
                keys[stage] = _cache_keys(recipe, model_path, items, manifest.eval_benchmarks(run_dir))
                _fill_from_cache(keys[stage], items, folder, n_of)
    _wait(run_dir)
    world = shard()[1]
    per_stage: dict[str, dict] = {}
    rows: dict[str, dict] = {}
    for stage, model_path in stages:
        folder = stage_folder(out, stage, final)
        if len(stages) > 1:
            log.info("evaluating stage %s: %s", stage, model_path)
        _generate(recipe, run_dir, folder, items)
        if rundir.is_main_process():
            per_stage[stage], rows[stage] = _collect(recipe, folder, items, model_path, world, keys.get(stage, {}))
            per_stage[stage]["stage"] = stage
            if folder != out:
                rundir.write_json(folder / "results.json", {**per_stage[stage], **rundir.peak_memory()})
    if not rundir.is_main_process():
        return {}
    results = per_stage[final]
    if len(stages) > 1:
        names = [s for s, _ in stages]
        results["card"] = card.build(names, {s: stage_folder(out, s, final) for s in names}, per_stage, rows,
                                     results["direct_method"])
    results.update(rundir.peak_memory())
    rundir.write_json(out / "results.json", results)
    trackers.log_eval(recipe, run_dir, results)  # before DONE: if a tracker fails, a rerun logs again
    manifest.finish_stage(run_dir, "eval", processes=results["processes"])
    rundir.finish_stage(run_dir, "eval")
    return results


def _replica_main(run_dir: str, folder: str) -> None:
    """Entry point of one vLLM replica (`python -m gazal.evaluate RUN_DIR FOLDER`, started by `_replicas`):
    its share of the evaluation of the model named in FOLDER/model.txt."""
    logging.basicConfig(level=os.environ.get("GAZAL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    recipe = load_recipe(str(Path(run_dir) / "eval" / "recipe.yaml"))
    rank, world = shard()
    generate_shares(recipe, Path(folder), benchmark_items(recipe), rank, world)


if __name__ == "__main__":
    _replica_main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else str(Path(sys.argv[1]) / "eval"))
