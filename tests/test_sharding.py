"""Gazal's code on genuinely sharded parameters, with two CPU processes over gloo.

FSDP2: torch's fully_shard applied directly (accelerate enables FSDP only on GPU-like devices, so
`accelerate launch --use_fsdp` on a CPU silently runs unsharded); tests/sharded_fsdp2.py calls
Gazal's functions on the shards.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from gazal.models import TINY_QWEN3, resolve_model

TESTS = Path(__file__).resolve().parent


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
    assert found["tokens_equal"] and found["logits_max_diff"] < 1e-4 < found["adapter_effect"]
    # ... and left the shards bit-exact, still sharded, adapter unmerged.
    assert found["shards_exact_after_rollout"] and found["sharded_after_rollout"] and not found["merged_flag_after"]
    # The change check reads whole values: every adapter tensor moved, no base tensor did.
    p = found["parameters"]
    assert p["trainable_tensors"] == p["trainable_tensors_changed"] == 42 and p["frozen_tensors_changed"] == 0
    # The gathered adapter has a single process's keys and shapes, all non-empty and trained; the
    # model merged from it on rank 0 computes what the trained shards compute.
    assert found["saved_keys_match"] and found["saved_shapes_match"] and found["saved_nonempty"]
    assert found["saved_changed"] == found["saved_tensors"] == 42
    assert found["merged_vs_trained_max_diff"] < 1e-4
