"""Stage 2: GRPO on the merged SFT model with a new DoRA + rsLoRA adapter (TRL GRPOTrainer)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from gazal import rundir
from gazal.adapters import ParamSnapshot, lora_config, save_adapter_and_merged
from gazal.config import Recipe
from gazal.data import load_grpo_items
from gazal.models import load_model, load_tokenizer
from gazal.monitor import JsonlMetrics, read_metrics
from gazal.rewards import resolve_reward
from gazal.tasks import messages

log = logging.getLogger(__name__)


def main(recipe: Recipe, run_dir: Path) -> dict:
    """Train the GRPO adapter; write adapter, merged model, metrics and summary under run_dir/grpo."""
    out = rundir.start_stage(run_dir, "grpo", recipe)
    cfg = recipe.grpo
    items = load_grpo_items(recipe.data.grpo, recipe.data.grpo_limit)
    # The dataset's extra columns (answer, options, labels) reach every reward function as keywords.
    dataset = Dataset.from_list(
        [{"prompt": messages(it, recipe.task), "answer": it.answer, "options": it.options, "labels": it.labels}
         for it in items]
    )
    log.info("grpo: %d questions from %s", len(dataset), recipe.data.grpo)
    reward_funcs = [resolve_reward(spec.name, spec.params) for spec in cfg.rewards]

    base = rundir.model_for(run_dir, "grpo", recipe)
    tokenizer = load_tokenizer(base, recipe.model.revision, recipe.model.trust_remote_code)
    model = load_model(base, recipe.model.dtype, recipe.model.revision, recipe.model.trust_remote_code)

    args = GRPOConfig(
        output_dir=str(out / "checkpoints"),
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        mask_truncated_completions=cfg.mask_truncated_completions,
        num_iterations=cfg.num_iterations,
        reward_weights=[spec.weight for spec in cfg.rewards],
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=cfg.bf16,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=recipe.seed,
        data_seed=recipe.seed,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora),
        callbacks=[JsonlMetrics(out / "metrics.jsonl")],
    )
    snapshot = ParamSnapshot(trainer.model)
    start = time.time()
    result = trainer.train()
    rows = read_metrics(out / "metrics.jsonl")
    reward_keys = [f"rewards/{fn.__name__}/mean" for fn in reward_funcs]
    summary = {
        "questions": len(dataset),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "seconds": round(time.time() - start, 1),
        "base_model": base,
        "rewards": {spec.name: spec.weight for spec in cfg.rewards},
        "reward_trajectory": {key: [r[key] for r in rows if key in r] for key in reward_keys},
        "parameters": snapshot.compare(trainer.model),
    }
    save_adapter_and_merged(trainer.model, tokenizer, out)
    rundir.write_json(out / "summary.json", summary)
    rundir.finish_stage(run_dir, "grpo")
    log.info("grpo: done in %.0fs", summary["seconds"])
    return summary
