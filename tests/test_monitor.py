"""The GRPO monitor: every rule fires on a stream built to trigger it and stays quiet on a healthy one."""

import json
import math
import random

import pytest
import torch

from gazal import recipes
from gazal.config import MonitorSettings
from gazal.monitor import RULES, Monitor, MonitorCallback


def healthy(steps: int = 30, seed: int = 0) -> list[dict]:
    """A run that is learning: accuracy and format up together, stable length, entropy, KL, grads."""
    rng = random.Random(seed)
    rows = []
    for t in range(steps):
        acc = min(0.9, 0.3 + 0.02 * t) + rng.uniform(-0.03, 0.03)
        fmt = min(1.0, 0.5 + 0.02 * t) + rng.uniform(-0.03, 0.03)
        rows.append({
            "loss": 0.01 + rng.uniform(-0.005, 0.005), "grad_norm": 0.5 + rng.uniform(-0.1, 0.1),
            "reward": acc + 0.5 * fmt, "rewards/accuracy/mean": acc, "rewards/format/mean": fmt,
            "rewards/repetition/mean": -0.05 + rng.uniform(-0.01, 0.01),
            "gazal/hedge_rate": 0.02 + rng.uniform(-0.01, 0.01), "gazal/no_answer_rate": 0.1 + rng.uniform(-0.02, 0.02),
            "gazal/format_failure_rate": max(0.0, 0.5 - 0.02 * t) + rng.uniform(-0.02, 0.02),
            "completions/mean_length": 200 + rng.uniform(-15, 15), "completions/clipped_ratio": 0.05,
            "frac_reward_zero_std": 0.2 + rng.uniform(-0.1, 0.1), "entropy": 0.8 + rng.uniform(-0.05, 0.05),
            "kl": 0.01 + rng.uniform(-0.003, 0.003), "gazal/accuracy_zero_std_frac": 0.4 + 0.1 * math.sin(t + seed),
        })
    return rows


def _break(rows: list[dict], start: int, **changes) -> list[dict]:
    """From `start` on, each key's value becomes fn(step since start, old value)."""
    out = []
    for t, row in enumerate(rows):
        row = dict(row)
        if t >= start:
            for key, fn in changes.items():
                row[key] = fn(t - start, row[key])
        out.append(row)
    return out


def fired(rows: list[dict], settings: MonitorSettings | None = None) -> set[str]:
    monitor = Monitor(settings or MonitorSettings())
    return {e.rule for t, row in enumerate(rows) for e in monitor.observe(t + 1, row)}


ACC_FLAT = {"rewards/accuracy/mean": lambda k, v: 0.5}
BROKEN = {
    "reward_hacking": _break(healthy(), 10, **ACC_FLAT, **{"rewards/format/mean": lambda k, v: min(1.0, 0.6 + 0.1 * k),
                                                            "reward": lambda k, v: 0.5 + 0.5 * min(1.0, 0.6 + 0.1 * k)}),
    "hedge_rate_rising": _break(healthy(), 10, **{"gazal/hedge_rate": lambda k, v: min(0.8, 0.02 + 0.08 * k)}),
    "no_answer_rate_rising": _break(healthy(), 10, **{"gazal/no_answer_rate": lambda k, v: min(0.9, 0.1 + 0.08 * k)}),
    "format_failure_rising": _break(healthy(), 10, **{"gazal/format_failure_rate": lambda k, v: min(1.0, 0.3 + 0.1 * k)}),
    "length_collapse": _break(healthy(), 10, **{"completions/mean_length": lambda k, v: max(12.0, 200 - 25 * k)}),
    "length_explosion": _break(healthy(), 10, **{"completions/mean_length": lambda k, v: 200 + 60 * k}),
    "repetition_rising": _break(healthy(), 10, **{"rewards/repetition/mean": lambda k, v: max(-1.0, -0.05 - 0.08 * k)}),
    "zero_std": _break(healthy(), 10, frac_reward_zero_std=lambda k, v: 1.0),
    "accuracy_zero_std": _break(healthy(), 10, **{"gazal/accuracy_zero_std_frac": lambda k, v: 0.95}),
    "entropy_collapse": _break(healthy(), 10, entropy=lambda k, v: max(0.02, 0.8 - 0.1 * k)),
    "entropy_blowup": _break(healthy(), 10, entropy=lambda k, v: 0.8 + 0.3 * k),
    "kl_spike": _break(healthy(), 12, kl=lambda k, v: 0.5 if k == 0 else v),
    "grad_norm_spike": _break(healthy(), 12, grad_norm=lambda k, v: 40.0 if k == 0 else v),
    "nan_loss": _break(healthy(), 12, loss=lambda k, v: math.nan if k == 0 else v),
}


