"""Evaluation throughput on the demo model, side by side in one process: one-at-a-time, static batches in file
order, static batches sorted by prompt tokens, and transformers continuous batching (`generate_batch`);
`--modes ...,eval` adds static batches in `gazal eval`'s own order (gazal.evaluate.batches).

    python bench/eval_batching.py [--items 12] [--max-new-tokens 64] [--batch-size 8] [--benchmark medqa]
                                  [--modes single,batched,sorted,continuous] [--repeats 2] [--threads 1]

All modes run greedy over the same items in one process, interleaved in rounds (the order reverses every other
round), so a noisy shared machine slows them alike; with --repeats >= 2 the table shows medians and the per-round
ratios. Per mode: seconds, items/s, generated tokens/s, speed-up over one-at-a-time, prompt padding waste (padded /
real prompt tokens - 1), completions token-identical to one-at-a-time, and peak resident memory during the mode
(VmHWM, reset before each mode; Linux only, else the process peak). Target (issue 3): batched >= 4x one-at-a-time.

`--mode NAME` runs one mode alone and prints one JSON line (the former interface).
Default run (12 MedQA items, 2 rounds, 1 thread) on a busy 2-core CPU: about 4 minutes (16 items: 5.5).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
MODES = ("single", "batched", "sorted", "continuous", "eval")
DEFAULT_MODES = ("single", "batched", "sorted", "continuous")


def _load_recipe(name: str, overrides: list[str]):
    from gazal.recipes import load_recipe

    return load_recipe(name, overrides)


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Bench:
    def __init__(self, args: argparse.Namespace):
        import torch

        from gazal.benchmarks import load_benchmark
        from gazal.generation import TransformersGenerator
        from gazal.models import resolve_model
        from gazal.tasks import messages

        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        recipe = _load_recipe("demo", [f"eval.max_new_tokens={args.max_new_tokens}", "eval.temperature=0.0",
                                       f"eval.batch_size={args.batch_size}"])
        self.recipe = recipe
        self.items = items = load_benchmark(args.benchmark, Path(os.environ.get("GAZAL_BENCHMARKS_DIR", SHARED)),
                                            recipe.eval.mmlu_pro_categories, args.items)
        self.gen = TransformersGenerator(resolve_model(recipe.model.name_or_path), recipe)
        self.convs = [messages(it, recipe.task) for it in items]
        tok = self.gen.tokenizer
        from gazal.generation import Decoding

        template_kwargs = Decoding.of(recipe.eval, "reasoning").chat_template_kwargs
        self.prompt_ids = [tok(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False, **template_kwargs),
                               add_special_tokens=False)["input_ids"] for c in self.convs]
        self.lens = [len(p) for p in self.prompt_ids]
        self.gen.generate(self.convs[:1])  # warm-up, not timed

    def _static(self, order: list[int]) -> tuple[list[str], list[int], int]:
        size = self.args.batch_size
        texts: list[str] = [""] * len(order)
        tokens = [0] * len(order)
        padded = 0
        for b in range(0, len(order), size):
            idx = order[b:b + size]
            padded += max(self.lens[i] for i in idx) * len(idx)
            for i, c in zip(idx, self.gen.generate([self.convs[i] for i in idx])):
                texts[i], tokens[i] = c[0].text, c[0].tokens
        return texts, tokens, padded

    def run(self, mode: str) -> dict:
        n = len(self.convs)
        _reset_peak()
        start = time.perf_counter()
        if mode == "single":
            texts, tokens, padded = self._static_single()
        elif mode == "batched":
            texts, tokens, padded = self._static(list(range(n)))
        elif mode == "sorted":
            texts, tokens, padded = self._static(sorted(range(n), key=lambda i: self.lens[i]))
        elif mode == "continuous":
            texts, tokens, padded = self._continuous()
        elif mode == "eval":
            texts, tokens, padded = self._static(self._eval_order())
        else:
            raise ValueError(mode)
        seconds = time.perf_counter() - start
        return {"mode": mode, "items": n, "seconds": seconds, "items_per_s": n / seconds,
                "tokens_per_s": sum(tokens) / seconds, "padding": padded / sum(self.lens) - 1, "peak_mb": _peak_mb(),
                "texts": texts}

    def _eval_order(self) -> list[int]:
        """The order `gazal eval` cuts its fixed batches in (gazal.evaluate.batches), as item indices."""
        import inspect

        from gazal.evaluate import batches

        extra = [self.gen] if len(inspect.signature(batches).parameters) > 3 else []
        pos = {it.id: i for i, it in enumerate(self.items)}
        return [pos[it.id] for b in batches(self.items, self.recipe, "reasoning", *extra) for it in b]

    def _static_single(self):
        texts, tokens = [], []
        for c in self.convs:
            out = self.gen.generate([c])[0][0]
            texts.append(out.text)
            tokens.append(out.tokens)
        return texts, tokens, sum(self.lens)

    def _continuous(self):
        """transformers' continuous batching (paged KV cache, no padding, finished sequences leave the batch and
        waiting ones take their place), over all items at once, at most --batch-size sequences per step."""
        import logging

        from transformers import ContinuousBatchingConfig, GenerationConfig

        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
        tok, new = self.gen.tokenizer, self.args.max_new_tokens
        page = 256
        cfg = ContinuousBatchingConfig(
            page_size=page,
            # Sized for this workload: left to itself it takes 90% of free memory and a max_batch_tokens of 8192,
            # whose dense [tokens, cache] attention mask on CPU alone costs seconds to allocate.
            num_blocks=sum(-(-(n + new + 1) // page) for n in self.lens) + 2,
            max_batch_tokens=self.args.cb_batch_tokens,
            max_requests_per_batch=self.args.batch_size,
        )
        gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        res = self.gen.model.generate_batch(self.prompt_ids, generation_config=gc, continuous_batching_config=cfg,
                                            max_new_tokens=new, warmup=False)
        outs = list(res.values())
        if len(outs) != len(self.prompt_ids) or any(o.error for o in outs):
            raise RuntimeError(f"generate_batch returned {len(outs)} of {len(self.prompt_ids)} results; errors: "
                               f"{[o.error for o in outs if o.error][:3]}")
        from gazal.tasks import decode_completion

        texts, tokens = [], []
        for o in outs:  # the same cut and decode as TransformersGenerator.generate
            ids = list(o.generated_tokens)
            end = next((i for i, t in enumerate(ids) if t in self.gen.stop_ids), None)
            ids = ids if end is None else ids[:end]
            texts.append(decode_completion(tok, ids))
            tokens.append(len(ids))
        return texts, tokens, sum(self.lens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8,
                   help="static batch size, and the most sequences per step of continuous batching")
    p.add_argument("--benchmark", default="medqa", help="medqa, pubmedqa (long contexts), mmlu_pro, ...")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated, from {','.join(MODES)} (eval: static batches in gazal eval's own order)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all modes (>= 2 for per-round ratios)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 0: torch's own choice (all cores). Default 1: on a shared 2-core "
                        "machine a busy neighbour stalls 2-thread steps 3-10x, while 1 thread stays within ~10%%")
    p.add_argument("--cb-batch-tokens", type=int, default=1024, help="continuous batching: most tokens per step")
    p.add_argument("--mode", choices=MODES, help="run one mode alone and print one JSON line")
    args = p.parse_args()
    modes = [args.mode] if args.mode else [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    import torch

    bench = Bench(args)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    failed: dict[str, str] = {}
    for rnd in range(max(1, args.repeats)):
        for mode in modes if rnd % 2 == 0 else modes[::-1]:
            if mode in failed:
                continue
            try:
                results[mode].append(bench.run(mode))
            except Exception as exc:  # continuous batching is young; report, don't abort the other modes
                failed[mode] = f"{type(exc).__name__}: {exc}"
                continue
            if args.mode:
                r = dict(results[mode][-1])
                r.pop("texts")
                print(json.dumps(r))
                return
            r = results[mode][-1]
            print(f"round {rnd} {mode:<10} {r['seconds']:7.1f} s", file=sys.stderr, flush=True)
    if args.mode:
        sys.exit(f"{args.mode}: {failed[args.mode]}")

    lens = bench.lens
    print(f"{args.benchmark}: {len(lens)} items, batch size {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
          f"greedy, {torch.get_num_threads()} threads, {args.repeats} round(s); prompt tokens "
          f"min {min(lens)} median {statistics.median(lens):.0f} max {max(lens)}")
    print(f"{'mode':<10} {'seconds':>8} {'items/s':>8} {'tokens/s':>9} {'vs single':>9} {'padding':>8} "
          f"{'same as single':>14} {'peak MiB':>9}")
    base = results.get("single") or []
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items() if rs}
    for mode, rs in results.items():
        if not rs:
            print(f"{mode:<10} failed: {failed[mode]}")
            continue
        s = med[mode]
        ratio = f"{med['single'] / s:8.2f}x" if "single" in med else f"{'-':>9}"
        same = (f"{sum(a == b for a, b in zip(rs[0]['texts'], base[0]['texts']))}/{len(lens)}" if base else "-")
        print(f"{mode:<10} {s:8.1f} {len(lens) / s:8.3f} {statistics.median(r['tokens_per_s'] for r in rs):9.1f} {ratio} "
              f"{rs[0]['padding']:8.2f} {same:>14} {max(r['peak_mb'] for r in rs):9.0f}")
    if len(base) >= 2:
        for mode, rs in results.items():
            if mode != "single" and rs:
                print(f"{mode}: speed-up vs single per round: " + " ".join(f"{b['seconds'] / r['seconds']:.2f}x" for b, r in zip(base, rs)))
    if "single" in med and "batched" in med:
        print(f"batched / single: {med['single'] / med['batched']:.2f}x items/s (target >= 4x)")


if __name__ == "__main__":
    main()
