"""Stage 2: GRPO on the merged SFT model with a new DoRA + rsLoRA adapter (TRL GRPOTrainer)."""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset
from peft import PeftModel
from trl import GRPOConfig, GRPOTrainer

from gazal import audit, rundir
from gazal.adapters import lora_config, merged_adapter, upcast_dora_magnitudes
from gazal.config import Recipe
from gazal.data import load_grpo_items
from gazal.models import load_model, load_tokenizer
from gazal.monitor import JsonlMetrics
from gazal.rewards import resolve_reward
from gazal.tasks import messages
from gazal.training import common_args, resume_checkpoint, train_and_save

log = logging.getLogger(__name__)


class MergedRolloutGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose transformers rollouts run on merged weights.

    PEFT computes DoRA's weight norm in every forward, so generating through the adapter is several
    times slower than through the base model. Before each rollout the adapter is merged into the
    base weights for the rollout and taken out again afterwards (see `merged_adapter`). vLLM
    rollouts are untouched (TRL syncs merged weights to vLLM itself).
    """

    def _generate_single_turn(self, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model)
        if self.use_vllm or not isinstance(model, PeftModel):
            return super()._generate_single_turn(*args, **kwargs)
        with merged_adapter(model):
            return super()._generate_single_turn(*args, **kwargs)


def main(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    """Train the GRPO adapter; write adapter, merged model, metrics and summary under run_dir/grpo."""
    out = rundir.start_stage(run_dir, "grpo", recipe, keep=rundir.RESUMABLE if resume else ())
    cfg = recipe.grpo
    items = load_grpo_items(recipe.data.grpo, recipe.data.grpo_limit)
    # The dataset's extra columns (answer, options, labels) reach every reward function as keywords.
    dataset = Dataset.from_list(
        [{"prompt": messages(it, recipe.task), "answer": it.answer, "options": it.options, "labels": it.labels}
         for it in items]
    )
    log.info("grpo: %d questions from %s", len(dataset), recipe.data.grpo)
    base = rundir.model_for(run_dir, "grpo", recipe)
    tokenizer = load_tokenizer(base, recipe.model.revision, recipe.model.trust_remote_code)
    audit.check_or_refuse(recipe, tokenizer)  # before loading weights: a gameable reward stops here
    reward_funcs = [resolve_reward(s.name, s.params, tokenizer, cfg.max_completion_length) for s in cfg.rewards]
    model = load_model(base, recipe.model.dtype, recipe.model.revision, recipe.model.trust_remote_code)

    args = GRPOConfig(
        **common_args(recipe, cfg, out),
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
    )
    trainer_class = MergedRolloutGRPOTrainer if cfg.merged_rollouts else GRPOTrainer
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora),
        callbacks=[JsonlMetrics(out / "metrics.jsonl")],
    )
    upcast_dora_magnitudes(trainer.model)
    checkpoint = resume_checkpoint(out) if resume else None
    return train_and_save(trainer, tokenizer, run_dir, "grpo", {
        "questions": len(dataset), "base_model": base, "rewards": {spec.name: spec.weight for spec in cfg.rewards}},
        checkpoint)
