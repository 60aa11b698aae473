"""`gazal plan`: the arithmetic against hand computations and the real models, the verdicts and their
keys, the CLI table, and the CPU estimate against the peak a real tiny run measures."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from gazal import plan, plan_report
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


# The 32B recipe without its vLLM server: the engine shares the training GPUs.
NO_SERVER = ["grpo.vllm_server_base_url=null", "grpo.vllm_server_tensor_parallel_size=null",
             "grpo.vllm_server_data_parallel_size=null"]
COLOCATED = ["grpo.vllm_mode=colocate", "grpo.vllm_tensor_parallel_size=4", "grpo.vllm_gpu_memory_utilization=0.35",
             "grpo.vllm_enable_sleep_mode=true", *NO_SERVER]
QWEN3_32B = 32_762_123_264


def test_the_32b_recipe_counts_its_16_gpus_and_fits_by_its_own_arithmetic():
    recipe = load_recipe("gazal-r1-32b")
    p = plan.plan(recipe, gpus=8, gpu_memory_gib=80)
    assert p.sharding == "zero3"  # the shipped launch line's DeepSpeed config
    # 8 training processes on node A + trl vllm-serve at TP 8 on node B.
    assert (p.world, p.server_gpus, p.total_gpus) == (8, 8, 16)
    assert not plan_report.failures(p) and not p.warnings
    plan_report.check(p, strict=True)
    sft, ev, server = _stage(p, "sft"), _stage(p, "eval"), _stage(p, "grpo server")
    # The recipe's own arithmetic: layer inputs 64 x 8,192 x 5,120 x 2 bytes = 5 GiB; weights 61 GiB / 8.
    assert sft.rows["activations"] == 64 * 8192 * 5120 * 2
    assert sft.rows["weights"] == pytest.approx(QWEN3_32B * 2 / 8)
    # Evaluation: TP 2 halves the weights (30.5 GiB); 0.9 x 80 GiB - 30.5 - 4 = ~37.5 GiB of cache
    # at 128 KiB a token: ~30 sequences of max_model_len 10,240.
    assert ev.rows["weights"] / plan.GIB == pytest.approx(30.51, abs=0.01)
    assert ev.rows["KV cache"] / (128 * 1024) / 10240 == pytest.approx(30.0, abs=0.1)
    # A server GPU (the recipe's comment): 0.9 x 80 = 72 GiB, weights / TP 8 = 7.6 GiB, 4 GiB
    # overhead, 60.4 GiB of cache at 64 layers x 1 KV head x 128 x K,V x 2 bytes = 32 KiB a token.
    assert server.reserved == 0.9 * 80 * plan.GIB and server.fits
    assert server.rows["weights"] == pytest.approx(QWEN3_32B * 2 / 8)
    assert server.rows["KV cache"] / plan.GIB == pytest.approx(60.37, abs=0.01)
    assert p.recipe.grpo.per_device_train_batch_size * 8 * 32 == 512  # a step's rollouts...
    assert server.rows["KV cache"] / (32 * 1024) / 2560 > 512  # ...all in the cache at once
    assert all(ph.total < 80 * plan.GIB for ph in p.phases)


def test_the_weight_sync_is_one_layer_not_the_model():
    p = plan.plan(load_recipe("gazal-r1-32b"), gpus=8, gpu_memory_gib=80)
    arch = p.arch
    sync = _stage(p, "grpo sync")
    # One decoder layer gathered (q 5120 x 8192, k/v 5120 x 1024, o 8192 x 5120, MLP 3 x 5120 x 25600,
    # norms: 0.91 GiB) and one linear folded at a time, the largest (5120 x 25600) in a float32
    # buffer and its bfloat16 cast (0.73 GiB), against TRL's whole-model gather of 61 GiB.
    layer = 2 * 5120 * 8192 + 2 * 5120 * 1024 + 3 * 5120 * 25600 + 2 * 5120 + 2 * 128
    assert sync.rows["gathered layer (layer-wise sync)"] == layer * 2 == arch.layer_params() * 2
    assert sync.rows["folded linear (layer-wise sync)"] == 5120 * 25600 * (4 + 2)
    assert "gathered weights (whole model)" not in sync.rows
    extra = sync.total - sum(sync.rows[k] for k in ("weights", "adapter + grads + AdamW", "CUDA context + NCCL"))
    assert extra < 2 * plan.GIB < QWEN3_32B * 2 / 30
    # The layout the whole-model gather ruled out (~89 GiB a GPU): a colocated engine at TP 4 with
    # sleep mode now syncs in ~27.5 GiB.
    colocated = plan.plan(load_recipe("gazal-r1-32b", COLOCATED), gpus=8, gpu_memory_gib=80)
    assert colocated.server_gpus == 0
    assert _stage(colocated, "grpo sync").total / plan.GIB == pytest.approx(27.53, abs=0.01)
    assert not plan_report.failures(colocated)


def test_colocated_on_8_gpus_as_trl_defaults_does_not_fit_and_strict_exits_2(capsys):
    """The 32B recipe with its server removed: vLLM colocated at TRL's defaults (TP 1, 0.3 of each GPU)."""
    over = ["grpo.vllm_mode=colocate", *NO_SERVER]
    p = plan.plan(load_recipe("gazal-r1-32b", over), gpus=8, gpu_memory_gib=80)
    assert p.total_gpus == 8
    bad = plan_report.failures(p)
    assert any("grpo: vLLM's share (24.0 GiB) cannot hold the weights (61.0 GiB at TP 1)" in b
               and "change grpo.vllm_tensor_parallel_size" in b for b in bad)
    with pytest.raises(GazalError, match="does not fit") as err:
        plan_report.check(p, strict=True)
    assert err.value.exit_code == 2
    for strict in ([], ["--strict"]):
        assert main(["plan", "--config", "gazal-r1-32b", "--gpus", "8", "--gpu-memory", "80", *strict, *over]) == 2
        assert "change grpo.vllm_tensor_parallel_size" in capsys.readouterr().err