def test_every_rule_has_a_breaking_stream():
    assert set(BROKEN) == set(RULES)


@pytest.mark.parametrize("seed", range(5))
def test_quiet_on_healthy_streams(seed):
    assert fired(healthy(40, seed)) == set()


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_each_rule_fires_on_its_stream(rule):
    assert rule in fired(BROKEN[rule])
    # ... and only where the stream breaks: nothing fires on the healthy part before it.
    assert fired(BROKEN[rule][:10]) == set()


def test_an_episode_is_reported_once():
    monitor = Monitor(MonitorSettings())
    events = [e for t, row in enumerate(BROKEN["zero_std"]) for e in monitor.observe(t + 1, row)]
    assert [e.rule for e in events] == ["zero_std"]


def test_thresholds_and_actions_come_from_the_recipe():
    recipe = recipes.load_recipe("demo", ["grpo.monitor.length_low=0.9", "grpo.monitor.actions={length_collapse: stop}"])
    mild = _break(healthy(), 10, **{"completions/mean_length": lambda k, v: 160.0})  # 0.8 x start
    assert "length_collapse" not in fired(mild)
    monitor = Monitor(recipe.grpo.monitor)
    events = [e for t, row in enumerate(mild) for e in monitor.observe(t + 1, row)]
    assert [(e.rule, e.action) for e in events] == [("length_collapse", "stop")]
    with pytest.raises(Exception, match="grpo.monitor.actions"):
        recipes.load_recipe("demo", ["grpo.monitor.actions={length_collapse: explode}"])


class _State:
    def __init__(self, step):
        self.global_step, self.is_world_process_zero = step, True


class _Control:
    should_training_stop = False


def test_stop_action_stops_training_and_records_the_event(tmp_path):
    settings = MonitorSettings(actions={"zero_std": "stop"})
    cb = MonitorCallback(settings, tmp_path / "events.jsonl")
    control = _Control()
    for t, row in enumerate(BROKEN["zero_std"]):
        cb.on_log(None, _State(t + 1), control, logs=row)
        if control.should_training_stop:
            break
    assert cb.stopped.rule == "zero_std"
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert rows == [{"step": cb.stopped.step, "rule": "zero_std", "action": "stop", "message": cb.stopped.message}]


def _trained(tmp_path, steps: int):
    """A real trainer on the tiny model, trained `steps` steps with a checkpoint after each."""
    from gazal.data import load_sft_mixture
    from gazal.models import TINY_QWEN3, load_tokenizer, resolve_model
    from gazal.sft import build_trainer, to_chat

    recipe = recipes.load_recipe("demo", ["model.name_or_path=gazal:tiny-qwen3", "sft.max_length=1536",
                                         "sft.learning_rate=1e-2", f"sft.max_steps={steps}", "sft.save_steps=1",
                                         "sft.save_total_limit=null", "sft.per_device_train_batch_size=1",
                                         "sft.lr_scheduler_type=linear"])
    rows, _ = load_sft_mixture(recipe.data.sft, seed=0, limit=2)
    base = resolve_model(TINY_QWEN3)
    trainer = build_trainer(recipe, tmp_path, base, load_tokenizer(base), [to_chat(r, None) for r in rows], [])
    trainer.train()
    return trainer


