"""Training data: bundled seed sets, local JSONL, or hub datasets, checked row by row.

Every bad row is reported with file, line and field, so a user fixes it in one go.
"""

from __future__ import annotations

import ast
import json
import logging
import random
import re
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


# Hub datasets known by name, with the column names they use for Gazal's fields.
HUB_SFT_PRESETS: dict[str, dict[str, str]] = {
    # Gazal-R1's SFT set: case, reasoning and answer columns, as Gazal's own shape.
    "TachyHealth/structured_medical": {"case": "case", "reasoning": "reasoning", "answer": "answer"},
}
SFT_FIELDS = ("case", "reasoning", "answer")
_ROLES = {"system", "user", "assistant"}


def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a local .jsonl, .json (array or lines) or .parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise GazalError(f"{path}: not a readable parquet file ({exc})") from None
        if not rows:
            raise GazalError(f"{path}: file is empty")
        for i, row in enumerate(rows):
            yield f"{path}: row {i}", row
        return
    if path.suffix == ".json" and path.is_file():
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise GazalError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not rows:
                raise GazalError(f"{path}: file is empty")
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise GazalError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
                yield f"{path}: item {i}", row
            return
    for lineno, row in read_jsonl(path):
        yield f"{path}:{lineno}", row


def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise GazalError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise GazalError(f"{where}: field '{field}.{i}' must be {{role: system|user|assistant, content: string}}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
        raise GazalError(f"{where}: field '{field}': the last message must be a non-empty assistant turn")
    if not any(m["role"] == "user" for m in out):
        raise GazalError(f"{where}: field '{field}': no user message")
    return out


def sft_example(row: dict[str, Any], where: str, columns: dict[str, str] | None = None) -> dict[str, Any]:
    """One SFT row -> {case, reasoning, answer} or {messages}, with `where` for later messages.

    columns maps Gazal's field names to the row's; a row with the (mapped) messages column and
    none of the case column is a chat row.
    """
    columns = columns or {}
    msg_col = columns.get("messages", "messages")
    case_col = columns.get("case", "case")
    if msg_col in row and case_col not in row:
        return {"messages": _messages(row[msg_col], where, msg_col), "where": where}
    out = {k: require_str(row, columns.get(k, k), where) for k in SFT_FIELDS}
    return {**out, "where": where}


def _source_rows(source) -> list[dict[str, Any]]:
    """Validated SFT examples of one recipe source (gazal.config.SFTSource)."""
    columns = {**HUB_SFT_PRESETS.get(source.path, {}), **source.columns}
    path = _resolve(source.path)
    if path is not None:
        rows = [sft_example(row, where, columns) for where, row in read_rows(path)]
    else:
        hub = _hub_dataset(source.path, source.config, source.split, source.revision)
        rows = [sft_example(row, f"{source.path}[{i}]", columns) for i, row in enumerate(hub)]
    return rows[:source.limit] if source.limit else rows


def load_sft_mixture(sources, seed: int = 42, limit: int | None = None, validation_fraction: float = 0.0,
                     loaded: dict[str, list[dict[str, Any]]] | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and validation examples from weighted sources (gazal.config.SFTSource).

    Each source is split before weighting, so an upsampled row can never sit on both sides. A
    weight w uses every row floor(w) times plus a seeded random fraction w - floor(w) of them.
    `loaded` holds the rows of sources read elsewhere (the PubMedQA pool, gazal.pubmedqa), by path.
    """
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    for source in sources:
        if loaded and source.path in loaded:
            rows = list(loaded[source.path])
            rows = rows[:source.limit] if source.limit else rows
        else:
            rows = _source_rows(source)
        rng.shuffle(rows)
        n_val = round(len(rows) * validation_fraction)
        if validation_fraction and n_val == 0 and len(rows) > 1:
            n_val = 1
        validation += rows[:n_val]
        rows = rows[n_val:]
        whole = int(source.weight)
        train += rows * whole + rng.sample(rows, round((source.weight - whole) * len(rows)))
        log.info("sft source %s: %d rows, weight %g, %d held out", source.path, len(rows) + n_val, source.weight, n_val)
    rng.shuffle(train)
    if limit:
        train = train[:limit]
    if not train:
        raise GazalError("data.sft: the mixture has no training rows")
    return train, validation


def load_sft_rows(spec: str, limit: int | None = None) -> list[dict[str, Any]]:
    """SFT examples of one source (a seed set, a local file, or a hub dataset), in file order."""
    from gazal.config import SFTSource

    rows = _source_rows(SFTSource(path=spec))
    return rows[:limit] if limit else rows


def load_grpo_items(spec: str, limit: int | None = None) -> list[Item]:
    """Multiple-choice questions {question, options, answer} from a seed set, JSONL, or the hub."""
    path = _resolve(spec)
    if path is not None:
        items = [mcq_item(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]
    elif spec in HUB_GRPO_SHAPES:
        items = _mixed_mcq_items(spec, HUB_GRPO_SHAPES[spec])
    else:
        items = [mcq_item(hub_mcq_row(row), f"{spec}[{i}]") for i, row in enumerate(_hub_rows(spec, ("question", "answer")))]
    return items[:limit] if limit else items


def ii_medical_rl_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """An Intelligent-Internet/II-Medical-RL row (question, options as one string, label, answer
    text, reasoning, ...) in Gazal's shape, or None when it is not multiple choice (the set also
    holds open questions). Options come as "A. text" lines (after an "Answer Choices:" heading), or
    as a JSON / Python literal dict or list; the gold letter is `label`, else the option whose text
    is `answer`."""
    raw, options = row.get("options"), None
    if isinstance(raw, dict):
        options = raw
    elif isinstance(raw, str) and raw.strip():
        try:
            parsed = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)):
            options = {chr(ord("A") + i): str(o) for i, o in enumerate(parsed)}
        elif isinstance(parsed, dict):
            options = {str(k).strip(): str(v) for k, v in parsed.items()}
        else:
            options = {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(raw)} or None
    if not options or len(options) < 2:
        return None
    label = str(row.get("label") or "").strip().strip("().").upper()
    if label not in options:
        text = str(row.get("answer") or "").strip().lower()
        label = next((k for k, v in options.items() if v.strip().lower() == text), label)
    return {"id": f"{row.get('dataset_name', 'ii')}-{row.get('id_in_dataset', '')}", "question": row.get("question"),
            "options": options, "answer": label}


# Hub RL sets whose rows need their own reading (and may hold rows that are not multiple choice).
HUB_GRPO_SHAPES = {"Intelligent-Internet/II-Medical-RL": ii_medical_rl_row}


def _mixed_mcq_items(name: str, shape) -> list[Item]:
    """The multiple-choice rows of a mixed hub set; the others are counted and skipped, and a row
    that claims options but does not parse (a label that is not an option) is an error naming it."""
    ds = _hub_dataset(name)
    items, skipped = [], 0
    for i, row in enumerate(ds):
        mapped = shape(row)
        if mapped is None:
            skipped += 1
            continue
        items.append(mcq_item(mapped, f"{name}[{i}]"))
    log.info("%s: %d multiple-choice questions, %d rows without options skipped", name, len(items), skipped)
    if not items:
        raise GazalError(f"{name}: no multiple-choice rows (question, options, label) found")
    return items


_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.):]\s+(.+?)\s*$", re.MULTILINE)


def hub_mcq_row(row: dict[str, Any]) -> dict[str, Any]:
    """A hub multiple-choice row in Gazal's {question, options, answer} shape.

    Options come as a letter -> text dict, as a list (lettered A, B, ...), or, as in
    TachyHealth/medical_grpo (question and answer-letter columns), as "A. text" lines at the end of
    the question, which are split off. An answer such as "#### B" or "B." is reduced to its letter.
    """
    question, options = row.get("question"), row.get("options")
    if isinstance(options, list):
        options = {chr(ord("A") + i): o for i, o in enumerate(options)}
    elif not isinstance(options, dict) and isinstance(question, str):
        lines = list(_OPTION_LINE.finditer(question))
        if len(lines) >= 2:
            options = {m.group(1): m.group(2) for m in lines}
            question = question[:lines[0].start()].strip()
    answer = row.get("answer")
    if isinstance(answer, str):
        m = re.fullmatch(r"\s*(?:#+\s*)?\(?([A-J])\)?[.)]?\s*", answer)
        answer = m.group(1) if m else answer
    return {**row, "question": question, "options": options, "answer": answer}


# How to do without the hub, for the offline error (gazal.hub).
DATASET_ALTERNATIVE = ("point the recipe's data source at a local copy (data.sft.N.path=/path/to/file.jsonl or "
                       ".parquet, data.grpo=/path/to/file.jsonl; pubmedqa:train reads pubmedqa_train.jsonl from "
                       "eval.benchmarks_dir or $GAZAL_BENCHMARKS_DIR), or a folder laid out like the hub repository")


def _hub_dataset(name: str, config: str | None = None, split: str = "train", revision: str | None = None,
                 data_dir: str | None = None):
    """A hub dataset split (or a local folder laid out like one); fails plainly when it cannot be loaded,
    and at once when the hub is unreachable and the split is not cached (gazal.hub)."""
    from gazal import hub

    try:
        return hub.load_dataset(name, config, split, revision, data_dir, DATASET_ALTERNATIVE)
    except hub.HubUnavailable:
        raise
    except Exception as exc:  # network, auth, missing repo: all mean "cannot load this source"
        raise GazalError(f"{name}: not a local file and could not be loaded from the hub ({type(exc).__name__}: {exc})") from None


def _hub_rows(name: str, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a hub dataset's train split that must have `columns`."""
    ds = _hub_dataset(name)
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
