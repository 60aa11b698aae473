"""FSDP2 through accelerate and the real trainers: GPU only.

accelerate sets its FSDP distributed type only for GPU-like devices (on a CPU, `--use_fsdp` silently
runs unsharded); tests/test_sharding.py covers Gazal's FSDP2 code on `fully_shard` directly and,
through tests/fsdp_cpu.py, the trainers' checkpoints, rollback and resume on two CPU processes. One process on CUDA/NCCL is enough to run the
trainers' FSDP2 path: the parameters become DTensors, the merged rollouts unshard them, the
adapter is gathered by the trainer's save.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.name_or_path=gazal:tiny-qwen3", "data.sft_limit=8", "data.grpo_limit=8", "sft.max_steps=3",
    "sft.max_length=1536", "sft.learning_rate=1e-2", "grpo.max_steps=2", "grpo.max_completion_length=12",
    "grpo.learning_rate=1e-2", "grpo.rewards=[{name: accuracy}, {name: format}, {name: 'tiny_rewards:length', weight: 1.0}]",
    "grpo.skip_reward_audit=true", "grpo.save_steps=1", "model.dtype=bfloat16", "eval.limit=3", "eval.max_new_tokens=8", "eval.batch_size=3",
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: accelerate enables FSDP only on GPUs")
def test_fsdp2_gazal_run_on_one_gpu(tmp_path, benchmarks_dir):
    run = tmp_path / "fsdp2"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "src/gazal/accelerate/fsdp.yaml"),
           "--num_processes", "1", "--main_process_port", "0", "-m", "gazal", "run", "--config", "demo",
           "--run-dir", str(run), f"eval.benchmarks_dir={benchmarks_dir}", *TINY]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in ("sft", "grpo"):
        s = json.loads((run / stage / "summary.json").read_text())
        assert s["sharding"] == "fsdp2", stage
        p = s["parameters"]
        assert p["trainable_tensors_changed"] == p["trainable_tensors"] > 0 and p["frozen_tensors_changed"] == 0
    grpo = json.loads((run / "grpo" / "summary.json").read_text())
    assert grpo["merged_rollout_generations"] == 2 and grpo["sampler_logprob_batches"] == 2  # bf16: on by default
    assert (run / "eval" / "results.json").is_file()
