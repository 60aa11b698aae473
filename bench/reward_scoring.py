"""Reward throughput: completions scored per second by a recipe's reward, side by side with accuracy alone.

    python bench/reward_scoring.py [--config demo] [--n 10000] [KEY=VALUE ...]

Completions are realistic: the audit's honest completions (seed reasoning at several lengths) and its
gaming variants over the bundled seed cases, with token ids precomputed as TRL passes them to reward
functions. Prints
completions/s for the full reward set and for the accuracy reward alone, and their ratio.
"""

from __future__ import annotations

import argparse
import itertools
import time

from gazal.audit import audit_set, hacks, honest, reward_tokenizer
from gazal.recipes import load_recipe
from gazal import rewards
from gazal.rewards import RewardSet, resolve_reward
from gazal.tasks import messages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=64, help="completions per reward call (TRL calls per batch)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. another grpo.rewards")
    args = p.parse_args()
    recipe = load_recipe(args.config, args.overrides)
    tokenizer = reward_tokenizer(recipe)
    pool = []
    for case, other in audit_set(40):
        for text in [*honest(case).values(), *hacks(case, other).values()]:
            pool.append((case.item, text, tokenizer(text, add_special_tokens=False)["input_ids"]))
    rows = list(itertools.islice(itertools.cycle(pool), args.n))
    full = RewardSet.from_recipe(recipe, tokenizer)
    accuracy = RewardSet(["accuracy"], [1.0], [resolve_reward("accuracy")])
    rates = {}
    for name, rs in (("accuracy only", accuracy), (f"{args.config} reward", full)):
        start = time.perf_counter()
        for i in range(0, len(rows), args.batch):
            batch = rows[i:i + args.batch]
            # A completion is scored once in training: forget parses of earlier batches, so that
            # the pool's repeats do not turn into cache hits (within a batch the components share).
            rewards._parse.cache_clear()
            rs.score([t for _, t, _ in batch], answer=[it.answer for it, _, _ in batch],
                     options=[it.options for it, _, _ in batch], prompts=[messages(it, recipe.task) for it, _, _ in batch],
                     completion_ids=[ids for _, _, ids in batch])
        rates[name] = len(rows) / (time.perf_counter() - start)
    for name, rate in rates.items():
        print(f"{name:<20} {rate:>10.0f} completions/s  ({len(rows)} completions)")
    names = list(rates)
    print(f"full / accuracy-only throughput: {rates[names[1]] / rates[names[0]]:.2f}x "
          f"({len(full.names)} components: {', '.join(full.names)})")


if __name__ == "__main__":
    main()
