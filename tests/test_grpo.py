"""GRPO stage on the tiny Qwen3: adapter modes, samples, monitor stop, checkpoints and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gazal.generation
from gazal import rundir
from gazal.advantages import gate_on_accuracy, neutral_skips
from gazal.cli import main
from gazal.recipes import load_recipe

TINY = [
    "model.name_or_path=gazal:tiny-qwen3",
    "data.sft_limit=6",
    "data.grpo_limit=8",
    "sft.max_steps=2",
    "sft.max_length=1536",
    "sft.learning_rate=1e-2",
    "sft.warmup_steps=0",
    "grpo.max_completion_length=12",
    "grpo.learning_rate=1e-2",
    "grpo.rewards=[{name: accuracy}, {name: format}, {name: 'tiny_rewards:length', weight: 1.0}]",
    "grpo.skip_reward_audit=true",
    # The group of 4 in one micro-batch: the same step as the demo's 1 x 4 (tested below), fewer forwards.
    "grpo.per_device_train_batch_size=4",
    "grpo.gradient_accumulation_steps=1",
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "base"
    assert main(["sft", "--config", "demo", "--run-dir", str(out), *TINY]) == 0
    return out


def _copy_sft(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "sft", dst / "sft")
    return dst


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_continue_mode_trains_the_sft_adapter_itself(sft_run, tmp_path, monkeypatch):
    weight_first = []
    real = gazal.generation._weight_first_linear
    monkeypatch.setattr(gazal.generation, "_weight_first_linear",
                        lambda self, x: weight_first.append(x.shape) or real(self, x))
    run = _copy_sft(sft_run, tmp_path / "r")
    assert main(["grpo", "--config", "demo", "--run-dir", str(run), *TINY, "grpo.adapter=continue",
                 "grpo.max_steps=2", "grpo.samples_every=1"]) == 0
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    assert summary["adapter"] == "continue" and summary["parameters"]["frozen_tensors_changed"] == 0
    # Both steps' rollouts went through Gazal's merged-weight generate: this fails if TRL stops
    # calling the overridden _generate_single_turn, or stops generating through model.generate.
    assert summary["merged_rollout_generations"] == 2
    # ...and decoded with generation.weight_first_decode (the group's completions are 2-4 rows).
    assert weight_first
    sft_adapter = load_file(run / "sft" / "adapter" / "adapter_model.safetensors")
    grpo_adapter = load_file(run / "grpo" / "adapter" / "adapter_model.safetensors")
    assert set(sft_adapter) == set(grpo_adapter)  # the same adapter, trained further
    assert any(not torch.equal(sft_adapter[k], grpo_adapter[k]) for k in sft_adapter)
    # The base it continued on is the original model, not the merged SFT model.
    assert "sft/merged" not in summary["base_model"]
    # Rollout samples: every step, each completion with each reward component.
    samples = _rows(run / "grpo" / "samples.jsonl")
    assert {r["step"] for r in samples} == {1, 2}
    assert all(set(r["rewards"]) == {"accuracy", "format", "length"} and r["completion"] is not None for r in samples)
    assert "| advantage |" in (run / "grpo" / "samples.md").read_text()
    # Logged by Gazal's _calculate_rewards override (fails if TRL stops calling it); nothing gated.
    steps = [r for r in _rows(run / "grpo" / "metrics.jsonl") if "loss" in r]
    assert all(0.0 <= r["gazal/accuracy_zero_std_frac"] <= 1.0 for r in steps)
    assert summary["groups_gated_on_accuracy"] == 0


def test_gate_on_accuracy_flattens_secondary_rewards_only_where_accuracy_is_constant():
    nan = float("nan")
    # Two groups of 3, columns (accuracy, length, format): group 1 all wrong, group 2 mixed.
    rewards = torch.tensor([[0.0, 0.9, 1.0], [0.0, 0.3, 0.0], [nan, 0.6, 1.0],
                            [1.0, 0.9, 1.0], [0.0, 0.3, 0.0], [0.0, 0.6, 1.0]])
    gated, constant = gate_on_accuracy(rewards, accuracy=0, gated=(1,), size=3)
    assert constant == 0.5
    assert gated[:3, 1].tolist() == pytest.approx([0.6, 0.6, 0.6])  # its group mean: no advantage from it
    assert torch.equal(gated[3:], rewards[3:])  # accuracy varies: untouched
    assert torch.equal(gated[:, 2], rewards[:, 2]) and gated[:, 0].isnan().sum() == 1  # others as they were
    assert gated[:, 1].mean().item() == pytest.approx(rewards[:, 1].mean().item())  # logged mean unchanged
    _, none_constant = gate_on_accuracy(rewards[3:], 0, (1,), 3)
    assert none_constant == 0.0


def test_a_skipped_value_takes_its_group_mean_and_a_wholly_skipped_group_stays_skipped():
    nan = float("nan")
    # Groups of 2, columns (accuracy, judge): the judge timed out once in group 1; group 2 has no gold.
    rewards = torch.tensor([[1.0, 0.8], [0.0, nan], [nan, 0.4], [nan, 0.2]])
    filled = neutral_skips(rewards, 2)
    assert filled[1, 1].item() == pytest.approx(0.8)  # neutral: no advantage from the skip
    assert filled[2:, 0].isnan().all() and torch.equal(filled[2:, 1], rewards[2:, 1])
    assert torch.equal(filled[0], rewards[0])


def test_a_gated_reward_gives_no_advantage_in_groups_whose_accuracy_ties(sft_run, tmp_path):
    run = _copy_sft(sft_run, tmp_path / "r")
    gated = ("grpo.rewards=[{name: accuracy}, {name: format}, "
             "{name: 'tiny_rewards:length', weight: 1.0, only_when_accuracy_varies: true}]")
    assert main(["grpo", "--config", "demo", "--run-dir", str(run), *TINY, gated, "grpo.max_steps=1",
                 "grpo.samples_every=1", "grpo.multi_objective_aggregation=normalize_then_sum"]) == 0
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    # The tiny random model never answers: every group's accuracy ties, so the length reward (which
    # differs between completions) is flattened to its group mean and the advantages are all zero.
    assert summary["groups_gated_on_accuracy"] == 1
    step = [r for r in _rows(run / "grpo" / "metrics.jsonl") if "loss" in r][0]
    assert step["gazal/accuracy_zero_std_frac"] == 1.0 and step["frac_reward_zero_std"] == 1.0
    samples = _rows(run / "grpo" / "samples.jsonl")
    assert len({round(r["rewards"]["length"], 6) for r in samples}) == 1
    assert len({r["completion"] for r in samples}) > 1 and all(r["advantage"] == 0 for r in samples)


def test_one_completion_per_micro_batch_learns_what_one_batch_of_four_does(sft_run, tmp_path):
    # The demo learns from its group of 4 one completion per forward (less memory); TRL's DAPO
    # normaliser spans the whole group, so the step must equal the one-batch step.
    adapters, norms = [], []
    for per_device, accumulation in ((4, 1), (1, 4)):
        run = _copy_sft(sft_run, tmp_path / f"r{per_device}")
        assert main(["grpo", "--config", "demo", "--run-dir", str(run), *TINY, "grpo.max_steps=1",
                     f"grpo.per_device_train_batch_size={per_device}",
                     f"grpo.gradient_accumulation_steps={accumulation}"]) == 0
        adapters.append(load_file(run / "grpo" / "adapter" / "adapter_model.safetensors"))
        norms += [r["grad_norm"] for r in _rows(run / "grpo" / "metrics.jsonl") if "grad_norm" in r]
    # Adam's first step hardly depends on the gradient's scale; its norm does.
    assert len(norms) == 2 and norms[0] > 0 and norms[1] == pytest.approx(norms[0], rel=1e-4)
    one, split = adapters
    assert set(one) == set(split)
    assert all(torch.allclose(one[k], split[k], atol=1e-6) for k in one)
    moved = [k for k in one if "lora_B" in k and one[k].abs().max() > 0]
    assert moved  # the step did learn something (lora_B starts at zero)


def test_new_mode_starts_a_fresh_adapter_on_the_merged_sft_model(sft_run, tmp_path):
    run = _copy_sft(sft_run, tmp_path / "r")
    assert main(["grpo", "--config", "demo", "--run-dir", str(run), *TINY, "grpo.max_steps=2",
                 "grpo.lr_scheduler_type=linear", "grpo.steps_per_generation=2",
                 "grpo.per_device_train_batch_size=4", "grpo.gradient_accumulation_steps=1"]) == 0
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    assert summary["adapter"] == "new" and summary["base_model"].endswith("sft/merged")
    # The adapter's dropout (rate 0 under TRL's disable_dropout) no longer doubles DoRA's base matmuls.
    assert summary["inert_dropout_replaced"] > 0
    p = summary["parameters"]
    assert p["trainable_tensors_changed"] > 0 and p["frozen_tensors_changed"] == 0
    # The recipe's schedule reaches the trainer: linear decay from the peak, not the demo's constant.
    rows = [r for r in _rows(run / "grpo" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["learning_rate"] == pytest.approx(1e-2) and rows[1]["learning_rate"] < rows[0]["learning_rate"]
    # One rollout batch served both steps (steps_per_generation=2): rewards come with the step that sampled it.
    assert "rewards/format/mean" in rows[0] and "rewards/format/mean" not in rows[1]


def test_monitor_stop_ends_the_stage_with_a_clear_message(sft_run, tmp_path, capsys):
    run = _copy_sft(sft_run, tmp_path / "r")
    # A random model almost never stops within 12 tokens: nearly every completion hits the limit,
    # which length_explosion reports once clipped_max is set this low.
    args = ["grpo", "--config", "demo", "--run-dir", str(run), *TINY, "grpo.max_steps=3",
            "grpo.monitor.clipped_max=0.01", "grpo.monitor.actions={length_explosion: stop}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stopped by the monitor at step 1: length_explosion" in err and "events.jsonl" in err
    events = _rows(run / "grpo" / "events.jsonl")
    assert events[0]["rule"] == "length_explosion" and events[0]["action"] == "stop"
    assert not rundir.is_done(run, "grpo")
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    assert summary["stopped_by_monitor"]["rule"] == "length_explosion" and summary["steps"] == 1
    assert main(["report", "--run-dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "stopped by the monitor" in report and "step 1 length_explosion (stop)" in report


def test_grpo_checkpoints_and_resumes(sft_run, tmp_path):
    run = _copy_sft(sft_run, tmp_path / "r")
    args = ["grpo", "--config", "demo", "--run-dir", str(run), *TINY, "grpo.max_steps=4", "grpo.save_steps=2"]
    assert main([*args, "grpo.max_steps=2"]) == 0  # a run that ended at step 2, as if killed after its checkpoint
    (run / "grpo" / "DONE").unlink()
    assert (run / "grpo" / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert main([*args, "--resume"]) == 0
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    steps = [r["step"] for r in _rows(run / "grpo" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_grpo_under_accelerate_launch_with_two_cpu_processes(sft_run, tmp_path):
    run = _copy_sft(sft_run, tmp_path / "ddp")
    # Two processes x 2 completions per pass = one group of 4 per step, sampled across both ranks.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gazal", "grpo", "--config", "demo", *TINY,
           "grpo.max_steps=2", "grpo.per_device_train_batch_size=2", "grpo.samples_every=1", "--run-dir", str(run)]
    # The ranks import the test's reward module (tiny_rewards) from this folder.
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 and summary["merged_rollout_generations"] == 2
    p = summary["parameters"]
    assert p["trainable_tensors_changed"] > 0 and p["frozen_tensors_changed"] == 0
    # Only the main process writes: one metrics row and one samples batch per step, not one per rank.
    metrics = [r for r in _rows(run / "grpo" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in metrics] == [1, 2] and all("rewards/format/mean" in r for r in metrics)
    assert sorted({r["step"] for r in _rows(run / "grpo" / "samples.jsonl")}) == [1, 2]
    assert rundir.is_done(run, "grpo")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampler_logprobs_are_the_merged_weights_and_become_the_old_logprobs(sft_run, tmp_path, monkeypatch, dtype):
    # The loss's "old" log-probs must be those of the merged weights that sampled, position by
    # position (an off-by-one alignment would be far off). In float32 they equal the adapter
    # forward's too; in bfloat16 they do not (the merge rounds differently), which is why they exist.
    # bfloat16 weights turn them on by default; float32 needs the recipe key.
    from gazal.adapters import MergedRollouts
    from gazal.grpo import GazalGRPOTrainer

    gaps = []
    original = GazalGRPOTrainer._compute_loss

    def spy(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        n, peft = inputs["completion_ids"].shape[1], self.accelerator.unwrap_model(model)
        with torch.no_grad():
            learner, _, _ = self._get_per_token_logps_and_entropies(model, ids, mask, n)
            merged = MergedRollouts().generate(peft, lambda: self._get_per_token_logps_and_entropies(peft, ids, mask, n)[0])
        m, old = inputs["completion_mask"].bool(), inputs["old_per_token_logps"]
        gaps.append((float((old - merged)[m].abs().max()), float((old - learner)[m].abs().max())))
        return original(self, model, inputs)

    monkeypatch.setattr(GazalGRPOTrainer, "_compute_loss", spy)
    run = _copy_sft(sft_run, tmp_path / "r")
    key = ["grpo.sampler_logprobs=true"] if dtype == "float32" else []
    assert main(["grpo", "--config", "demo", "--run-dir", str(run), *TINY, "grpo.max_steps=2",
                 f"model.dtype={dtype}", *key]) == 0
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    assert summary["sampler_logprob_batches"] == 2 and summary["merged_rollout_generations"] == 2
    assert len(gaps) == 2 and all(to_merged < 1e-5 for to_merged, _ in gaps), gaps  # one batch of 4 per step
    if dtype == "float32":
        assert all(to_learner < 1e-4 for _, to_learner in gaps), gaps
    else:
        assert any(to_learner > 1e-4 for _, to_learner in gaps), gaps


def test_rewards_read_completions_by_evaluations_decode_rule(sft_run, tmp_path, monkeypatch):
    """The tiny tokenizer makes <think> special: TRL's skip_special_tokens=True decoding would hand
    the format reward '...The answer is A.' without its tags (format 0), evaluation reads the tags.
    Rollouts are replaced by one well-formed completion so the format reward's value tells which
    text the rewards saw (fails if TRL stops calling the _calculate_rewards override)."""
    from gazal.grpo import GazalGRPOTrainer
    from gazal.models import TINY_QWEN3, load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(TINY_QWEN3))
    fixed = tok("<think>fever and cough</think>\nThe answer is A.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert "<think>" not in tok.decode(fixed, skip_special_tokens=True)
    original = GazalGRPOTrainer._generate_single_turn

    def rollout(self, prompt_ids, *args, **kwargs):
        ids, _ = original(self, prompt_ids, *args, **kwargs)
        return [list(fixed) for _ in ids], None

    monkeypatch.setattr(GazalGRPOTrainer, "_generate_single_turn", rollout)
    run = _copy_sft(sft_run, tmp_path / "r")
    assert main(["grpo", "--config", "demo", "--run-dir", str(run), *TINY, "grpo.max_steps=1",
                 "grpo.max_completion_length=32", "grpo.samples_every=1"]) == 0
    step = [r for r in _rows(run / "grpo" / "metrics.jsonl") if "loss" in r][0]
    assert step["rewards/format/mean"] == 1.0
    # The rollout samples show the text that was rewarded.
    assert all(r["completion"].startswith("<think>fever") for r in _rows(run / "grpo" / "samples.jsonl"))


def test_trl_passthrough_and_first_class_keys_reach_the_trainer(sft_run, tmp_path, monkeypatch):
    from gazal.grpo import GazalGRPOTrainer

    seen = {}
    train = GazalGRPOTrainer.train

    def spy(self, *args, **kwargs):
        seen.update(max_grad_norm=self.args.max_grad_norm, top_k=self.args.top_k,
                    level=self.args.importance_sampling_level, weight_decay=self.args.weight_decay)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(GazalGRPOTrainer, "train", spy)
    run = _copy_sft(sft_run, tmp_path / "r")
    assert main(["grpo", "--config", "demo", "--run-dir", str(run), *TINY, "grpo.max_steps=1",
                 "grpo.trl.max_grad_norm=0.5", "grpo.trl.top_k=7", "grpo.importance_sampling_level=sequence",
                 "grpo.loss_type=grpo", "grpo.weight_decay=0.01"]) == 0
    assert seen == {"max_grad_norm": 0.5, "top_k": 7, "level": "sequence", "weight_decay": 0.01}


@pytest.mark.parametrize("override,expected", [
    ("grpo.trl.no_such_field=1", ["grpo.trl.no_such_field", "no field"]),
    ("grpo.trl.max_grad_nrm=1", ["grpo.trl.max_grad_nrm", "closest: max_grad_norm"]),
    ("grpo.trl.learning_rate=1", ["grpo.trl.learning_rate", "grpo.learning_rate"]),
    ("grpo.trl.report_to=wandb", ["grpo.trl.report_to", "logging.report_to"]),
    ("grpo.trl.max_grad_norm=abc", ["grpo.trl.max_grad_norm", "valid number", "abc"]),
    ("sft.trl.neftune_noise_alpha=loud", ["sft.trl.neftune_noise_alpha", "valid number"]),
    ("model.kwargs.torch_dtype=float16", ["model.kwargs.torch_dtype", "model.dtype"]),
    ("grpo.max_grad_norm=0.3 grpo.trl.max_grad_norm=0.5", ["grpo.trl.max_grad_norm", "grpo.max_grad_norm"]),
])
def test_trl_passthrough_refuses_at_validation(override, expected, capsys):
    assert main(["validate", "--config", "demo", *override.split()]) == 2
    err = capsys.readouterr().err
    assert all(piece in err for piece in expected), err


def test_trl_passthrough_accepts_a_real_field(capsys):
    assert main(["validate", "--config", "demo", "grpo.trl.max_grad_norm=0.5", "sft.trl.neftune_noise_alpha=5"]) == 0


@pytest.mark.parametrize("aggregation,scale", [("sum_then_normalize", "group"), ("sum_then_normalize", "batch"),
                                               ("normalize_then_sum", "group")])
def test_the_audits_advantages_are_the_ones_trl_trains_on(sft_run, tmp_path, aggregation, scale):
    # gazal.advantages restates TRL's advantage formula for the reward audit; this fails if TRL's changes.
    import torch

    from gazal.advantages import group_advantages

    run = _copy_sft(sft_run, tmp_path / "r")
    args = [*TINY, "grpo.per_device_train_batch_size=8", "grpo.max_steps=1", "grpo.samples_every=1",
            f"grpo.multi_objective_aggregation={aggregation}", f"grpo.scale_rewards={scale}"]
    assert main(["grpo", "--config", "demo", "--run-dir", str(run), *args]) == 0
    samples = _rows(run / "grpo" / "samples.jsonl")
    assert len(samples) == 8  # two groups of 4 in one batch
    weights = torch.tensor([s.weight for s in load_recipe("demo", args).grpo.rewards], dtype=torch.float64)
    rewards = torch.tensor([list(r["rewards"].values()) for r in samples], dtype=torch.float64)
    ours = group_advantages(rewards, weights, 4, 0, (), aggregation, scale)
    logged = torch.tensor([r["advantage"] for r in samples], dtype=torch.float64)
    assert logged.abs().max() > 0.1  # the lengths differ, so there is something to compare
    assert torch.allclose(ours, logged, atol=1e-4), (ours, logged)
