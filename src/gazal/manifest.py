"""RUN/manifest.json: what a run was made from (code, packages, recipe, machine, data, weights, benchmarks).

Written by the main process when a stage starts (`record_stage`) and completed when it ends
(`finish_stage`); each stage adds its own entry under `stages`:

    packages      Python, platform and library versions
    gazal         Gazal's version, and its git commit and whether the package's tree was dirty
    recipe        the resolved recipe and its seeds
    hardware      CPU model and count, memory, GPUs and their memory, processes (WORLD_SIZE)
    accelerate    the ACCELERATE_* / FSDP_* variables `accelerate launch` set (null: not launched)
    environment   the variables that change what a run does, where set (ENV_VARS)
    stages.<s>    data (each source as resolved: path or hub id, rows, sha256), base_model (path or
                  hub id and revision, sha256 of its weights), eval's benchmarks (source file, sha256,
                  item ids), the command, start and end times, processes and sharding

The top-level sections describe the newest stage start. A stage started under different ones (another
launch, other overrides) keeps its own copy of what differed in its entry, so every stage's context
is its entry over the top level.

Hashes: a file's is the sha256 of its bytes. A folder's (model weights `*.safetensors` / `*.bin`, or
a dataset folder's files) is the sha256 of what `sha256sum` prints for its files sorted by name
(byte order), so `cd MODEL && sha256sum $(ls *.safetensors *.bin | LC_ALL=C sort) | sha256sum`
reproduces it. Hub rows (data or benchmarks not on disk) are hashed as JSON lines,
`json.dumps(row, sort_keys=True) + "\\n"` in order. Files are read in 8 MiB chunks, and each file's
digest is remembered for the process by (path, size, mtime), so a stage never hashes one file twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from gazal import hub, pubmedqa, rundir
from gazal.benchmarks import HUB, LOCAL_FILES, benchmarks_dir
from gazal.config import Recipe
from gazal.data import SEEDS, seed_path
from gazal.models import resolve_model
from gazal.tasks import Item

log = logging.getLogger(__name__)

FILE = "manifest.json"
CHUNK = 8 * 2**20
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
LIBRARIES = ("gazal", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "pydantic", "vllm")
ENV_VARS = ("GAZAL_BENCHMARKS_DIR", "GAZAL_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
            "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "CUDA_VISIBLE_DEVICES", "WORLD_SIZE")
ACCELERATE_PREFIXES = ("ACCELERATE_", "FSDP_")
# Sections that describe the launch; a stage started under other values keeps its own copy.
CONTEXT = ("packages", "gazal", "recipe", "hardware", "accelerate", "environment")

# (resolved path, size, mtime_ns) -> sha256, for this process.
_digests: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, streamed in 8 MiB chunks; remembered by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with path.open("rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
        _digests[key] = h.hexdigest()
    return _digests[key]


def sha256_rows(rows: Iterable[dict]) -> tuple[str, int]:
    """SHA-256 of rows as canonical JSON lines (keys sorted), and how many rows there were."""
    h, n = hashlib.sha256(), 0
    for row in rows:
        # default=str: hub rows may hold dates or other values JSON has no type for.
        h.update((json.dumps(row, sort_keys=True, default=str) + "\n").encode("utf-8"))
        n += 1
    return h.hexdigest(), n


def _folder_digest(files: list[Path], root: Path) -> dict[str, Any]:
    """sha256 over `sha256sum`-style lines of `files` (sorted by name relative to `root`), with each file's."""
    named = sorted((f.relative_to(root).as_posix(), f) for f in files)
    each = {name: sha256_file(f) for name, f in named}
    lines = "".join(f"{digest}  {name}\n" for name, digest in each.items())
    return {"sha256": hashlib.sha256(lines.encode("utf-8")).hexdigest() if each else None,
            "bytes": sum(f.stat().st_size for _, f in named), "files": each}


