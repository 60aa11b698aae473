"""`gazal plan`: the arithmetic against hand computations and the real models, the verdicts and their
keys, the CLI table, and the CPU estimate against the peak a real tiny run measures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from gazal import plan
from gazal.adapters import lora_config
from gazal.cli import main
from gazal.config import LoraSettings
from gazal.errors import GazalError
from gazal.models import TINY_QWEN3, load_model, resolve_model
from gazal.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name_or_path=gazal:tiny-qwen3"]


def _tiny_recipe(*overrides):
    return load_recipe("demo", [*TINY, *overrides])


def test_tiny_parameter_count_by_hand_and_from_the_model():
    arch = plan.resolve_arch(_tiny_recipe())
    # The tiny Qwen3 (gazal.models._build_tiny_qwen3): vocab 1024, hidden 64, intermediate 128,
    # 4 heads and 2 KV heads of 16, 2 layers, tied embeddings.
    layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64 + 2 * 16  # q k v o, MLP, norms, q/k norms
    assert arch.params() == 1024 * 64 + 2 * layer + 64 == 139_648
    model = load_model(resolve_model(TINY_QWEN3))
    assert arch.params() == sum(p.numel() for p in model.parameters())
    assert arch.linear_params() == sum(m.weight.numel() for m in model.modules()
                                       if isinstance(m, torch.nn.Linear) and m is not model.lm_head)


def test_adapter_count_matches_peft_dora():
    lora = LoraSettings(r=16, use_dora=True, target_modules="all-linear")
    arch = plan.resolve_arch(_tiny_recipe())
    # r (in + out) per linear plus DoRA's magnitude (out): q, k, v, o, gate, up, down.
    by_hand = 2 * sum(16 * (i + o) + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128),
                                                     (128, 64)])
    assert plan.adapter_params(arch, lora) == by_hand == 33_792
    peft_model = get_peft_model(load_model(resolve_model(TINY_QWEN3)), lora_config(lora))
    assert plan.adapter_params(arch, lora) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    few = LoraSettings(r=8, use_dora=False, target_modules=["q_proj", "v_proj"])
    assert plan.adapter_params(arch, few) == 2 * (8 * (64 + 64) + 8 * (64 + 32))


def test_saved_activations_match_the_formula_on_the_real_tiny_model():
    """The per-token-per-layer count, against the tensors autograd really keeps (DoRA with dropout)."""
    arch = plan.resolve_arch(_tiny_recipe())
    lora = LoraSettings(r=16, use_dora=True, dropout=0.05)
    model = get_peft_model(load_model(resolve_model(TINY_QWEN3)), lora_config(lora))
    model.train()
    import weakref

    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    tokens = 256
    ids = torch.randint(0, arch.vocab, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids).logits
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    logits_ptr = logits.untyped_storage().data_ptr()
    alive = {}
    for ref in refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params | {logits_ptr}:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    layers = sum(alive.values()) - tokens * arch.hidden * 4 * 2  # the final norm's input and output
    estimate = plan.activation_elems(arch, lora, dropout=True, mask_bytes=4, act_bytes=4) * 4 * tokens * arch.layers
    assert estimate == pytest.approx(layers, rel=0.1)


def test_qwen3_32b_from_the_table_and_kv_bytes_by_hand():
    arch = plan.Arch(**plan.KNOWN["Qwen/Qwen3-32B"])
    layer = 2 * 5120 * 8192 + 2 * 5120 * 1024 + 3 * 5120 * 25600 + 2 * 5120 + 2 * 128
    assert arch.params() == 2 * 151936 * 5120 + 64 * layer + 5120 == 32_762_123_264
    # 64 layers x 8 KV heads x 128 x (K, V) x 2 bytes; tensor parallel 2 splits the heads.
    assert arch.kv_bytes_per_token(2) == 64 * 8 * 128 * 2 * 2 == 256 * 1024
    assert arch.kv_bytes_per_token(2, tp=2) == 128 * 1024
    assert arch.kv_bytes_per_token(2, tp=16) == 64 * 1 * 128 * 2 * 2  # fewer KV heads than GPUs: replicated


def test_an_unknown_offline_model_is_named():
    with pytest.raises(GazalError, match="model.name_or_path: someone/unknown-7b"):
        plan.plan(_tiny_recipe("model.name_or_path=someone/unknown-7b"), gpus=1, gpu_memory_gib=80)


def _stage(p, name):
    return next(ph for ph in p.phases if ph.name == name)


COLOCATED = ["grpo.vllm_mode=colocate", "grpo.vllm_tensor_parallel_size=4", "grpo.vllm_gpu_memory_utilization=0.35",
             "grpo.vllm_enable_sleep_mode=true", "grpo.vllm_server_base_url=null"]


def test_the_32b_recipe_fits_8_x_80_gib_and_a_colocated_engine_would_not():
    recipe = load_recipe("gazal-r1-32b")
    p = plan.plan(recipe, gpus=8, gpu_memory_gib=80)
    assert p.sharding == "zero3"  # the shipped launch line's DeepSpeed config
    assert not plan.failures(p)
    plan.check(p)
    sft, ev = _stage(p, "sft"), _stage(p, "eval")
    # The recipe's own arithmetic: layer inputs 64 x 8,192 x 5,120 x 2 bytes = 5 GiB; weights 61 GiB / 8.
    assert sft.rows["activations"] == 64 * 8192 * 5120 * 2
    assert sft.rows["weights"] == pytest.approx(32_762_123_264 * 2 / 8)
    # Evaluation: TP 2 halves the weights (30.5 GiB); 0.9 x 80 GiB - 30.5 - 4 = ~37.5 GiB of cache
    # at 128 KiB a token: ~30 sequences of max_model_len 10,240.
    assert ev.rows["weights"] / plan.GIB == pytest.approx(30.51, abs=0.01)
    assert ev.rows["KV cache"] / (128 * 1024) / 10240 == pytest.approx(30.0, abs=0.1)
    assert all(ph.total < 80 * plan.GIB for ph in p.phases)
    # The weight sync: TRL gathers the whole model on every GPU to merge the PEFT adapter (ZeRO-3);
    # it fits only because vLLM serves from GPUs of its own.
    sync = _stage(p, "grpo sync")
    assert sync.rows["gathered weights (whole model)"] == 32_762_123_264 * 2 and sync.fits
    colocated = plan.plan(load_recipe("gazal-r1-32b", COLOCATED), gpus=8, gpu_memory_gib=80)
    assert not _stage(colocated, "grpo sync").fits
    with pytest.raises(GazalError, match="grpo sync") as err:
        plan.check(colocated)
    assert err.value.exit_code == 2
    # Under FSDP the sync goes parameter by parameter, and the colocated layout fits.
    assert not plan.failures(plan.plan(load_recipe("gazal-r1-32b", COLOCATED), gpus=8, gpu_memory_gib=80,
                                       sharding="fsdp"))


def test_a_recipe_that_cannot_fit_exits_2_naming_the_key(capsys):
    assert main(["plan", "--config", "gazal-r1-32b", "--gpus", "1", "--gpu-memory", "24"]) == 2
    err = capsys.readouterr().err
    assert "change eval.vllm_tensor_parallel_size" in err and "change eval.vllm_data_parallel_size" in err
    # Activations dominating a small model's SFT: the key is the batch or checkpointing.
    assert main(["plan", "--config", "demo", "--gpus", "1", "--gpu-memory", "24", "sft.per_device_train_batch_size=64",
                 "sft.max_length=4096"]) == 2
    err = capsys.readouterr().err
    assert "sft needs" in err and "largest part is activations" in err and "change sft.gradient_checkpointing" in err
    # vLLM's colocated share too small for its weights.
    assert main(["plan", "--config", "gazal-r1-32b", "--gpus", "8", "--gpu-memory", "80", "--sharding", "fsdp",
                 *COLOCATED[:-2], "grpo.vllm_tensor_parallel_size=1", "grpo.vllm_server_base_url=null"]) == 2
    assert "change grpo.vllm_tensor_parallel_size" in capsys.readouterr().err


def test_cli_prints_the_table(capsys):
    assert main(["plan", "--config", "gazal-r1-32b", "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("GiB"))
    assert header.split()[1:] == ["sft", "grpo", "rollout", "grpo", "sync", "grpo", "train", "eval"]
    for row in ("weights", "adapter + grads + AdamW", "activations", "LM head tiles", "gathered weights (whole model)",
                "KV cache", "total", "budget"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert "Gazal's table of known architectures" in out and "tokens/s" in out and "estimate" in out
    assert "verdict: gazal-r1-32b fits 8 x 80 GiB" in out


def test_cpu_estimate_is_within_25_percent_of_measured_peaks(tmp_path):
    """Real tiny stages, each its own `gazal` process as a user runs them, against `gazal plan --cpu`.
    The tiny model's own memory is small: this checks the process baseline and the stage phases; the
    model-dependent parts are checked on SmolLM2 by bench/plan_accuracy.py."""
    over = [*TINY, "data.sft_limit=6", "sft.max_steps=1", "sft.max_length=1024", "sft.packing=true",
            "sft.save_steps=0", "grpo.max_steps=1", "grpo.max_completion_length=12", "grpo.save_steps=0",
            "grpo.samples_every=0", "grpo.skip_reward_audit=true", "grpo.rewards=[{name: accuracy}, {name: format}]"]
    stages = ["sft", "grpo"]  # evaluation too in bench/plan_accuracy.py (each stage is ~15 s of imports here)
    p = plan.plan(load_recipe("demo", over), cpu=True)
    estimate = {}
    for ph in p.phases:
        estimate[ph.stage] = max(estimate.get(ph.stage, 0), ph.total / plan.MIB)
    # The thread count the baselines were measured with (bench/plan_accuracy.py).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "GAZAL_LOG_LEVEL": "WARNING"}
    run = tmp_path / "run"
    for stage in stages:
        proc = subprocess.run([sys.executable, "-m", "gazal", stage, "--config", "demo", "--run-dir", str(run), *over],
                              env=env, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        record = run / stage / ("results.json" if stage == "eval" else "summary.json")
        measured = json.loads(record.read_text())["peak_rss_mb"]
        assert estimate[stage] == pytest.approx(measured, rel=0.25), (stage, estimate[stage], measured)
