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


def test_rollback_restores_the_checkpoint_and_lowers_the_learning_rate(tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    from gazal.models import TINY_QWEN3, load_model, resolve_model

    model = get_peft_model(load_model(resolve_model(TINY_QWEN3)),
                           LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    good = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    save_file(good, ckpt / "adapter_model.safetensors")
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text("{}")
    with torch.no_grad():  # training goes bad after the checkpoint
        for p in trainable:
            p.add_(torch.randn_like(p))

    settings = MonitorSettings(actions={"nan_loss": "rollback"})
    cb = MonitorCallback(settings, tmp_path / "events.jsonl")

    class Args:
        output_dir = str(tmp_path)

    for t, row in enumerate(BROKEN["nan_loss"][:13]):
        cb.on_log(Args, _State(t + 1), _Control(), logs=row, model=model, optimizer=optimizer, lr_scheduler=scheduler)
    assert [r["restored"] for r in cb.rollbacks] == [str(ckpt)]
    now = get_peft_model_state_dict(model)
    assert all(torch.equal(now[k], good[k]) for k in good)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4) and scheduler.base_lrs == [pytest.approx(5e-4)]
    assert cb.stopped is None


def test_rollback_without_a_checkpoint_stops(tmp_path):
    cb = MonitorCallback(MonitorSettings(actions={"nan_loss": "rollback"}), tmp_path / "events.jsonl")

    class Args:
        output_dir = str(tmp_path)

    control = _Control()
    for t, row in enumerate(BROKEN["nan_loss"][:13]):
        cb.on_log(Args, _State(t + 1), control, logs=row, model=None, optimizer=None, lr_scheduler=None)
    assert control.should_training_stop and cb.stopped.rule == "nan_loss" and "no earlier checkpoint" in cb.stopped.message
