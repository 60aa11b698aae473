"""`gazal validate` reads the data a recipe names, with the loaders' own row checks, before anything
trains: a malformed JSON line, a missing or empty field, a gold answer that is not an option is
refused naming file, line and field, as `gazal sft` or `gazal grpo` would refuse it hours later.

Each file is read in one streaming pass (rows are checked and dropped, not kept), so a large file
costs its reading time, not its size in memory. Hub sources are not downloaded: what validation
could not check is said, not skipped silently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from gazal import data, pubmedqa
from gazal.config import Recipe
from gazal.errors import GazalError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    """What validation did with one data source of the recipe."""

    key: str  # the recipe key, e.g. data.sft.0
    source: str
    rows: int | None  # None: not read (a hub source)
    seconds: float
    note: str = ""

    def line(self) -> str:
        if self.rows is None:
            return f"{self.key}: {self.source}: not checked ({self.note})"
        return f"{self.key}: {self.source}: {self.rows:,} rows checked in {self.seconds:.3f} s{self.note}"


def _sft_rows(source) -> int:
    columns = {**data.HUB_SFT_PRESETS.get(source.path, {}), **source.columns}
    n = 0
    for where, row in data.read_rows(data._resolve(source.path)):
        data.sft_example(row, where, columns)
        n += 1
    return n


def _grpo_rows(path: Path) -> int:
    n = 0
    for lineno, row in data.read_jsonl(path):
        data.mcq_item(row, f"{path}:{lineno}")
        n += 1
    return n


def check_data(recipe: Recipe) -> list[Checked]:
    """Read every local data source of the recipe's enabled stages with the loaders' checks; a
    GazalError names the recipe key, the file, the line and the field of the first bad row."""
    out = []
    sources = [(f"data.sft.{i}", s) for i, s in enumerate(recipe.data.sft)] if recipe.sft.enabled else []
    for key, source in sources:
        start = time.perf_counter()
        if pubmedqa.is_pool(source.path):
            continue  # recipes.check has loaded the pool already (and refused test items in it)
        if data._resolve(source.path) is None:
            out.append(Checked(key, source.path, None, 0.0, "a hub dataset: not downloaded by validate; its rows are "
                                                              "checked when `gazal sft` loads them"))
            continue
        try:
            n = _sft_rows(source)
        except GazalError as exc:
            raise GazalError(f"{key}: {exc}") from None
        out.append(Checked(key, source.path, n, time.perf_counter() - start))
    spec = recipe.data.grpo
    if recipe.grpo.enabled and not pubmedqa.is_pool(spec):
        start = time.perf_counter()
        path = data._resolve(spec)
        if path is None:
            out.append(Checked("data.grpo", spec, None, 0.0, "a hub dataset: not downloaded by validate; its rows are "
                                                              "checked when `gazal grpo` loads them"))
        else:
            try:
                n = _grpo_rows(path)
            except GazalError as exc:
                raise GazalError(f"data.grpo: {exc}") from None
            out.append(Checked("data.grpo", spec, n, time.perf_counter() - start))
    return out
