"""The run directory: what each stage wrote, so any later stage can run on its own.

Layout:
    .gazal.lock                         held by the one process writing the run (see `lock`)
    recipe.yaml                         the resolved recipe
    manifest.json                       what the run was made from (gazal.manifest): code, packages,
                                        machine, and per stage its data, weights and benchmarks, hashed
    sft/    adapter/ merged/ metrics.jsonl summary.json recipe.yaml DONE
    grpo/   adapter/ merged/ metrics.jsonl summary.json recipe.yaml DONE
    eval/   results.json <benchmark>/samples.jsonl recipe.yaml DONE
    logs/   sft/ grpo/ eval/ (TensorBoard) wandb/ runs.json   with logging.report_to (gazal.trackers)
    report.md
A stage's DONE file is written last; a stage without it is unfinished and runs again.
"""

from __future__ import annotations

import fcntl  # the writer lock is Linux (and other POSIX) only
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from gazal.config import Recipe
from gazal.errors import GazalError
from gazal.models import resolve_model

log = logging.getLogger(__name__)

STAGES = ("sft", "grpo", "eval")
# What a training stage keeps when it is resumed: its checkpoints and the metrics logged up to them.
RESUMABLE = ("checkpoints", "metrics.jsonl")


def is_main_process() -> bool:
    """True in the process that writes run files (rank 0 under `accelerate launch`, or a plain run)."""
    return int(os.environ.get("RANK", "0")) == 0


def distributed() -> bool:
    """True under `accelerate launch` / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def new_run_dir(recipe: Recipe) -> Path:
    """<output_dir>/<name>-<YYYYmmdd-HHMMSS> (a suffix keeps two runs in one second apart)."""
    base = Path(recipe.output_dir) / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def latest_run_dir(recipe: Recipe) -> Path:
    """The newest run directory of this recipe's name."""
    runs = sorted(Path(recipe.output_dir).glob(f"{recipe.name}-*/recipe.yaml"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise GazalError(f"no run directory for recipe '{recipe.name}' under {recipe.output_dir}/ (pass --run-dir)")
    return runs[-1].parent


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe (defaults filled in) as YAML."""
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


LOCK_FILE = ".gazal.lock"
# Open lock files, by resolved run directory: a lock lasts as long as its descriptor is open.
_locks: dict[Path, int] = {}


def lock(run_dir: Path) -> None:
    """Make this process the run directory's one writer, until it exits (or `unlock`), creating the
    directory if needed; a GazalError naming the holder (pid, host, command, since when) if another
    process writes it.

    An flock on RUN/.gazal.lock: the kernel drops it when its process dies, however it dies, so a
    lock file left by a killed run never blocks (no stale locks). Under accelerate launch /
    torchrun only the main process takes it; the others write nothing of their own. Taking it again
    in the same process is a no-op. Linux only (fcntl), as Gazal's training is."""
    if not is_main_process():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key in _locks:
        return
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 65536, 0).decode("utf-8", "replace")
        os.close(fd)
        raise GazalError(f"{run_dir}: another process is writing this run directory ({_describe_holder(holder)}); "
                         "wait for it to finish or stop it, or pass another --run-dir") from None
    # Rewritten in place, never replaced by a rename: the lock belongs to this file's inode.
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    _locks[key] = fd


def unlock(run_dir: Path) -> None:
    """Give up this process's writer lock on `run_dir` (a process's exit does the same)."""
    fd = _locks.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, `{info['command']}`, since {info['since']}"
    except (ValueError, KeyError, TypeError):  # the holder took the lock an instant ago and has not written yet
        return "a process that is just starting"


def prepare(run_dir: Path, recipe: Recipe) -> None:
    """Create the run directory and record the recipe (each stage adds to manifest.json as it starts)."""
    if not is_main_process():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, run_dir / "recipe.yaml")


def reset_peak_memory() -> bool:
    """Start a new peak-memory window (each stage of `gazal run` reports its own peak).

    Linux resets a process's peak resident set (VmHWM) when "5" is written to
    /proc/self/clear_refs; elsewhere the peak stays the process's lifetime peak, and False is
    returned. CUDA's peak-allocation counters are reset too.
    """
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset_peak_memory(), in MiB."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB, macOS bytes
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def peak_memory() -> dict[str, float]:
    """Peak host memory of this process (and GPU memory when there is one) since the last reset, in MiB."""
    import torch

    out = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (temp file + rename): a killed process never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def finished_rows(path: Path) -> list[dict]:
    """Rows of an append-only JSONL file. A line torn by a kill is cut off, so new rows append cleanly."""
    if not path.is_file():
        return []
    rows, good = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith("\n"):
            break
        rows.append(row)
        good.append(line)
    write_text(path, "".join(good))
    return rows


def appended_rows(path: Path) -> list[dict]:
    """Whole lines of a JSONL file another process may be appending to (read only: never truncated here)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def is_done(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / "DONE").is_file()


def start_stage(run_dir: Path, stage: str, recipe: Recipe, keep: tuple[str, ...] = ()) -> Path:
    """A clean stage folder (keeping `keep`, e.g. resumable samples) with the recipe it runs under."""
    folder = run_dir / stage
    if not is_main_process():
        return folder
    if folder.exists():
        for child in folder.iterdir():
            if child.name in keep:
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, folder / "recipe.yaml")
    return folder


def finish_stage(run_dir: Path, stage: str) -> None:
    (run_dir / stage / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")


def model_for(run_dir: Path, stage: str, recipe: Recipe) -> str:
    """The model a stage starts from: the newest finished stage's merged model, else the base."""
    earlier = {"sft": (), "grpo": ("sft",), "eval": ("grpo", "sft")}[stage]
    for prev in earlier:
        merged = run_dir / prev / "merged"
        if is_done(run_dir, prev) and (merged / "config.json").is_file():
            log.info("%s starts from %s", stage, merged)
            return str(merged)
    log.info("%s starts from the base model %s", stage, recipe.model.name_or_path)
    return resolve_model(recipe.model.name_or_path, recipe.model.revision)