def _adapter_matches(params: dict, saved: dict) -> bool:
    return all(torch.equal(p.detach(), saved[n.replace(".default", "").replace("lora_magnitude_vector.weight",
                                                                                "lora_magnitude_vector")])
               for n, p in params.items())


def test_rollback_restores_adapter_optimizer_and_scheduler_through_the_trainer(tmp_path):
    # A real trainer with two checkpoints; rolling back at step 2 must bring back checkpoint-1
    # exactly, through the trainer's own checkpoint loading (training.restore_checkpoint).
    from safetensors.torch import load_file

    from gazal.training import restore_checkpoint

    trainer = _trained(tmp_path, 2)
    model, optimizer, scheduler = trainer.model, trainer.optimizer, trainer.lr_scheduler
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    saved = load_file(ckpt / "adapter_model.safetensors")
    saved_opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    lr_at_1 = saved_opt["param_groups"][0]["lr"]

    cb = MonitorCallback(MonitorSettings(actions={"nan_loss": "rollback"}), tmp_path / "events.jsonl")
    cb.restore = lambda path: restore_checkpoint(trainer, path)

    class Args:
        output_dir = str(tmp_path / "checkpoints")

    for t, row in enumerate(BROKEN["nan_loss"][:13]):
        cb.on_log(Args, _State(2 if t == 12 else 1), _Control(), logs=row, optimizer=optimizer, lr_scheduler=scheduler)
    assert [r["restored"] for r in cb.rollbacks] == [str(ckpt)] and cb.stopped is None
    # The same parameter objects (the optimizer still points at them), now holding checkpoint-1's values.
    assert {n: p for n, p in model.named_parameters() if p.requires_grad} == params
    moved = 0
    for name, p in params.items():
        key = name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
        assert torch.equal(p.detach(), saved[key]), name
        moved += not torch.equal(p.detach(), before[name])
    assert moved > 0  # step 2 had changed them
    state = optimizer.state_dict()["state"]
    assert state.keys() == saved_opt["state"].keys()
    for i in state:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[i][k], saved_opt["state"][i][k]), (i, k)
    assert scheduler.last_epoch == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr_at_1)
    assert scheduler.base_lrs == [pytest.approx(0.5 * 1e-2)] * len(scheduler.base_lrs)


