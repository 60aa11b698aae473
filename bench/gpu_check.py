"""One short check of Gazal's GPU paths, for when a CUDA GPU is lent (under 8 minutes on one H100).

    python bench/gpu_check.py [--out runs/gpu-check]     # on a machine with one CUDA GPU
    python bench/gpu_check.py --smoke                    # CPU, tiny model, no accelerate: the script runs

With the embedded demo model in bfloat16:
1. `gazal run` of a shortened demo recipe (SFT, GRPO with merged rollouts, evaluation of base and
   GRPO models) under `accelerate launch` with FSDP2 (src/gazal/accelerate/fsdp.yaml, one process);
   each stage's peak GPU memory, seconds a step and sharding are read from its summary.json.
2. The layer-wise weight sync (gazal.vllm_sync) into a client that drops what it receives, against
   TRL's whole-model path (merge_adapter, walk every parameter, unmerge) on the same GPU policy:
   seconds and peak GPU memory over what the policy holds.
3. The merged-vs-adapter log-prob gap of sampled tokens (bench/rollout_logprob_gap.py) on the GPU.
Everything printed is measured in this run; nothing is compared with stored figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = "gazal:smollm2-135m-instruct"
SHORT = ["sft.max_steps=10", "grpo.max_steps=3", "eval.limit=20", "model.dtype=bfloat16"]


def run_pipeline(out: Path, smoke: bool) -> dict:
    args = ["run", "--config", "demo", "--run-dir", str(out), *SHORT]
    if smoke:
        cmd = [sys.executable, "-m", "gazal", *args, "model.name_or_path=gazal:tiny-qwen3", "grpo.skip_reward_audit=true",
               "eval.limit=3", "eval.max_new_tokens=8", "grpo.max_completion_length=12",
               "grpo.rewards=[{name: accuracy}, {name: format}]", "sft.max_steps=2", "data.sft_limit=6",
               "data.grpo_limit=8", "grpo.per_device_train_batch_size=4", "grpo.gradient_accumulation_steps=1"]
    else:
        # FSDP2 with one process; the demo model's decoder layers are Llama's.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "src/gazal/accelerate/fsdp.yaml"), "--num_processes", "1",
               "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "-m", "gazal", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        print(proc.stderr[-3000:])
        raise SystemExit(f"gazal run failed ({proc.returncode}); log in {out.parent / (out.name + '.log')}")
    found = {"seconds": round(time.perf_counter() - start, 1)}
    for stage in ("sft", "grpo"):
        s = json.loads((out / stage / "summary.json").read_text())
        found[stage] = {k: s.get(k) for k in ("sharding", "processes", "steps", "seconds", "peak_gpu_mb",
                                               "merged_rollout_generations", "sampler_logprob_batches")}
        found[stage]["seconds_a_step"] = round(s["seconds"] / max(s["steps"], 1), 2)
    results = json.loads((out / "eval" / "results.json").read_text())
    found["eval"] = {b: r["accuracy"] if "accuracy" in r else "skipped (no benchmark data)"
                     for b, r in results["benchmarks"].items()}
    return found


def _policy(model_name: str, device: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model

    from gazal.models import load_model, resolve_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=True, use_rslora=True,
                     lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(load_model(resolve_model(model_name), "float32"), cfg).to(device=device, dtype=dtype).eval()


class Dropping:
    """A vLLM client stand-in: takes each tensor and drops it (the transfer itself is not measured)."""

    def __init__(self):
        self.tensors = 0

    def update_named_params(self, metadata, named):
        for _ in named:
            self.tensors += 1

    def reset_prefix_cache(self):
        pass


def sync_check(model_name: str, device: str, dtype: torch.dtype) -> dict:
    from gazal.vllm_sync import LayerwiseSync

    model = _policy(model_name, device, dtype)
    cuda = device == "cuda"

    def measured(fn) -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - held) / 2**20 if cuda else float("nan")
        return time.perf_counter() - start, extra

    client = Dropping()
    gen = SimpleNamespace(mode="server", model=model, enable_sleep_mode=False, vllm_client=client,
                          accelerator=SimpleNamespace(is_main_process=True))
    sync = LayerwiseSync(gen)
    first = measured(sync)
    later = measured(sync)

    def trl_like():  # TRL's PEFT path without sharding: merge in place, walk, unmerge
        with torch.no_grad():
            model.merge_adapter()
            for _ in model.named_parameters():
                pass
            model.unmerge_adapter()

    trl = measured(trl_like)
    return {"gazal_first": first, "gazal_later": later, "trl": trl, "tensors": client.tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, no accelerate: check the script")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; --smoke runs the script's CPU path")
    device, model_name = ("cpu", "gazal:tiny-qwen3") if args.smoke else ("cuda", DEMO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (smoke)'}; torch {torch.__version__}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    p = run_pipeline(args.out, args.smoke)
    print(f"1. gazal run (SFT, GRPO, eval) in {p['seconds']} s under "
          f"{'accelerate FSDP2, one process' if not args.smoke else 'one plain process'}; run dir {args.out}")
    for stage in ("sft", "grpo"):
        s = p[stage]
        print(f"   {stage}: sharding {s['sharding']}, {s['steps']} steps, {s['seconds_a_step']} s a step, "
              f"peak GPU {s['peak_gpu_mb']} MiB" + (f", merged rollouts {s['merged_rollout_generations']}, "
                                                    f"sampler log-prob batches {s['sampler_logprob_batches']}"
                                                    if stage == "grpo" else ""))
    print(f"   eval accuracy (eval.limit items a benchmark: a smoke figure, not a result): {p['eval']}")

    s = sync_check(model_name, device, torch.bfloat16)
    print(f"2. weight sync, {s['tensors']} tensors over two syncs; seconds and peak GPU MiB over the policy:")
    print(f"   layer-wise first {s['gazal_first'][0]:.3f} s / {s['gazal_first'][1]:.1f} MiB; later "
          f"{s['gazal_later'][0]:.3f} s / {s['gazal_later'][1]:.1f} MiB; TRL-style merge+walk+unmerge "
          f"{s['trl'][0]:.3f} s / {s['trl'][1]:.1f} MiB")

    sys.path.insert(0, str(ROOT / "bench"))
    from rollout_logprob_gap import gap

    g = gap(model_name, torch.bfloat16, 64, 0, 0.01, device=device)
    print("3. log-prob gap of sampled tokens, bfloat16 (sampler minus the adapter forward that learns):")
    for mode, r in g.items():
        print(f"   {mode:<20} tokens {r['tokens']:>4}  mean |d| {r['mean_abs']:.2e}  max |d| {r['max_abs']:.2e}  "
              f"ratios outside [0.8, 1.28] {r['outside']:.2%}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