def weights_digest(folder: Path) -> dict[str, Any]:
    """The content hash of a model (or adapter) folder's weight files (`*.safetensors`, `*.bin`):
    {sha256, bytes, files: {name: sha256}}; sha256 is None when the folder holds no weights."""
    folder = Path(folder)
    files = {f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern) if f.is_file()}
    return _folder_digest(list(files), folder)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local Hugging Face cache's snapshot folder of a model at `revision`, without the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def model_entry(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """A model as resolved: its local folder, or its hub id, revision and cached commit, with the
    hash of its weights (None for a hub model not yet in the local cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return {"path": str(path.resolve()), **weights_digest(path)}
    entry: dict[str, Any] = {"hub_id": name_or_path, "revision": revision}
    snapshot = _hub_snapshot(name_or_path, revision)
    if snapshot is None:
        return {**entry, "commit": None, "sha256": None}
    digest = weights_digest(snapshot)
    # A cached snapshot may hold the config alone (a tokenizer-only download): no weights, no hash.
    return {**entry, "commit": snapshot.name, **digest}


def _file_entry(path: Path) -> dict[str, Any]:
    path = path.resolve()
    return {"path": str(path), "rows": _count_rows(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _count_rows(path: Path) -> int:
    """Rows of a local data file as Gazal reads them (gazal.data.read_rows): parquet rows, a JSON
    array's items, else non-blank lines."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as fh:
        first = fh.read(4096).lstrip()
    if path.suffix == ".json" and first.startswith(b"["):
        return len(json.loads(path.read_text(encoding="utf-8")))
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _hub_entry(name: str, config: str | None, split: str, revision: str | None, data_dir: str | None) -> dict[str, Any]:
    """A dataset on the hub, or a local folder laid out like a hub repository, loaded again (from
    the cache the stage just filled) for its rows' hash; a folder's files are hashed as well."""
    folder = Path(name).expanduser()
    entry: dict[str, Any] = ({"path": str(folder.resolve())} if folder.is_dir()
                             else {"hub_id": name, "revision": revision})
    entry.update(config=config, split=split, **({"data_dir": data_dir} if data_dir else {}))
    if folder.is_dir():
        files = [f for f in folder.rglob("*")
                 if f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts)]
        entry["folder"] = _folder_digest(files, folder)
    try:
        ds = hub.load_dataset(name, config, split, revision, data_dir, "")
    except Exception as exc:  # noqa: BLE001 - the manifest says it could not hash; the stage goes on
        log.warning("manifest: %s could not be loaded again to hash its rows (%s)", name, exc)
        return {**entry, "rows": None, "sha256": None, "unhashed": f"{type(exc).__name__}: {exc}"}
    digest, n = sha256_rows(ds)
    return {**entry, "rows": n, "sha256": digest}


def data_entry(spec: str, config: str | None = None, split: str = "train", revision: str | None = None,
               data_dir: str | None = None) -> dict[str, Any]:
    """One data source as the loaders resolve it: a bundled seed set or local file (path, rows,
    sha256 of the file), or a hub dataset or hub-shaped folder (id or path, revision, config,
    split, rows, sha256 of the rows)."""
    if spec in SEEDS:
        return {"source": spec, **_file_entry(seed_path(spec))}
    path = Path(spec).expanduser()
    if path.is_file():
        return {"source": spec, **_file_entry(path)}
    return {"source": spec, **_hub_entry(spec, config, split, revision, data_dir)}


def benchmark_source(name: str, recipe: Recipe, directory: Path | None = None) -> dict[str, Any]:
    """Where a benchmark's items come from (gazal.benchmarks.load_benchmark): the local file under
    `directory` (a resumed evaluation's recorded folder), eval.benchmarks_dir or
    $GAZAL_BENCHMARKS_DIR, else the hub's pinned split."""
    directory = directory or benchmarks_dir(recipe.eval.benchmarks_dir)
    if directory is not None:
        path = directory / LOCAL_FILES[name]
        return _file_entry(path) if path.is_file() else {"path": str(path.resolve()), "sha256": None}
    repo, config, split, revision = HUB[name]
    return _hub_entry(repo, config, split, revision, None)


def _pool_entry(spec: str, recipe: Recipe) -> dict[str, Any]:
    """A `pubmedqa:` pool, resolved as gazal.pubmedqa.load_pool does, with the test set whose ids it excludes."""
    name = spec[len(pubmedqa.PREFIX):]
    directory = benchmarks_dir(recipe.eval.benchmarks_dir)
    if name == "train":
        local = directory / pubmedqa.TRAIN_FILE if directory else None
        path = str(local) if local and local.is_file() else pubmedqa.HUB_ID
    else:
        path = str(Path(name).expanduser())
    entry = data_entry(path, None, "train", None, pubmedqa.HUB_DATA_DIR)
    return {**entry, "source": spec, "test_set": benchmark_source("pubmedqa", recipe)}


def stage_data(stage: str, recipe: Recipe) -> list[dict[str, Any]]:
    """Every data source a training stage ('sft' or 'grpo') reads."""
    if stage == "sft":
        return [_pool_entry(s.path, recipe) if pubmedqa.is_pool(s.path)
                else data_entry(s.path, s.config, s.split, s.revision) for s in recipe.data.sft]
    spec = recipe.data.grpo
    return [_pool_entry(spec, recipe) if pubmedqa.is_pool(spec) else data_entry(spec)]


def packages() -> dict[str, str | None]:
    """Versions of Python and the libraries that shape a result."""
    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def gazal_source() -> dict[str, Any]:
    """Gazal's version, and the git commit of its source when it runs from a checkout (dirty: the
    package's files differ from that commit); commit None outside git."""
    source = Path(__file__).resolve().parent
    out: dict[str, Any] = {"version": packages()["gazal"], "source": str(source), "commit": None, "dirty": None}

    def git(*args: str) -> str:
        # --no-optional-locks: reading the state must not rewrite the checkout's index.
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=source, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        out["commit"] = git("rev-parse", "HEAD")
        out["dirty"] = bool(git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or a checkout without commits
        pass
    return out


def hardware() -> dict[str, Any]:
    """CPU model and count, memory, GPUs and their memory, and the launch's process count."""
    import torch

    cpu = platform.processor() or None
    info = Path("/proc/cpuinfo")
    if info.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    memory = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total = next((line.split()[1] for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")),
                     None)
        memory = round(int(total) / 2**20, 1) if total else None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_mib": props.total_memory // 2**20})
    return {"cpu": cpu, "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),  # Linux, as Gazal's training is
            "memory_gib": memory, "gpus": gpus, "cuda": torch.version.cuda if gpus else None,
            "processes": int(os.environ.get("WORLD_SIZE", "1")),
            "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))}


def accelerate_env() -> dict[str, str] | None:
    """The ACCELERATE_* and FSDP_* variables (`accelerate launch` sets them from its config), or None."""
    found = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ACCELERATE_PREFIXES)}
    return found or None


def environment() -> dict[str, str]:
    """The variables among ENV_VARS that are set."""
    return {k: os.environ[k] for k in ENV_VARS if k in os.environ}


def seeds(recipe: Recipe) -> dict[str, int]:
    """The seeds a run draws from: training (TrainingArguments.seed: adapter init, sampling), data
    (data_seed, the SFT mixture's shuffle, PubMedQA folds) and evaluation's item selection."""
    return {"training": recipe.seed, "data": recipe.seed,
            "eval_selection": recipe.seed if recipe.eval.limit_seed is None else recipe.eval.limit_seed}


def context(recipe: Recipe) -> dict[str, Any]:
    """The top-level sections, as this process sees them now."""
    return {"packages": packages(), "gazal": gazal_source(),
            "recipe": {"seeds": seeds(recipe), "resolved": recipe.model_dump(mode="json")},
            "hardware": hardware(), "accelerate": accelerate_env(), "environment": environment()}


def read(run_dir: Path) -> dict[str, Any]:
    """The run's manifest ({} when there is none)."""
    path = Path(run_dir) / FILE
    return rundir.read_json(path) if path.is_file() else {}


def run_packages(run_dir: Path) -> dict[str, str | None]:
    """The package versions a run recorded: the manifest's, or an older run's versions.json."""
    found = read(run_dir).get("packages")
    if found is not None:
        return found
    old = Path(run_dir) / "versions.json"
    return rundir.read_json(old) if old.is_file() else {}


def _benchmarks(recipe: Recipe, items: dict[str, list[Item] | str], directory: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, chosen in items.items():
        entry = benchmark_source(name, recipe, directory)
        if isinstance(chosen, str):
            out[name] = {**entry, "skipped": chosen}
        else:
            out[name] = {**entry, "evaluated": len(chosen), "ids": [it.id for it in chosen]}
    return out


def _benchmarks_dir(recipe: Recipe, recorded: Path | None) -> dict[str, Any]:
    if recorded is not None:
        return {"path": str(Path(recorded).resolve()), "from": "the run's manifest (a resumed evaluation)"}
    configured = recipe.eval.benchmarks_dir
    directory = benchmarks_dir(configured)
    origin = "eval.benchmarks_dir" if configured else "GAZAL_BENCHMARKS_DIR" if directory else "the hub"
    return {"path": str(directory.resolve()) if directory else None, "from": origin}


def record_stage(run_dir: Path, stage: str, recipe: Recipe, base_model: str, *, adapter: Path | None = None,
                 models: dict[str, str] | None = None, benchmarks: dict[str, list[Item] | str] | None = None,
                 benchmarks_from: Path | None = None) -> None:
    """Write (or extend) RUN/manifest.json as `stage` starts: the launch's context and the stage's
    entry: its data sources, the model it starts from (`base_model`, a folder or hub id; with
    `adapter`, the adapter folder it continues), for eval every evaluated model (`models`, by stage)
    and the benchmarks' sources and chosen items (`benchmarks`, read from `benchmarks_from` when a
    resumed evaluation uses the folder the run recorded). Main process only."""
    if not rundir.is_main_process():
        return
    start = time.perf_counter()
    manifest = read(run_dir)
    stages = manifest.setdefault("stages", {})
    stages.pop(stage, None)  # a stage started again replaces its entry
    for key, value in context(recipe).items():
        if key in manifest and manifest[key] != value:
            for other in stages.values():
                other.setdefault(key, manifest[key])  # the other stages ran under the old value
        manifest[key] = value
        for other in stages.values():
            if other.get(key, value) == value:
                other.pop(key, None)
    base = resolve_model(recipe.model.name_or_path, recipe.model.revision)

    def model(path: str) -> dict[str, Any]:
        # The recipe's model keeps its name ('gazal:tiny-qwen3') and hub revision beside what it resolved to.
        if path == base:
            return {"name": recipe.model.name_or_path, **model_entry(path, recipe.model.revision)}
        return model_entry(path)

    entry: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": None, "command": sys.argv}
    if stage != "eval":
        entry["data"] = stage_data(stage, recipe)
    entry["base_model"] = model(base_model)
    if adapter is not None:
        entry["adapter"] = {"path": str(Path(adapter).resolve()), **weights_digest(Path(adapter))}
    if models is not None:
        entry["models"] = {name: model(path) for name, path in models.items()}
    if benchmarks is not None:
        entry["benchmarks_dir"] = _benchmarks_dir(recipe, benchmarks_from)
        entry["benchmarks"] = _benchmarks(recipe, benchmarks, benchmarks_from)
    entry["manifest_seconds"] = round(time.perf_counter() - start, 3)
    stages[stage] = entry
    # The launch's sections first, the stages after them, whatever order an older manifest had.
    ordered = {"format": 1, **{k: manifest[k] for k in CONTEXT}, "stages": stages}
    rundir.write_json(Path(run_dir) / FILE, {**ordered, **manifest})
    log.info("%s: manifest recorded in %.2fs (%s)", stage, entry["manifest_seconds"], Path(run_dir) / FILE)


def finish_stage(run_dir: Path, stage: str, **facts: Any) -> None:
    """Complete a stage's entry as it ends: the end time and `facts` known only then (processes,
    sharding); a hub model that was not cached at the start is hashed now. Main process only."""
    if not rundir.is_main_process():
        return
    manifest = read(run_dir)
    entry = manifest.get("stages", {}).get(stage)
    if entry is None:
        return
    for model in [entry["base_model"], *entry.get("models", {}).values()]:
        if "hub_id" in model and model["sha256"] is None:
            model.update(model_entry(model["hub_id"], model["revision"]))
    entry.update(facts, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    rundir.write_json(Path(run_dir) / FILE, manifest)


def verify_benchmarks(run_dir: Path) -> str | None:
    """Check the benchmark files the run's evaluation recorded against their sha256 now; a changed
    file is refused (GazalError naming it and both hashes), so a later command never quietly scores
    against other data. Returns the recorded benchmarks directory when it still exists (None: not
    recorded, or gone, and the usual lookup applies)."""
    from gazal.errors import GazalError

    ev = read(run_dir).get("stages", {}).get("eval", {})  # older runs have no manifest: {} throughout
    for name, entry in (ev.get("benchmarks") or {}).items():
        path, recorded = entry.get("path"), entry.get("sha256")
        if not (path and recorded):
            continue
        if not Path(path).is_file():
            log.warning("%s: %s recorded by the run is gone; the usual benchmark lookup applies", name, path)
            continue
        now = sha256_file(Path(path))
        if now != recorded:
            raise GazalError(f"{path}: the {name} benchmark file changed since {run_dir} evaluated it (sha256 "
                             f"{recorded} in {FILE}, {now} now); restore it, or evaluate again")
    directory = (ev.get("benchmarks_dir") or {}).get("path")
    return directory if directory and Path(directory).is_dir() else None



def eval_benchmarks(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The benchmark sources the run's evaluation recorded: name -> {path or hub_id, sha256, ids, ...}
    ({} for a run without a manifest or an evaluation)."""
    return read(run_dir).get("stages", {}).get("eval", {}).get("benchmarks") or {}


def resume_benchmarks(run_dir: Path, recipe: Recipe) -> Path | None:
    """The benchmarks folder a resumed evaluation must read: the one the run recorded, while it
    exists and its files still have the recorded hashes, whatever $GAZAL_BENCHMARKS_DIR says now
    (the finished batches were generated from it). Raises GazalError, naming the file and both
    hashes, when a recorded file changed, or when it is gone and the file found instead differs:
    finished rows are never merged with rows of other data. None: nothing recorded (the usual
    lookup applies)."""
    from gazal.errors import GazalError

    directory = verify_benchmarks(run_dir)
    if directory is not None:
        return Path(directory)
    for name, entry in eval_benchmarks(run_dir).items():
        path, recorded = entry.get("path"), entry.get("sha256")
        if not (path and recorded) or name not in recipe.eval.benchmarks:
            continue  # hub benchmarks are pinned to a revision; a skipped one has no rows
        now = benchmark_source(name, recipe)
        if now.get("sha256") != recorded:
            found = f"{now['path']} (sha256 {now.get('sha256')})" if now.get("path") else "the hub's copy"
            raise GazalError(f"{run_dir}: the unfinished evaluation's {name} rows were generated from {path} (sha256 "
                             f"{recorded} in {FILE}), which is gone; the benchmark found now is {found}. Restore "
                             f"that file, or delete {Path(run_dir) / 'eval'} to evaluate from the start")
    return None


def differences(run_dir: Path) -> list[str]:
    """What differs now from what `run_dir` recorded, for `gazal reproduce` to say before it starts:
    package versions, the hardware class (CPU model and count, GPUs), and the hashes of the data
    files, starting models and benchmark files the stages recorded (models the run made itself, its
    merged outputs, are not inputs and are left out)."""
    recorded = read(run_dir)
    out = []
    for name, then in recorded.get("packages", {}).items():
        now = packages().get(name)
        if now != then:
            out.append(f"package {name}: {then} then, {now} now")
    hw_then, hw_now = recorded.get("hardware", {}), hardware()
    for key in ("cpu", "cpus", "gpus"):
        if hw_then.get(key) != hw_now.get(key):
            out.append(f"hardware {key}: {hw_then.get(key)} then, {hw_now.get(key)} now")
    inside = str(Path(run_dir).resolve())
    for stage, entry in recorded.get("stages", {}).items():
        files = [(f"{stage} data {d.get('source')}", d) for d in entry.get("data", [])]
        files += [(f"eval benchmark {name}", b) for name, b in (entry.get("benchmarks") or {}).items()]
        for what, d in files:
            path, then = d.get("path"), d.get("sha256")
            if not (path and then):
                continue  # hub data: its rows' hash needs a download; `gazal sft` reads them again
            now = sha256_file(Path(path)) if Path(path).is_file() else None
            if now != then:
                out.append(f"{what}: {path} sha256 {then} then, {now or 'missing'} now")
        model = entry.get("base_model") or {}
        if model.get("sha256") and not str(model.get("path", "")).startswith(inside):
            now = model_entry(model.get("path") or model["hub_id"], model.get("revision")).get("sha256")
            if now != model["sha256"]:
                out.append(f"{stage} starting model {model.get('name') or model.get('hub_id')}: sha256 "
                           f"{model['sha256']} then, {now or 'missing'} now")
    return out