def test_a_server_whose_gpus_are_not_declared_is_a_warning_and_strict_exits_2(capsys):
    """Server mode without grpo.vllm_server_*: the plan cannot count the server's GPUs."""
    over = ["grpo.vllm_server_tensor_parallel_size=null", "grpo.vllm_server_data_parallel_size=null"]
    p = plan.plan(load_recipe("gazal-r1-32b", over), gpus=8, gpu_memory_gib=80)
    assert p.server_gpus == 0 and not any(ph.name == "grpo server" for ph in p.phases)
    assert not plan_report.failures(p) and len(p.warnings) == 1
    args = ["plan", "--config", "gazal-r1-32b", "--gpus", "8", "--gpu-memory", "80", *over]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "grpo.vllm_server_tensor_parallel_size (and _data_parallel_size) are not set" in out
    assert main([*args, "--strict"]) == 2
    err = capsys.readouterr().err
    assert "--strict refuses its warnings" in err and "grpo.vllm_server_tensor_parallel_size" in err


def test_the_server_layout_is_checked_against_the_model():
    # TP 16 spans two nodes of 8; DP 2 is refused by TRL's vllm-serve for a dense model; TP 3
    # does not divide 64 heads / 8 KV heads.
    for over, key in ((["grpo.vllm_server_tensor_parallel_size=16"], "grpo.vllm_server_tensor_parallel_size"),
                      (["grpo.vllm_server_tensor_parallel_size=4", "grpo.vllm_server_data_parallel_size=2"],
                       "grpo.vllm_server_data_parallel_size"),
                      (["grpo.vllm_server_tensor_parallel_size=3"], "grpo.vllm_server_tensor_parallel_size")):
        p = plan.plan(load_recipe("gazal-r1-32b", over), gpus=8, gpu_memory_gib=80)
        assert any(f"change {key}" in b for b in plan_report.failures(p)), over
    # TP 1: 61 GiB of weights and 4 of overhead leave 7 GiB of the server's 72, at 256 KiB a token
    # 28.6k tokens: 11 sequences of 2,560 at a time of the 512 a step brings.
    p = plan.plan(load_recipe("gazal-r1-32b", ["grpo.vllm_server_tensor_parallel_size=1"]), gpus=8, gpu_memory_gib=80)
    assert p.server_gpus == 1 and not plan_report.failures(p)
    assert any("the vLLM server's cache holds 11 sequences an engine and a rollout batch brings 512" in n
               for n in p.notes)


def test_server_fields_with_a_colocated_engine_are_refused_naming_the_key(capsys):
    assert main(["validate", "--config", "gazal-r1-32b", "grpo.vllm_mode=colocate",
                 "grpo.vllm_server_base_url=null"]) == 2
    assert "grpo.vllm_server_tensor_parallel_size describes the `trl vllm-serve` server" in capsys.readouterr().err


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
                 "grpo.vllm_mode=colocate", "grpo.vllm_tensor_parallel_size=1", "grpo.vllm_gpu_memory_utilization=0.35",
                 *NO_SERVER]) == 2
    assert "change grpo.vllm_tensor_parallel_size" in capsys.readouterr().err


