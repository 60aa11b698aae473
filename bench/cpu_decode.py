"""CPU decode speed: transformers `generate` with and without `generation.weight_first_decode`.

    python bench/cpu_decode.py [--model gazal:smollm2-135m-instruct] [--tokens 48] [--rounds 2]

Greedy decoding of the same prompt repeated B times, forced to exactly `--tokens` new tokens; the
two modes alternate inside each round so machine noise hits both. Prints ms per decode step for
each batch size and mode, the ratio, and whether the greedy tokens are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gazal.generation import weight_first_decode
from gazal.models import load_model, load_tokenizer, resolve_model

PROMPT = ("A 45-year-old man presents with crushing chest pain radiating to the left arm and "
          "diaphoresis. What is the most likely diagnosis? Think step by step.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gazal:smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,10,30")
    args = ap.parse_args()
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    tok.padding_side = "left"
    model = load_model(path, "float32").eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)

    def run(batch: int, fast: bool) -> tuple[float, torch.Tensor]:
        enc = tok([text] * batch, return_tensors="pt", padding=True)
        kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            if fast:
                with weight_first_decode(model):
                    start = time.perf_counter()
                    out = model.generate(**enc, **kw)
            else:
                start = time.perf_counter()
                out = model.generate(**enc, **kw)
        return (time.perf_counter() - start) / args.tokens * 1e3, out

    run(2, False)  # warm-up
    batches = [int(b) for b in args.batches.split(",")]
    times: dict[tuple[int, bool], list[float]] = {(b, f): [] for b in batches for f in (False, True)}
    same: dict[int, bool] = {}
    for _ in range(args.rounds):
        for b in batches:
            t0, stock = run(b, False)
            t1, fast = run(b, True)
            times[b, False].append(t0)
            times[b, True].append(t1)
            same[b] = same.get(b, True) and torch.equal(stock, fast)
    print(f"{args.model}, float32, {torch.get_num_threads()} threads, {args.tokens} greedy tokens, "
          f"{args.rounds} rounds (median)")
    print("| sequences | F.linear ms/step | weight-first ms/step | speed-up | same tokens | per round (stock / fast) |")
    print("|---|---|---|---|---|---|")
    for b in batches:
        s, f = statistics.median(times[b, False]), statistics.median(times[b, True])
        rounds = ", ".join(f"{x:.0f}/{y:.0f}" for x, y in zip(times[b, False], times[b, True]))
        print(f"| {b} | {s:.1f} | {f:.1f} | {s / f:.2f}x | {same[b]} | {rounds} |")


if __name__ == "__main__":
    main()
