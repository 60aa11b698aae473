"""Gazal's code on genuinely sharded parameters, with two CPU processes over gloo.

FSDP2: accelerate enables FSDP only on GPU-like devices (`accelerate launch --use_fsdp` on a CPU
silently runs unsharded). tests/sharded_fsdp2.py applies torch's fully_shard directly and calls
Gazal's functions on the shards; tests/fsdp_cpu.py lets accelerate take its FSDP branch on CPU so
that the real trainers save, roll back and resume under FSDP2.

DeepSpeed ZeRO-3: `accelerate launch` with the shipped CPU config runs the real trainers
partitioned (see src/gazal/accelerate/deepspeed_zero3_cpu.yaml for why Gazal's use_cpu matters).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from gazal.cli import main
from gazal.models import TINY_QWEN3, load_model, load_tokenizer, resolve_model

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _torchrun(script: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    resolve_model(TINY_QWEN3)  # built once here, not raced by two ranks
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_fsdp2_shards_merged_rollouts_change_check_and_merge_from_the_gathered_adapter(tmp_path):
    out = tmp_path / "found.json"
    proc = _torchrun(TESTS / "sharded_fsdp2.py", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(out.read_text())
    # Really sharded: every parameter a DTensor, each rank holding half the rows.
    assert found["sharding"] == "fsdp2" and found["all_dtensor"]
    assert found["local_rows"] * 2 == found["full_rows"]
    # Merged rollouts ran on whole weights and sampled what the adapter on whole weights samples.
    assert found["rollout_calls"] == 2 and found["new_tokens"] == 10
    assert found["folded_in_place"] == 14  # every adapted linear (7 a layer x 2), into the gathered buffers
    assert found["tokens_equal"] and found["logits_max_diff"] < 1e-4 < found["adapter_effect"]
    # ... and left the shards bit-exact, still sharded, adapter unmerged.
    assert found["shards_exact_after_rollout"] and found["sharded_after_rollout"] and not found["merged_flag_after"]
    assert found["forward_exact_after_rollout"]  # the forward uses the shards again, bit for bit
    # The change check reads whole values: every adapter tensor moved, no base tensor did.
    p = found["parameters"]
    assert p["trainable_tensors"] == p["trainable_tensors_changed"] == 42 and p["frozen_tensors_changed"] == 0
    assert found["change_check_gathers"] == 0  # ... from each rank's shards, combined by one all-reduce
    # The trainer's save_model, as Gazal installs it under FSDP: only the 42 adapter tensors are
    # gathered (a full state dict gathers every parameter, frozen base included).
    assert found["adapter_only_installed"] and found["adapter_only_saves"] == 1
    assert found["save_gathers"] == 42 < found["full_state_dict_tensors"]
    # The gathered adapter has a single process's keys and shapes, all non-empty and trained; the
    # model merged from it on rank 0 computes what the trained shards compute.
    assert found["saved_keys_match"] and found["saved_shapes_match"] and found["saved_nonempty"]
    assert found["saved_changed"] == found["saved_tensors"] == 42
    assert found["merged_vs_trained_max_diff"] < 1e-4


# DeepSpeed ZeRO-3 through accelerate and the real trainers, on 2 CPU processes over gloo, with the
# shipped CPU config (every tensor partitioned: persistence threshold 0).
ZERO3_CPU = ROOT / "src" / "gazal" / "accelerate" / "deepspeed_zero3_cpu.yaml"
TINY = [
    "model.name_or_path=gazal:tiny-qwen3", "data.sft_limit=8", "data.grpo_limit=8", "sft.max_steps=3",
    "sft.max_length=1536", "sft.learning_rate=1e-2", "sft.per_device_train_batch_size=2", "sft.lora.dropout=0",
    "grpo.max_steps=2", "grpo.max_completion_length=12", "grpo.learning_rate=1e-2",
    "grpo.per_device_train_batch_size=2",  # x 2 processes = one group of 4 per step
    "grpo.sampler_logprobs=true",  # the sampler's log-probs, computed inside TRL's ZeRO-3 gather
    "grpo.rewards=[{name: accuracy}, {name: format}, {name: 'tiny_rewards:length', weight: 1.0}]",
    "grpo.skip_reward_audit=true", "eval.limit=3", "eval.max_new_tokens=8", "eval.batch_size=3",
]


def _launch(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO3_CPU),
           "--main_process_port", "0", "-m", "gazal", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, benchmarks_dir):
    """The same tiny recipe run by `gazal run` under ZeRO-3 (2 processes) and in one plain process."""
    resolve_model(TINY_QWEN3)
    root = tmp_path_factory.mktemp("zero3")
    args = ["--config", "demo", f"eval.benchmarks_dir={benchmarks_dir}", *TINY]
    proc = _launch("run", "--run-dir", str(root / "zero3"), *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # One process samples the whole group of 4 itself.
    assert main(["run", "--run-dir", str(root / "single"), *args, "grpo.per_device_train_batch_size=4"]) == 0
    return root / "zero3", root / "single"


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_zero3_gazal_run_trains_sharded_and_saves_what_one_process_saves(runs):
    zero3, single = runs
    for stage in ("sft", "grpo"):
        s = json.loads((zero3 / stage / "summary.json").read_text())
        assert s["processes"] == 2 and s["sharding"] == "zero3", stage
        p = s["parameters"]  # Gazal's change check, on gathered partitions
        assert p["trainable_tensors_changed"] == p["trainable_tensors"] == 42 and p["frozen_tensors_changed"] == 0
        for part in ("adapter", "merged"):
            assert _files(zero3 / stage / part) == _files(single / stage / part), (stage, part)
        adapter = load_file(zero3 / stage / "adapter" / "adapter_model.safetensors")
        reference = load_file(single / stage / "adapter" / "adapter_model.safetensors")
        assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in reference.items()}
        assert all(t.numel() > 0 for t in adapter.values())
        assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at zero
        assert (zero3 / stage / "DONE").is_file() and (zero3 / stage / "adapter" / "README.md").is_file()
    # Rollouts went through the merged-weight path inside TRL's ZeRO-3 gather, with their log-probs.
    grpo = json.loads((zero3 / "grpo" / "summary.json").read_text())
    assert grpo["merged_rollout_generations"] == 2 and grpo["sampler_logprob_batches"] == 2
    results = json.loads((zero3 / "eval" / "results.json").read_text())
    assert results["model"].endswith("grpo/merged") and results["benchmarks"]["medqa"]["n"] == 3
    assert (zero3 / "report.md").is_file()


def test_zero3_merged_models_are_their_base_plus_the_saved_adapter(runs):
    zero3, _ = runs
    tok = load_tokenizer(str(zero3 / "sft" / "merged"))
    ids = tok(["<|im_start|>user\nFever and neck stiffness?<|im_end|>\n"], return_tensors="pt")["input_ids"]
    for stage in ("sft", "grpo"):
        base = json.loads((zero3 / stage / "summary.json").read_text())["base_model"]
        with torch.no_grad():
            plain = load_model(base).eval()
            base_logits = plain(ids).logits
            adapted = PeftModel.from_pretrained(plain, str(zero3 / stage / "adapter")).eval()
            expected = adapted(ids).logits
            merged = load_model(str(zero3 / stage / "merged")).eval()(ids).logits
        assert torch.allclose(merged, expected, atol=1e-4), stage
        assert not torch.allclose(merged, base_logits, atol=1e-3), stage  # the adapter is in it


def test_zero3_rollback_restores_partitions_exactly_and_resume_continues(runs, tmp_path):
    zero3, _ = runs
    run = tmp_path / "r"
    shutil.copytree(zero3 / "sft", run / "sft")
    # entropy moves a little every step; with thresholds at 1 +- 1e-6 one of the two rules fires at
    # step 3 (the first step past a window of 2), and its action is to roll back to checkpoint-2.
    args = ["grpo", "--config", "demo", "--run-dir", str(run), *TINY, "grpo.save_steps=1", "grpo.save_total_limit=null",
            "grpo.monitor.window=2", "grpo.monitor.entropy_low=0.999999", "grpo.monitor.entropy_high=1.000001",
            "grpo.monitor.actions={entropy_collapse: rollback, entropy_blowup: rollback}"]
    proc = _launch(*args, "grpo.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = [json.loads(line) for line in (run / "grpo" / "events.jsonl").read_text().splitlines()]
    rolled = [e for e in events if e["action"] == "rollback"]
    assert [(e["step"], Path(e["restored"]).name) for e in rolled] == [(3, "checkpoint-2")]
    # The trainer saves checkpoint-3 right after step 3's log, i.e. just after the rollback: its
    # adapter and every partition of the optimizer must be checkpoint-2's, bit for bit.
    ckpt = run / "grpo" / "checkpoints"
    two, three = (load_file(ckpt / f"checkpoint-{n}" / "adapter_model.safetensors") for n in (2, 3))
    one = load_file(ckpt / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.equal(two[k], three[k]) for k in two)
    assert all(not torch.equal(one[k], two[k]) for k in two)  # a step does move every tensor
    for rank in (0, 1):
        states = [torch.load(next((ckpt / f"checkpoint-{n}").glob(f"global_step*/zero_pp_rank_{rank}_*optim_states.pt")),
                             weights_only=False)["optimizer_state_dict"] for n in (2, 3)]
        before, after = (s["optimizer_state_dict"] for s in states)
        assert all(torch.equal(a, b) for a, b in zip(states[0]["fp32_flat_groups"], states[1]["fp32_flat_groups"]))
        assert before["state"].keys() == after["state"].keys() and before["state"]
        for i in before["state"]:
            for key, value in before["state"][i].items():
                assert torch.equal(value, after["state"][i][key]), (rank, i, key)
        assert after["param_groups"][0]["lr"] == pytest.approx(0.5 * before["param_groups"][0]["lr"])

    # --resume under ZeRO-3: a run that ended at step 3 continues from checkpoint-3 to step 4.
    (run / "grpo" / "DONE").unlink()
    proc = _launch(*args, "grpo.max_steps=4", "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["steps"] == 4
    steps = [json.loads(line)["step"] for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("adapter", ["new", "continue"])
def test_zero3_bfloat16_grpo_with_dora_and_sampler_logprobs(runs, tmp_path, adapter):
    # The paper-scale setting: bfloat16 weights under ZeRO-3. Recasting DoRA magnitudes to float32
    # here made DeepSpeed's engine fail at its first step (mixed dtypes in one partition buffer);
    # `continue` loads the SFT adapter with PEFT, which upcasts it unless told not to.
    zero3, _ = runs
    run = tmp_path / "bf16"
    shutil.copytree(zero3 / "sft", run / "sft")
    proc = _launch("grpo", "--config", "demo", "--run-dir", str(run), *TINY, "model.dtype=bfloat16", "grpo.bf16=true",
                   f"grpo.adapter={adapter}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((run / "grpo" / "summary.json").read_text())
    assert s["sharding"] == "zero3" and s["steps"] == 2
    assert s["parameters"]["trainable_tensors_changed"] == s["parameters"]["trainable_tensors"] == 42
    assert s["merged_rollout_generations"] == 2 and s["sampler_logprob_batches"] == 2


# FSDP2 through accelerate and the real trainers on 2 CPU processes: tests/fsdp_cpu.py lets
# accelerate take its FSDP branch on CPU (it does so only for GPU-like devices); the summary's
# `sharding: fsdp2` shows the shim took effect.
FSDP = ROOT / "src" / "gazal" / "accelerate" / "fsdp.yaml"
FSDP_GRPO = ["grpo", "--config", "demo", *TINY, "grpo.sampler_logprobs=false", "grpo.save_steps=1",
             "grpo.save_total_limit=null"]


def _launch_fsdp(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "0", str(TESTS / "fsdp_cpu.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def _peft_key(name: str) -> str:
    """A module's parameter name as PEFT's adapter file spells it."""
    name = name.replace(".default", "")
    return name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight") else name


def _adam_residual(before: dict, after: dict, optimizer: dict) -> float:
    """How far `after` is from one AdamW step from `before` with the moments in `optimizer` (the
    state saved with `after`): ~1e-8 when the step started from `before` and its optimizer state."""
    group = optimizer["param_groups"][0]
    (b1, b2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
    worst = 0.0
    for name, state in optimizer["state"].items():
        key = _peft_key(name)
        t = float(state["step"])
        update = (state["exp_avg"] / (1 - b1 ** t)) / ((state["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + eps)
        worst = max(worst, float((before[key] * (1 - lr * wd) - lr * update - after[key]).abs().max()))
    return worst


def test_fsdp2_trainer_checkpoints_hold_only_the_adapter_and_rollback_and_resume_load_them(tmp_path):
    run = tmp_path / "fsdp2"
    proc = _launch_fsdp("sft", "--config", "demo", "--run-dir", str(run), *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run / "sft" / "summary.json").read_text())["sharding"] == "fsdp2"
    # As in the ZeRO-3 test: a rule fires at step 3 and rolls back to checkpoint-2.
    rules = ["grpo.monitor.window=2", "grpo.monitor.entropy_low=0.999999", "grpo.monitor.entropy_high=1.000001",
             "grpo.monitor.actions={entropy_collapse: rollback, entropy_blowup: rollback}"]
    proc = _launch_fsdp(*FSDP_GRPO, "--run-dir", str(run), *rules, "grpo.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((run / "grpo" / "summary.json").read_text())
    assert s["sharding"] == "fsdp2" and s["processes"] == 2 and s["merged_rollout_generations"] == 3
    events = [json.loads(line) for line in (run / "grpo" / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], Path(e["restored"]).name) for e in events if e["action"] == "rollback"] == [(3, "checkpoint-2")]

    ckpt = run / "grpo" / "checkpoints"
    adapters = {n: load_file(ckpt / f"checkpoint-{n}" / "adapter_model.safetensors") for n in (1, 2, 3)}
    trainable = set(adapters[1])
    assert len(trainable) == 42
    for n in (1, 2, 3):
        # What the trainer saves for resuming holds what trains, not the frozen base. The one extra
        # name is the tied output embedding: torch's ignore_frozen_params keeps a tied weight's
        # second name (Qwen3-32B's lm_head is untied, so its checkpoints are the adapter alone).
        model = torch.load(ckpt / f"checkpoint-{n}" / "pytorch_model_fsdp.bin", weights_only=True)
        names = {_peft_key(k) for k in model}
        assert trainable <= names and names - trainable == {"base_model.model.lm_head.weight"}
    # The rollback restored checkpoint-2's adapter and optimizer bit for bit: checkpoint-3, saved
    # right after it, holds them, and the rollback's learning-rate factor.
    assert all(torch.equal(adapters[2][k], adapters[3][k]) for k in trainable)
    assert all(not torch.equal(adapters[1][k], adapters[2][k]) for k in trainable)
    opt2, opt3 = (torch.load(ckpt / f"checkpoint-{n}" / "optimizer.bin", weights_only=False) for n in (2, 3))
    assert opt2["state"].keys() == opt3["state"].keys() and len(opt2["state"]) == 42
    assert all(torch.equal(v, opt3["state"][k][kk]) for k in opt2["state"] for kk, v in opt2["state"][k].items())
    assert opt3["param_groups"][0]["lr"] == pytest.approx(0.5 * opt2["param_groups"][0]["lr"])

    # --resume continues from checkpoint-3: step 4 is one AdamW step from checkpoint-3's adapter
    # with its moments (a fresh adapter or optimizer would be far from it: the step counter too).
    (run / "grpo" / "DONE").unlink()
    proc = _launch_fsdp(*FSDP_GRPO, "--run-dir", str(run), "grpo.max_steps=4", "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((run / "grpo" / "summary.json").read_text())
    assert s["sharding"] == "fsdp2" and s["resumed_from"].endswith("checkpoint-3") and s["steps"] == 4
    assert s["parameters"]["trainable_tensors_changed"] == 42 and s["parameters"]["frozen_tensors_changed"] == 0
    opt4 = torch.load(ckpt / "checkpoint-4" / "optimizer.bin", weights_only=False)
    assert {float(v["step"]) for v in opt4["state"].values()} == {float(v["step"]) + 1 for v in opt3["state"].values()}
    four = load_file(ckpt / "checkpoint-4" / "adapter_model.safetensors")
    assert _adam_residual(adapters[3], four, opt4) < 1e-6
    assert _adam_residual(adapters[1], four, opt4) > 1e-3  # the check tells checkpoints apart
    final = load_file(run / "grpo" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], four[k]) for k in trainable)
