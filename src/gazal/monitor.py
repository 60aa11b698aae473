"""Training metrics written to the run directory as they are logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback


class JsonlMetrics(TrainerCallback):
    """Append every trainer log (loss, lr, rewards/<name>/mean, ...) to metrics.jsonl, one line per log."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": state.epoch}
        for key, value in logs.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # JSON has no NaN; keep it visible instead of dropping it
            row[key] = value
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl (empty when the stage logged nothing)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