def test_rollback_without_a_checkpoint_stops(tmp_path):
    cb = MonitorCallback(MonitorSettings(actions={"nan_loss": "rollback"}), tmp_path / "events.jsonl")

    class Args:
        output_dir = str(tmp_path)

    control = _Control()
    for t, row in enumerate(BROKEN["nan_loss"][:13]):
        cb.on_log(Args, _State(t + 1), control, logs=row, optimizer=None, lr_scheduler=None)
    assert control.should_training_stop and cb.stopped.rule == "nan_loss" and "no earlier checkpoint" in cb.stopped.message


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _checkpoints(folder, *steps):
    for n in steps:
        (folder / f"checkpoint-{n}").mkdir(parents=True)
        (folder / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")


def test_rollback_forgets_the_history_after_the_checkpoint(tmp_path):
    # Rows logged after the restored checkpoint describe weights that no longer exist; the rule
    # that rolled back is no longer "reported", so it can fire again.
    _checkpoints(tmp_path, 4)
    restored = []
    cb = MonitorCallback(MonitorSettings(actions={"nan_loss": "rollback"}), tmp_path / "events.jsonl")
    cb.restore = restored.append

    class Args:
        output_dir = str(tmp_path)

    for t, row in enumerate(BROKEN["nan_loss"][:13]):
        cb.on_log(Args, _State(t + 1), _Control(), logs=row)
    assert restored == [str(tmp_path / "checkpoint-4")]
    assert [h["step"] for h in cb.monitor.history] == [1, 2, 3, 4] and "nan_loss" not in cb.monitor.active


def test_no_rollback_budget_stops_at_once(tmp_path):
    _checkpoints(tmp_path, 4)
    restored = []
    cb = MonitorCallback(MonitorSettings(actions={"nan_loss": "rollback"}, max_rollbacks=0), tmp_path / "events.jsonl")
    cb.restore = restored.append

    class Args:
        output_dir = str(tmp_path)

    control = _Control()
    for t, row in enumerate(BROKEN["nan_loss"][:13]):
        cb.on_log(Args, _State(t + 1), control, logs=row)
    assert restored == [] and control.should_training_stop and "max_rollbacks is 0" in cb.stopped.message
    assert [(e["rule"], e["action"]) for e in _events(tmp_path / "events.jsonl")] == [("nan_loss", "stop")]


def test_a_recurring_fault_rolls_back_again_until_max_rollbacks_then_stops(tmp_path):
    # A real trainer with three checkpoints. NaN at step 2 rolls back to checkpoint-1; NaN again at
    # step 3 rolls back again (to checkpoint-2, learning rate lowered once more); with the budget of
    # 2 spent, NaN at step 4 stops training without touching the weights.
    from safetensors.torch import load_file

    from gazal.training import restore_checkpoint

    trainer = _trained(tmp_path, 3)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    folder = tmp_path / "checkpoints"
    calls = []
    cb = MonitorCallback(MonitorSettings(actions={"nan_loss": "rollback"}), tmp_path / "events.jsonl")
    assert cb.monitor.settings.max_rollbacks == 2
    cb.restore = lambda path: (calls.append(path), restore_checkpoint(trainer, path))

    class Args:
        output_dir = str(folder)

    control = _Control()
    stream = BROKEN["nan_loss"]  # healthy up to row 12, NaN loss at row 12
    for row in stream[:12]:
        cb.on_log(Args, _State(1), control, logs=row, optimizer=optimizer, lr_scheduler=scheduler)
    cb.on_log(Args, _State(2), control, logs=stream[12], optimizer=optimizer, lr_scheduler=scheduler)
    assert calls == [str(folder / "checkpoint-1")]
    assert _adapter_matches(params, load_file(folder / "checkpoint-1" / "adapter_model.safetensors"))
    with torch.no_grad():  # training goes on and moves the weights, then the loss is NaN again
        for p in params.values():
            p.add_(0.1)
    cb.on_log(Args, _State(3), control, logs=stream[12], optimizer=optimizer, lr_scheduler=scheduler)
    assert calls == [str(folder / "checkpoint-1"), str(folder / "checkpoint-2")] and not control.should_training_stop
    assert _adapter_matches(params, load_file(folder / "checkpoint-2" / "adapter_model.safetensors"))
    lr_at_2 = torch.load(folder / "checkpoint-2" / "optimizer.pt", weights_only=True)["param_groups"][0]["lr"]
    assert lr_at_2 > 0 and optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * lr_at_2)
    assert scheduler.base_lrs == [pytest.approx(0.25 * 1e-2)] * len(scheduler.base_lrs)

    cb.on_log(Args, _State(4), control, logs=stream[12], optimizer=optimizer, lr_scheduler=scheduler)
    assert len(calls) == 2 and control.should_training_stop
    assert cb.stopped.rule == "nan_loss" and "max_rollbacks is 2" in cb.stopped.message
    assert _adapter_matches(params, load_file(folder / "checkpoint-2" / "adapter_model.safetensors"))
    events = _events(tmp_path / "events.jsonl")
    assert [(e["step"], e["action"]) for e in events] == [(2, "rollback"), (3, "rollback"), (4, "stop")]
    assert [r["restored"] for r in cb.rollbacks] == [str(folder / "checkpoint-1"), str(folder / "checkpoint-2")]


def _write_metrics(path, rows_by_step):
    # As JsonlMetrics writes them: the step, then the logs, NaN as a string.
    with path.open("w") as fh:
        for step, row in rows_by_step:
            fh.write(json.dumps({"step": step, **{k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                                                  for k, v in row.items()}}) + "\n")


