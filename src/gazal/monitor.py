"""Training metrics written to the run directory, and the GRPO monitor that watches them.

The monitor reads the metrics the trainer logs each step (TRL's `reward`, `rewards/<name>/mean`,
`entropy`, `kl`, `frac_reward_zero_std`, `completions/mean_length`, `grad_norm`, `loss`, and
Gazal's `gazal/*_rate`) and looks for the signatures of reward hacking and instability that the
Gazal-R1 paper and public GRPO runs report. Rules are plain functions over the metric history, so
each can be tested on a synthetic stream; thresholds and actions come from the recipe.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

from gazal import rundir
from gazal.config import MonitorSettings

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------
# Rules: history (oldest first, one dict of metrics per logged step) -> a message when the rule fires.


@dataclass(frozen=True)
class Event:
    """A rule that fired: which, at what step, why, and what the monitor did about it."""

    step: int
    rule: str
    action: str
    message: str


def _series(history: list[dict], key: str) -> list[float]:
    return [float(h[key]) for h in history if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]


def _trend(values: list[float], window: int) -> float | None:
    """Mean of the newer half of the last `window` values minus mean of the older half."""
    if len(values) < window:
        return None
    recent = values[-window:]
    half = window // 2
    return statistics.fmean(recent[half:]) - statistics.fmean(recent[:half])


def reward_hacking(history: list[dict], s: MonitorSettings) -> str | None:
    """Format or total reward rising while accuracy stays flat or falls."""
    acc = _trend(_series(history, "rewards/accuracy/mean"), s.window)
    if acc is None or acc > s.accuracy_flat:
        return None
    for key in ("rewards/format/mean", "reward"):
        rise = _trend(_series(history, key), s.window)
        if rise is not None and rise >= s.proxy_rise:
            return f"{key} rose by {rise:.3f} over {s.window} steps while accuracy changed by {acc:+.3f}"
    return None


def _rate_rising(key: str) -> Callable[[list[dict], MonitorSettings], str | None]:
    def rule(history: list[dict], s: MonitorSettings) -> str | None:
        values = _series(history, key)
        rise = _trend(values, s.window)
        if rise is not None and rise >= s.rate_rise:
            return f"{key} rose by {rise:.3f} over {s.window} steps (now {values[-1]:.3f})"
        return None

    rule.__doc__ = f"{key} rising."
    return rule


def _off_start(history: list[dict], key: str, factor: float, s: MonitorSettings) -> str | None:
    """`key` now against the mean of its first `window` values (what healthy looked like in this run):
    below factor x start when factor < 1, above it when factor > 1."""
    values = _series(history, key)
    if len(values) <= s.window:
        return None
    start, now = statistics.fmean(values[:s.window]), values[-1]
    if (now < factor * start) if factor < 1 else (now > factor * start):
        return f"{key} {now:.4g} is {'below' if factor < 1 else 'above'} {factor:g} x its start ({start:.4g})"
    return None


def length_collapse(history: list[dict], s: MonitorSettings) -> str | None:
    """Mean completion length falling far below its starting level."""
    return _off_start(history, "completions/mean_length", s.length_low, s)


def length_explosion(history: list[dict], s: MonitorSettings) -> str | None:
    """Mean completion length growing far above its starting level, or most completions cut at the limit."""
    clipped = _series(history, "completions/clipped_ratio")
    if clipped and clipped[-1] >= s.clipped_max:
        return f"{clipped[-1]:.0%} of completions hit max_completion_length"
    return _off_start(history, "completions/mean_length", s.length_high, s)


def repetition_rising(history: list[dict], s: MonitorSettings) -> str | None:
    """The repetition penalty growing (its reward falling)."""
    fall = _trend(_series(history, "rewards/repetition/mean"), s.window)
    if fall is not None and -fall >= s.rate_rise:
        return f"repetition penalty grew by {-fall:.3f} over {s.window} steps"
    return None


def zero_std(history: list[dict], s: MonitorSettings) -> str | None:
    """Most groups with identical rewards (no advantage, no gradient) for several steps in a row."""
    values = _series(history, "frac_reward_zero_std")
    if len(values) >= s.patience and all(v >= s.zero_std_max for v in values[-s.patience:]):
        return f"frac_reward_zero_std >= {s.zero_std_max:g} for {s.patience} steps: groups give no learning signal"
    return None


def accuracy_zero_std(history: list[dict], s: MonitorSettings) -> str | None:
    """Most groups all right or all wrong on accuracy for several steps in a row (the trainer logs
    gazal/accuracy_zero_std_frac): accuracy gives them no advantage, so other rewards move the policy."""
    values = _series(history, "gazal/accuracy_zero_std_frac")
    if len(values) >= s.patience and all(v >= s.accuracy_zero_std_max for v in values[-s.patience:]):
        return (f"gazal/accuracy_zero_std_frac >= {s.accuracy_zero_std_max:g} for {s.patience} steps: the groups "
                "teach nothing about correctness (questions too easy or too hard for the policy); the secondary "
                "rewards drive the gradient")
    return None


def entropy_collapse(history: list[dict], s: MonitorSettings) -> str | None:
    """Token entropy falling far below its starting level (the policy has stopped exploring)."""
    return _off_start(history, "entropy", s.entropy_low, s)


def entropy_blowup(history: list[dict], s: MonitorSettings) -> str | None:
    """Token entropy rising far above its starting level (the policy is turning to noise)."""
    return _off_start(history, "entropy", s.entropy_high, s)


def _spike(key: str, factor: float, values: list[float], s: MonitorSettings) -> str | None:
    if len(values) <= s.window:
        return None
    median = statistics.median(values[-s.window - 1:-1])
    if median > 0 and values[-1] > factor * median:
        return f"{key} {values[-1]:.4g} is {values[-1] / median:.1f} x its recent median ({median:.4g})"
    return None


def kl_spike(history: list[dict], s: MonitorSettings) -> str | None:
    """KL to the reference jumping far above its recent level, or above an absolute ceiling."""
    values = _series(history, "kl")
    if values and values[-1] > s.kl_max:
        return f"kl {values[-1]:.4g} is above {s.kl_max:g}"
    return _spike("kl", s.spike_factor, values, s)


def grad_norm_spike(history: list[dict], s: MonitorSettings) -> str | None:
    """Gradient norm jumping far above its recent median."""
    return _spike("grad_norm", s.spike_factor, _series(history, "grad_norm"), s)


def nan_loss(history: list[dict], s: MonitorSettings) -> str | None:
    """A NaN or infinite loss or gradient norm."""
    last = history[-1] if history else {}
    for key in ("loss", "grad_norm"):
        value = last.get(key)
        if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
            value = float(value)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} is {value}"
    return None


RULES: dict[str, Callable[[list[dict], MonitorSettings], str | None]] = {
    "reward_hacking": reward_hacking,
    "hedge_rate_rising": _rate_rising("gazal/hedge_rate"),
    "no_answer_rate_rising": _rate_rising("gazal/no_answer_rate"),
    "format_failure_rising": _rate_rising("gazal/format_failure_rate"),
    "length_collapse": length_collapse,
    "length_explosion": length_explosion,
    "repetition_rising": repetition_rising,
    "zero_std": zero_std,
    "accuracy_zero_std": accuracy_zero_std,
    "entropy_collapse": entropy_collapse,
    "entropy_blowup": entropy_blowup,
    "kl_spike": kl_spike,
    "grad_norm_spike": grad_norm_spike,
    "nan_loss": nan_loss,
}


class Monitor:
    """Feeds each logged step to every rule; a rule that fires reports once, then again only after
    it has been quiet (so one long episode is one event, not one per step)."""

    def __init__(self, settings: MonitorSettings):
        self.settings = settings
        self.history: list[dict] = []  # one row per logged step, its "step" included
        self.active: set[str] = set()  # rules firing on the history (reported already)

    def _firing(self, names) -> set[str]:
        return {name for name in names if self.history and RULES[name](self.history, self.settings)}

    def load(self, history: list[dict]) -> None:
        """Take `history` as already seen (a resumed run): no events; the rules that fire on it count
        as reported, so an episode under way at the checkpoint is not reported again."""
        self.history = [dict(row) for row in history]
        self.active = self._firing(RULES)

    def rewind(self, step: int, rules: set[str] = frozenset()) -> None:
        """A rollback restored the checkpoint of `step`: forget the history after it (it belongs to
        weights that no longer exist) and the episodes it held. `rules` (the ones that rolled back)
        are forgotten in any case, so the fault recurring rolls back again."""
        self.history = [row for row in self.history if row.get("step", 0) <= step]
        self.active = self._firing(self.active - set(rules))

    def observe(self, step: int, metrics: dict) -> list[Event]:
        self.history.append({**metrics, "step": step})
        events = []
        for name, rule in RULES.items():
            message = rule(self.history, self.settings)
            if message is None:
                self.active.discard(name)
            elif name not in self.active:
                self.active.add(name)
                events.append(Event(step, name, self.settings.actions.get(name, "warn"), message))
        return events


def _is_training_step(logs: dict) -> bool:
    return "loss" in logs or "reward" in logs  # evaluation or end-of-training summaries are not


def _checkpoint_step(path: str) -> int:
    return int(Path(path).name.rsplit("-", 1)[1])


class MonitorCallback(TrainerCallback):
    """Runs the Monitor on every training log; writes events.jsonl; warns, stops or rolls back
    (at most `max_rollbacks` times in a run; the next rollback stops it)."""

    def __init__(self, settings: MonitorSettings, events_path: Path):
        self.monitor = Monitor(settings)
        self.path = Path(events_path)
        self.stopped: Event | None = None
        self.rollbacks: list[dict] = []
        # Loads a checkpoint's adapter, optimizer and scheduler into the running trainer (set by the
        # stage: `training.restore_checkpoint`, which knows DeepSpeed, FSDP and plain checkpoints).
        self.restore: Callable[[str], None] | None = None

    def _write(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def resume(self, metrics_path: Path, events_path: Path, step: int) -> None:
        """Pick up a run resumed from the checkpoint of `step`: the history comes back from its
        metrics.jsonl (training steps up to `step`, less those a rollback undid), the rollbacks
        recorded in its events.jsonl count against max_rollbacks, and events after `step` are dropped
        from it (the resumed run logs those steps again). Emits no events."""
        def rows(path: Path) -> list[dict]:
            if not Path(path).is_file():
                return []
            lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
            return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]  # not a cut line

        events = [e for e in rows(events_path) if e.get("step", 0) <= step]
        undone = [(_checkpoint_step(e["restored"]), e["step"]) for e in events
                  if e.get("action") == "rollback" and "restored" in e]
        self.monitor.load([m for m in rows(metrics_path) if _is_training_step(m) and m.get("step", 0) <= step
                           and not any(low < m.get("step", 0) <= high for low, high in undone)])
        self.monitor.active -= {e["rule"] for e in events if e.get("action") == "rollback" and e["step"] == step}
        self.rollbacks.extend(e for e in events if e.get("action") == "rollback" and "restored" in e)
        if rundir.is_main_process() and Path(events_path).is_file():
            rundir.write_text(Path(events_path), "".join(json.dumps(e) + "\n" for e in events))
        log.info("monitor: resumed with %d steps of history and %d rollback(s)", len(self.monitor.history),
                 len(self.rollbacks))

    def _roll_back(self, row: dict, args, state, optimizer, lr_scheduler) -> str | None:
        """Restore the newest earlier checkpoint for the event in `row`; None (and `row` turned into a
        stop) when the rollback budget is spent or there is no checkpoint."""
        limit = self.monitor.settings.max_rollbacks
        if len(self.rollbacks) >= limit:
            restored, why = None, f"{len(self.rollbacks)} rollback(s) already, max_rollbacks is {limit}"
        else:
            restored = rollback(args.output_dir, state.global_step, self.restore, optimizer, lr_scheduler,
                                self.monitor.settings.rollback_lr_factor)
            why = "no earlier checkpoint to roll back to"
        if restored is None:
            row["action"] = "stop"
            row["message"] += f"; {why}, stopping"
        else:
            row["restored"] = restored
            self.rollbacks.append(row)
        return restored

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if not logs or not _is_training_step(logs):
            return
        restored, rolled_back = None, set()
        for event in self.monitor.observe(state.global_step, logs):
            row = asdict(event)
            log.warning("monitor: step %d %s: %s (action: %s)", event.step, event.rule, event.message, event.action)
            if event.action == "rollback":
                if restored is None:
                    restored = self._roll_back(row, args, state, optimizer, lr_scheduler)
                else:  # a second rule at the same step: one rollback serves both
                    row["restored"] = restored
                    row["message"] += "; rolled back once for this step"
                rolled_back.add(event.rule)
            if row["action"] == "stop":
                control.should_training_stop = True
                self.stopped = event if event.action == "stop" else Event(**row)
            if state.is_world_process_zero:
                self._write(row)
        if restored is not None:
            self.monitor.rewind(_checkpoint_step(restored), rolled_back)


def rollback(output_dir: str, step: int, restore: Callable[[str], None], optimizer, lr_scheduler,
             lr_factor: float) -> str | None:
    """Restore adapter, optimizer and scheduler from the newest checkpoint before `step`; scale the LR.

    Returns the checkpoint restored, or None when there is none. Trainer counters keep running
    (the step count is a budget, not a position); the scheduler goes back to the checkpoint's
    position, and the learning rate of every later step is lr_factor x the one in use before the
    rollback (so each further rollback lowers it again, whichever checkpoint it restores). Every
    rank runs this (the monitor sees the same logs everywhere), as sharded loading needs.
    """
    candidates = []
    for path in Path(output_dir).glob("checkpoint-*"):
        n = path.name.rsplit("-", 1)[1]
        if n.isdigit() and int(n) < step and (path / "trainer_state.json").is_file():
            candidates.append((int(n), path))
    if not candidates or restore is None:
        return None
    _, path = max(candidates)
    before = list(lr_scheduler.base_lrs) if lr_scheduler is not None else None
    restore(str(path))  # loads the checkpoint's scheduler too: its base_lrs, and the lr at its position
    scale = [lr_factor] * len(optimizer.param_groups) if optimizer is not None else []
    if lr_scheduler is not None:
        target = [lr * lr_factor for lr in before]
        scale = [t / loaded if loaded else lr_factor for t, loaded in zip(target, lr_scheduler.base_lrs)]
        lr_scheduler.base_lrs = target
    if optimizer is not None:
        for group, factor in zip(optimizer.param_groups, scale):
            group["lr"] *= factor
    log.warning("monitor: rolled back to %s with learning rate x %g", path, lr_factor)
    return str(path)
