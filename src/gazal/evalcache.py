"""Finished evaluations kept across runs, keyed by what decides their completions.

The key is a hash of the model's content (its weight, config and tokenizer files, by the per-file
sha256 the run's manifest records), the benchmark file's sha256 as the manifest records it and its
item ids in order, the prompts' settings, the decoding, the batching (left padding changes greedy
floating-point results) and the backend. The same base model evaluated by two runs of a recipe is
then generated once. Cached rows keep their completions; the caller scores them again, so a change
of the answer extractor applies to cached evaluations too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from gazal import manifest, rundir
from gazal.models import cache_dir

log = logging.getLogger(__name__)

# Files that decide what a model generates; other files (README, training args) do not.
_MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "generation_config.json", "tokenizer*", "*.model",
                "vocab*", "merges.txt", "special_tokens_map.json", "chat_template*")


def folder() -> Path:
    return cache_dir() / "eval"


def model_digest(model_path: str) -> str | None:
    """SHA-256 over a local model folder's generating files (remembered per path, size and mtime, so a
    large model is hashed once); None for a model that is not a local folder (a hub id)."""
    path = Path(model_path)
    if not path.is_dir():
        return None
    files = sorted({f for pattern in _MODEL_FILES for f in path.glob(pattern) if f.is_file()})
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    memo = folder() / "digests.json"
    known = rundir.read_json(memo) if memo.is_file() else {}
    entry = known.get(str(path.resolve()))
    if entry and entry["stamp"] == [list(s) for s in stamp]:
        return entry["digest"]
    # The same per-file hashes the run's manifest records (manifest.sha256_file, remembered for the
    # process, so a model the manifest has just hashed is not read again), as `sha256sum` lines.
    lines = "".join(f"{manifest.sha256_file(f)}  {f.name}\n" for f in files)
    digest = hashlib.sha256(lines.encode("utf-8")).hexdigest()
    known[str(path.resolve())] = {"stamp": stamp, "digest": digest}
    memo.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_json(memo, known)
    return digest


def key(model_digest_: str, what: dict[str, Any]) -> str:
    """The cache key of one (model, benchmark, mode) evaluation; `what` holds everything else that
    decides the completions (JSON-serialisable)."""
    blob = json.dumps({"model": model_digest_, **what}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def lookup(cache_key: str) -> list[dict] | None:
    """The cached rows, or None."""
    path = folder() / f"{cache_key}.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def store(cache_key: str, rows: list[dict], what: dict[str, Any]) -> None:
    """Keep finished rows (written atomically, with a readable sidecar of what they are)."""
    folder().mkdir(parents=True, exist_ok=True)
    rundir.write_text(folder() / f"{cache_key}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    rundir.write_json(folder() / f"{cache_key}.json", what)
