"""The GRPO monitor: every rule fires on a stream built to trigger it and stays quiet on a healthy one."""

import json
import math
import random

import pytest
import torch

from gazal import config
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
            "kl": 0.01 + rng.uniform(-0.003, 0.003),
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
    recipe = config.load_recipe("demo", ["grpo.monitor.length_low=0.9", "grpo.monitor.actions={length_collapse: stop}"])
    mild = _break(healthy(), 10, **{"completions/mean_length": lambda k, v: 160.0})  # 0.8 x start
    assert "length_collapse" not in fired(mild)
    monitor = Monitor(recipe.grpo.monitor)
    events = [e for t, row in enumerate(mild) for e in monitor.observe(t + 1, row)]
    assert [(e.rule, e.action) for e in events] == [("length_collapse", "stop")]
    with pytest.raises(Exception, match="grpo.monitor.actions"):
        config.load_recipe("demo", ["grpo.monitor.actions={length_collapse: explode}"])


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


def test_rollback_restores_adapter_optimizer_and_scheduler_through_the_trainer(tmp_path):
    # A real trainer with two checkpoints; rolling back at step 2 must bring back checkpoint-1
    # exactly, through the trainer's own checkpoint loading (training.restore_checkpoint).
    from safetensors.torch import load_file

    from gazal import config
    from gazal.data import load_sft_mixture
    from gazal.models import TINY_QWEN3, load_tokenizer, resolve_model
    from gazal.sft import build_trainer, to_chat
    from gazal.training import restore_checkpoint

    recipe = config.load_recipe("demo", ["model.name_or_path=gazal:tiny-qwen3", "sft.max_length=1536",
                                         "sft.learning_rate=1e-2", "sft.max_steps=2", "sft.save_steps=1",
                                         "sft.save_total_limit=null", "sft.per_device_train_batch_size=1",
                                         "sft.lr_scheduler_type=linear"])
    rows, _ = load_sft_mixture(recipe.data.sft, seed=0, limit=2)
    base = resolve_model(TINY_QWEN3)
    trainer = build_trainer(recipe, tmp_path, base, load_tokenizer(base), [to_chat(r, None) for r in rows], [])
    trainer.train()
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
