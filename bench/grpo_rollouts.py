"""GRPO step time on the demo model: Gazal's merged-weight rollouts vs TRL + PEFT DoRA out of the box.

    python bench/grpo_rollouts.py [--steps 2] [--tokens N] [--model gazal:smollm2-135m-instruct]

Three measurements, each in its own process, on the same prompts with the same DoRA + rsLoRA
adapter settings, every completion forced to exactly --tokens tokens (so sampling luck cannot
change the work):
  gazal  Gazal's GRPO trainer (adapter merged into the weights for each rollout)
  trl    TRL's GRPOTrainer with the PEFT DoRA adapter, as shipped
  base   the plain model (no adapter) generating the same rollouts: the speed floor
Printed: seconds per GRPO step and per rollout, and the ratios. Targets (issue 6): gazal at least
3x faster per step than trl; gazal's rollouts within 1.3x of the base model's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(mode: str, steps: int, tokens: int, model_name: str) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from gazal import recipes
    from gazal.adapters import lora_config
    from gazal.data import load_grpo_items
    from gazal.grpo import GazalGRPOTrainer
    from gazal.models import load_model, load_tokenizer, resolve_model
    from gazal.rewards import resolve_reward
    from gazal.tasks import messages

    recipe = recipes.load_recipe("demo", [f"model.name_or_path={model_name}"])
    path = resolve_model(model_name)
    tok = load_tokenizer(path)
    items = load_grpo_items("seed:grpo")[: steps + 1]
    generations = recipe.grpo.num_generations
    prompts = [messages(it, recipe.task) for it in items]
    gen_kwargs = {"min_new_tokens": tokens}  # fixed-length rollouts: same work in every mode

    if mode == "base":
        model = load_model(path).eval()
        times = []
        for conv in prompts:
            text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
            enc = tok([text] * generations, return_tensors="pt", add_special_tokens=False)
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=tokens, do_sample=True, temperature=recipe.grpo.temperature,
                               top_p=1.0, top_k=None, pad_token_id=tok.pad_token_id, **gen_kwargs)
            times.append(time.perf_counter() - start)
        return {"mode": mode, "rollout_s": sum(times[1:]) / steps, "step_s": None}

    rollout_times: list[float] = []
    step_marks: list[float] = []
    cls = GazalGRPOTrainer if mode == "gazal" else GRPOTrainer

    class Timed(cls):
        def _generate_single_turn(self, *a, **k):
            start = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **k)
            finally:
                rollout_times.append(time.perf_counter() - start)

        def log(self, logs, start_time=None):
            step_marks.append(time.perf_counter())
            super().log(logs, start_time)

    dataset = Dataset.from_list([{"prompt": p, "answer": it.answer, "options": it.options, "labels": it.labels}
                                 for p, it in zip(prompts, items)])
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, max_steps=steps + 1, per_device_train_batch_size=generations,
                          num_generations=generations, max_completion_length=tokens, temperature=recipe.grpo.temperature,
                          learning_rate=1e-5, beta=0.0, loss_type="dapo", logging_steps=1, report_to="none",
                          save_strategy="no", gradient_checkpointing=False, generation_kwargs=gen_kwargs,
                          dataloader_pin_memory=False, bf16=False, seed=0)
        trainer = Timed(model=load_model(path), reward_funcs=[resolve_reward("accuracy")], args=args,
                        train_dataset=dataset, processing_class=tok, peft_config=lora_config(recipe.grpo.lora))
        trainer.train()
    return {"mode": mode, "rollout_s": sum(rollout_times[1:]) / steps,
            "step_s": (step_marks[steps] - step_marks[0]) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed GRPO steps per mode (one more runs as warm-up)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per completion (default: the demo recipe's grpo.max_completion_length)")
    parser.add_argument("--model", default="gazal:smollm2-135m-instruct")
    parser.add_argument("--one", choices=["gazal", "trl", "base"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens is None:
        from gazal.recipes import load_recipe

        args.tokens = load_recipe("demo").grpo.max_completion_length
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.tokens, args.model)))
        return
    res = {}
    for mode in ("gazal", "trl", "base"):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", mode, "--steps", str(args.steps),
                              "--tokens", str(args.tokens), "--model", args.model], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"measured {mode}", file=sys.stderr, flush=True)
    g, t, b = res["gazal"], res["trl"], res["base"]
    print(f"model {args.model}; {args.steps} timed steps; 4 completions x {args.tokens} tokens per step; DoRA + rsLoRA")
    print(f"{'mode':<8} {'s/step':>8} {'s/rollout':>10}")
    for r in (g, t, b):
        print(f"{r['mode']:<8} {r['step_s'] if r['step_s'] is not None else float('nan'):>8.2f} {r['rollout_s']:>10.2f}")
    print(f"step speed-up, gazal vs trl: {t['step_s'] / g['step_s']:.2f}x (target >= 3x)")
    print(f"rollout time, gazal / base: {g['rollout_s'] / b['rollout_s']:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
