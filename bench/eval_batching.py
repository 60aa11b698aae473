"""Evaluation throughput: batched vs one-at-a-time generation on the demo model, side by side.

    python bench/eval_batching.py [--items 16] [--max-new-tokens 64] [--batch-size 16]

Each mode runs in its own process (so peak memory is its own) over the same MedQA items with
greedy decoding; the script prints items/s and peak memory per mode and the speed-up ratio.
Target (issue 3): batched >= 4x one-at-a-time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def run_mode(args: argparse.Namespace) -> None:
    from gazal.benchmarks import load_benchmark
    from gazal.config import load_recipe
    from gazal.generation import TransformersGenerator
    from gazal.models import resolve_model
    from gazal.tasks import messages

    recipe = load_recipe("demo", [f"eval.max_new_tokens={args.max_new_tokens}"])
    items = load_benchmark("medqa", Path(os.environ.get("GAZAL_BENCHMARKS_DIR", SHARED)), limit=args.items)
    gen = TransformersGenerator(resolve_model(recipe.model.name_or_path), recipe)
    convs = [messages(it, recipe.task) for it in items]
    size = args.batch_size if args.mode == "batched" else 1
    gen.generate(convs[:1])  # warm-up, not timed
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(convs), size):
        tokens += sum(c[0].tokens for c in gen.generate(convs[i:i + size]))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.mode, "items": len(convs), "seconds": seconds, "items_per_s": len(convs) / seconds,
                      "tokens_per_s": tokens / seconds, "peak_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mode", choices=["batched", "single"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        run_mode(args)
        return
    results = {}
    for mode in ("single", "batched"):
        cmd = [sys.executable, __file__, "--mode", mode, "--items", str(args.items),
               "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
    print(f"{'mode':<8} {'items':>5} {'seconds':>8} {'items/s':>8} {'tokens/s':>9} {'peak MiB':>9}")
    for mode, r in results.items():
        print(f"{mode:<8} {r['items']:>5} {r['seconds']:>8.1f} {r['items_per_s']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['peak_mb']:>9.0f}")
    ratio = results["batched"]["items_per_s"] / results["single"]["items_per_s"]
    mem = results["batched"]["peak_mb"] / results["single"]["peak_mb"]
    print(f"batched / single: {ratio:.2f}x items/s (target >= 4x), {mem:.2f}x peak memory")


if __name__ == "__main__":
    main()