def test_cli_prints_the_table(capsys):
    assert main(["plan", "--config", "gazal-r1-32b", "--gpus", "8", "--gpu-memory", "80", "--strict"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("GiB"))
    assert header.split()[1:] == ["sft", "grpo", "rollout", "grpo", "sync", "grpo", "train", "grpo", "server", "eval"]
    for row in ("weights", "adapter + grads + AdamW", "activations", "LM head tiles",
                "gathered layer (layer-wise sync)", "KV cache", "total", "budget"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert "Gazal's table of known architectures" in out and "tokens/s" in out and "estimate" in out
    assert "GPUs: 8 training (1 node(s) x 8) + 8 for the vLLM server" in out
    assert "sft steps: ~51 optimizer steps" in out
    assert "verdict: gazal-r1-32b fits 16 x 80 GiB (8 training + 8 for the vLLM server)" in out


def _sft_file(tmp_path, n=60):
    """n examples of exactly 700 characters with the think tags: 200 tokens at 3.5 a token, + 2
    messages x 8 template tokens + 1 EOS = 217 tokens each."""
    path = tmp_path / "sft.jsonl"
    row = {"case": "c" * 300, "reasoning": "r" * 350, "answer": "a" * 32}
    path.write_text("\n".join(json.dumps(row) for _ in range(n)) + "\n")
    return str(path)


def test_sft_step_estimate_with_and_without_packing(tmp_path):
    from gazal import sft_steps

    base = [*TINY, f"data.sft={_sft_file(tmp_path)}", "data.sft_limit=null", "sft.max_length=1024",
            "sft.per_device_train_batch_size=1", "sft.num_train_epochs=1", "sft.max_steps=-1"]
    # 60 x 217 = 13,020 tokens: packed into ceil(13,020 / 1,024) = 13 rows; unpacked, 60 rows.
    for packing, accumulation, processes, steps in ((True, 1, 1, 13), (False, 1, 1, 60), (True, 2, 1, 7),
                                                    (False, 4, 2, 8)):
        recipe = load_recipe("demo", [*base, f"sft.packing={packing}",
                                      f"sft.gradient_accumulation_steps={accumulation}"])
        est, why = sft_steps.estimate(recipe, processes)
        assert est is not None, why
        assert (est.examples, est.tokens, est.steps) == (60, pytest.approx(60 * 217), steps), (packing, accumulation)
    # The 32B recipe, from its declared size: 107,033 rows less 1% held out = 105,963 x 1,000 tokens
    # = 12,935 rows of 8,192; / 8 processes = 1,617 micro-batches a process; / 32 = 51 steps. Unpacked
    # (the old comment's ~420): 105,963 / 8 = 13,246; / 32 = 414.
    r1 = load_recipe("gazal-r1-32b")
    assert sft_steps.estimate(r1, 8)[0].steps == 51
    assert sft_steps.estimate(load_recipe("gazal-r1-32b", ["sft.packing=false"]), 8)[0].steps == 414
    assert plan.plan(r1, gpus=8, gpu_memory_gib=80).sft_steps.steps == 51
    # Not on this machine and not declared: no estimate, and why.
    est, why = sft_steps.estimate(load_recipe("gazal-r1-32b", ["data.sft.0.rows=null"]), 8)
    assert est is None and "data.sft.0.rows" in why


def test_the_save_steps_warning_fires_past_the_estimated_steps_and_not_before(tmp_path, caplog, monkeypatch, capsys):
    # Under accelerate launch on 8 GPUs (WORLD_SIZE=8) the 32B recipe's SFT takes ~51 steps.
    monkeypatch.setenv("WORLD_SIZE", "8")
    for save, eval_, warned in ((60, 10, ["sft.save_steps=60"]), (50, 10, []), (10, 52, ["sft.eval_steps=52"]),
                                (10, 51, [])):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gazal.recipes"):
            assert main(["validate", "--config", "gazal-r1-32b", f"sft.save_steps={save}",
                         f"sft.eval_steps={eval_}"]) == 0
        found = [r.getMessage() for r in caplog.records if "optimizer steps SFT is estimated" in r.getMessage()]
        assert [w for w in warned if any(w in f for f in found)] == warned and len(found) == len(warned), found
        if warned:
            assert "~51 optimizer steps" in found[0] and "8 process(es)" in found[0]
    # gazal plan warns with the launch's processes, and --strict refuses.
    monkeypatch.delenv("WORLD_SIZE")
    args = ["plan", "--config", "gazal-r1-32b", "--gpus", "8", "--gpu-memory", "80", "sft.save_steps=200"]
    assert main(args) == 0
    assert "sft.save_steps=200 exceeds the ~51 optimizer steps" in capsys.readouterr().out
    assert main([*args, "--strict"]) == 2
    assert "sft.save_steps=200" in capsys.readouterr().err
    # A local file is counted: 60 examples packed into 13 rows, one process: 13 steps.
    local = [*TINY, f"data.sft={_sft_file(tmp_path)}", "data.sft_limit=null", "sft.max_length=1024",
             "sft.packing=true", "sft.per_device_train_batch_size=1", "sft.gradient_accumulation_steps=1",
             "sft.num_train_epochs=1", "sft.max_steps=-1", "sft.eval_steps=null"]
    for save, warned in ((14, True), (13, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gazal.recipes"):
            load_recipe("demo", [*local, f"sft.save_steps={save}"])
        assert any(f"sft.save_steps={save} exceeds the ~13 optimizer steps" in r.getMessage()
                   for r in caplog.records) == warned


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
