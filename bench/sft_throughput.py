"""SFT throughput on the demo model: LoRA vs DoRA, adapter dropout, padded vs packed, side by side.

    python bench/sft_throughput.py [--steps 4] [--model gazal:smollm2-135m-instruct] [--configs dora dora+dropout]

Each configuration trains in its own process (so peak memory is its own) through Gazal's SFT
trainer on the bundled seed data. Printed per configuration: trained tokens per second (padding
excluded), peak resident memory, and model FLOP utilisation: useful model FLOPs per second
divided by this machine's float32 matrix-multiply throughput, measured in the same run on
matrices shaped like the model's. Useful FLOPs per token with a frozen base are 4 x the matmul
parameters (forward, plus the backward pass to activations; frozen weights need no weight
gradients) plus attention; adapter and DoRA weight-norm work counts as overhead, not as useful work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "lora": ["sft.lora.use_dora=false"],
    "dora": ["sft.lora.use_dora=true"],
    # Adapter dropout on: PEFT's DoRA then computes each base projection again on the dropped-out input.
    "dora+dropout": ["sft.lora.use_dora=true", "sft.lora.dropout=0.05"],
    "lora+packing": ["sft.lora.use_dora=false", "sft.packing=true"],
    "dora+packing": ["sft.lora.use_dora=true", "sft.packing=true"],
}


def matmul_flops(d_in: int, d_out: int, rows: int = 2048, seconds: float = 3.0) -> float:
    """Float32 matmul FLOP/s of this machine on a (rows x d_in) @ (d_in x d_out) product."""
    import torch

    a, b = torch.randn(rows, d_in), torch.randn(d_in, d_out)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * rows * d_in * d_out * n / (time.perf_counter() - start)


def one(name: str, steps: int, model: str) -> dict:
    """Train `steps` + 1 steps of one configuration; time all but the first."""
    import torch
    from transformers import TrainerCallback

    from gazal import recipes
    from gazal.data import load_sft_mixture
    from gazal.models import load_tokenizer, resolve_model
    from gazal.sft import build_trainer, drop_overlong, to_chat

    recipe = recipes.load_recipe("demo", [f"model.name_or_path={model}", f"sft.max_steps={steps + 1}",
                                         "sft.save_steps=0", "sft.per_device_train_batch_size=4",
                                         "sft.gradient_accumulation_steps=1", "sft.max_length=768", *CONFIGS[name]])
    rows, _ = load_sft_mixture(recipe.data.sft, recipe.seed)
    base = resolve_model(model)
    tok = load_tokenizer(base)
    train, _ = drop_overlong([{**to_chat(r, None), "where": r["where"]} for r in rows], tok, recipe.sft.max_length)

    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                marks.append((time.perf_counter(), float(logs["num_tokens"])))

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(recipe, Path(tmp), base, tok, train, [], callbacks=[Clock()])
        trainer.train()
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    cfg = trainer.model.get_base_model().config
    matmul_params = sum(p.numel() for n, p in trainer.model.named_parameters()
                        if p.ndim == 2 and "lora" not in n and "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        matmul_params += cfg.vocab_size * cfg.hidden_size  # the output head reuses the embedding matrix
    tokens = n1 - n0
    avg_len = n1 / (len(marks) * recipe.sft.per_device_train_batch_size)
    head_dim = cfg.head_dim
    attn_per_token = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * avg_len / 2
    useful_per_token = 4 * matmul_params + 2 * attn_per_token
    return {"config": name, "tokens_per_s": tokens / (t1 - t0), "seconds_per_step": (t1 - t0) / (len(marks) - 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "model_flops_per_s": tokens / (t1 - t0) * useful_per_token,
            "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per configuration")
    parser.add_argument("--model", default="gazal:smollm2-135m-instruct")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="configurations to measure (default: all; the first is the ratios' base)")
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.model)))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = []
    for name in args.configs:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--model", args.model],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr, flush=True)
    peak = max(matmul_flops(results[0]["hidden"], results[0]["intermediate"]),
               matmul_flops(results[0]["hidden"], results[0]["hidden"]))
    base = results[0]["tokens_per_s"]
    print(f"model {args.model}; {args.steps} timed steps each; float32 matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"({results[0]['torch_threads']} threads)")
    print(f"{'config':<14} {'tokens/s':>9} {'vs ' + results[0]['config']:>8} {'s/step':>7} {'peak MiB':>9} {'MFU':>6}")
    for r in results:
        print(f"{r['config']:<14} {r['tokens_per_s']:>9.0f} {r['tokens_per_s'] / base:>7.2f}x {r['seconds_per_step']:>7.2f} "
              f"{r['peak_rss_mb']:>9.0f} {r['model_flops_per_s'] / peak:>6.1%}")


if __name__ == "__main__":
    main()
