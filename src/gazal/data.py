"""Training data: bundled seed sets, local JSONL, or hub datasets, checked row by row.

Every bad row is reported with file, line and field, so a user fixes it in one go.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from gazal.errors import GazalError
from gazal.tasks import Item

log = logging.getLogger(__name__)

SEEDS = {"seed:sft": "sft.jsonl", "seed:grpo": "grpo.jsonl"}


def seed_path(name: str) -> Path:
    """Path of a bundled seed file ('seed:sft' or 'seed:grpo')."""
    if name not in SEEDS:
        raise GazalError(f"{name}: unknown seed set (known: {', '.join(SEEDS)})")
    return Path(str(resources.files("gazal") / "seed" / SEEDS[name]))


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; a broken line names file and line."""
    path = Path(path)
    if not path.is_file():
        raise GazalError(f"{path}: file not found")
    empty = True
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GazalError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise GazalError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            empty = False
            yield lineno, obj
    if empty:
        raise GazalError(f"{path}: file is empty")


def require_str(row: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    """row[key] as a string, or a GazalError naming the place and field."""
    if key not in row or row[key] is None:
        raise GazalError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise GazalError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise GazalError(f"{where}: field '{key}' is empty")
    return value


def check_options(row: dict, where: str) -> dict[str, str]:
    """A multiple-choice row's options: consecutive letters from A, each a non-empty string."""
    options = row.get("options")
    if not isinstance(options, dict) or not options:
        raise GazalError(f"{where}: field 'options' must be a non-empty object of letter -> text")
    letters = list(options)
    expected = [chr(ord("A") + i) for i in range(len(letters))]
    if letters != expected:
        raise GazalError(f"{where}: field 'options' must use consecutive letters {''.join(expected)}, got {''.join(letters)}")
    for k, v in options.items():
        if not isinstance(v, str) or not v.strip():
            raise GazalError(f"{where}: field 'options.{k}' must be a non-empty string")
    return dict(options)


def mcq_item(row: dict, where: str) -> Item:
    """A multiple-choice row -> Item; the gold letter must be one of the options."""
    question = require_str(row, "question", where)
    options = check_options(row, where)
    answer = require_str(row, "answer", where).strip()
    if answer not in options:
        raise GazalError(f"{where}: field 'answer' is {answer!r}, not one of the options {', '.join(options)}")
    item_id = str(row.get("id") or where)
    return Item(id=item_id, question=question, answer=answer, options=options, category=row.get("specialty"))


def _resolve(spec: str) -> Path | None:
    if spec in SEEDS:
        return seed_path(spec)
    path = Path(spec).expanduser()
    return path if path.is_file() else None


def load_sft_rows(spec: str, limit: int | None = None) -> list[dict[str, str]]:
    """SFT rows {case, reasoning, answer} from a seed set, a JSONL file, or a hub dataset."""
    path = _resolve(spec)
    rows: list[dict[str, str]] = []
    if path is not None:
        for lineno, row in read_jsonl(path):
            where = f"{path}:{lineno}"
            rows.append({k: require_str(row, k, where) for k in ("case", "reasoning", "answer")})
    else:
        rows = [dict(r) for r in _hub_rows(spec, ("case", "reasoning", "answer"))]
    return rows[:limit] if limit else rows


def load_grpo_items(spec: str, limit: int | None = None) -> list[Item]:
    """Multiple-choice questions {question, options, answer} from a seed set, JSONL, or the hub."""
    path = _resolve(spec)
    if path is not None:
        items = [mcq_item(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]
    else:
        items = [mcq_item(row, f"{spec}[{i}]") for i, row in enumerate(_hub_rows(spec, ("question", "options", "answer")))]
    return items[:limit] if limit else items


def _hub_rows(name: str, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a hub dataset's train split; fails plainly when the hub cannot be reached."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split="train")
    except Exception as exc:  # network, auth, missing repo: all mean "cannot load this source"
        raise GazalError(f"{name}: not a local file and could not be loaded from the hub ({type(exc).__name__}: {exc})") from None
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise GazalError(f"{name}: hub dataset lacks column(s) {', '.join(missing)} (has {', '.join(ds.column_names)})")
    return list(ds)


def seed_texts() -> Iterator[str]:
    """All text of the bundled seed sets (trains the tiny test tokenizer)."""
    for name in SEEDS:
        for _, row in read_jsonl(seed_path(name)):
            for value in row.values():
                if isinstance(value, str):
                    yield value
                elif isinstance(value, dict):
                    yield from (v for v in value.values() if isinstance(v, str))