def test_resume_rebuilds_the_history_from_metrics(tmp_path):
    # A trend rule needs `window` steps of history: resumed at the step before it fires, it fires on
    # the first step after the resume only if the history came back from metrics.jsonl.
    stream = BROKEN["hedge_rate_rising"]
    monitor = Monitor(MonitorSettings())
    first = next(t for t, row in enumerate(stream) if monitor.observe(t + 1, row))
    assert first >= MonitorSettings().window
    assert fired(stream[first:first + 1]) == set()  # on an empty history it would not fire
    metrics = tmp_path / "metrics.jsonl"
    # Rows after the checkpoint (step `first`) would make the rule "already reported"; an evaluation
    # row is not a training step.
    _write_metrics(metrics, [(t + 1, row) for t, row in enumerate(stream)] + [(2, {"eval_loss": 1.0})])
    cb = MonitorCallback(MonitorSettings(), tmp_path / "events.jsonl")
    cb.resume(metrics, tmp_path / "events.jsonl", first)
    assert [h["step"] for h in cb.monitor.history] == list(range(1, first + 1))
    assert not (tmp_path / "events.jsonl").exists()  # the history itself emits nothing
    cb.on_log(None, _State(first + 1), _Control(), logs=stream[first])
    assert [e["rule"] for e in _events(tmp_path / "events.jsonl")] == ["hedge_rate_rising"]


def test_resume_keeps_an_episode_reported_and_counts_earlier_rollbacks(tmp_path):
    # Steps 1-12 logged; step 12's NaN rolled back to checkpoint-10 (and checkpoint-12 was saved
    # after it); a rollback at step 14, after the checkpoint the run resumes from, is undone by the
    # resume. The history comes back without steps 11-12, one rollback counts against
    # max_rollbacks=2, and zero_std, firing at the checkpoint, is not reported again.
    folder = tmp_path / "checkpoints"
    _checkpoints(folder, 10, 12)
    stream = _break(BROKEN["nan_loss"], 5, frac_reward_zero_std=lambda k, v: 1.0)
    metrics, events_path = tmp_path / "metrics.jsonl", tmp_path / "events.jsonl"
    _write_metrics(metrics, [(t + 1, row) for t, row in enumerate(stream[:14])])
    kept = [{"step": 9, "rule": "zero_std", "action": "warn", "message": "m"},
            {"step": 12, "rule": "nan_loss", "action": "rollback", "message": "m",
             "restored": str(folder / "checkpoint-10")},
            {"step": 14, "rule": "nan_loss", "action": "rollback", "message": "m",
             "restored": str(folder / "checkpoint-12")}]
    events_path.write_text("".join(json.dumps(e) + "\n" for e in kept) + '{"step": 15, "ru')  # cut by a kill
    restored = []
    cb = MonitorCallback(MonitorSettings(actions={"nan_loss": "rollback"}), events_path)
    cb.restore = restored.append
    cb.resume(metrics, events_path, 12)
    assert [h["step"] for h in cb.monitor.history] == list(range(1, 11))
    assert cb.monitor.active == {"zero_std"} and len(cb.rollbacks) == 1
    assert _events(events_path) == kept[:2]

    class Args:
        output_dir = str(folder)

    control = _Control()
    healthy_row = {**stream[13], "loss": 0.01}
    cb.on_log(Args, _State(13), control, logs=stream[12])  # NaN: rolls back (one of two used)
    assert restored == [str(folder / "checkpoint-12")] and not control.should_training_stop
    cb.on_log(Args, _State(14), control, logs=healthy_row)
    cb.on_log(Args, _State(15), control, logs=stream[12])  # NaN again: the budget is spent
    assert len(restored) == 1 and control.should_training_stop and "max_rollbacks is 2" in cb.stopped.message
    assert [(e["step"], e["rule"], e["action"]) for e in _events(events_path)[2:]] == [
        (13, "nan_loss", "rollback"), (15, "nan_loss", "stop")]
