"""Stage 1: supervised fine-tuning with DoRA + rsLoRA on structured clinical reasoning (TRL SFTTrainer)."""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from gazal import rundir
from gazal.adapters import lora_config
from gazal.config import Recipe
from gazal.data import load_sft_rows
from gazal.models import load_model, load_tokenizer
from gazal.monitor import JsonlMetrics
from gazal.training import common_args, train_and_save

log = logging.getLogger(__name__)


def to_chat(row: dict[str, str], system_prompt: str | None) -> dict[str, list[dict[str, str]]]:
    """{case, reasoning, answer} -> prompt/completion messages; the completion is <think>reasoning</think> answer.

    Prompt/completion form makes TRL put the loss on the assistant turn only.
    """
    prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompt.append({"role": "user", "content": row["case"]})
    completion = [{"role": "assistant", "content": f"<think>\n{row['reasoning'].strip()}\n</think>\n{row['answer'].strip()}"}]
    return {"prompt": prompt, "completion": completion}


def main(recipe: Recipe, run_dir: Path) -> dict:
    """Train the SFT adapter; write adapter, merged model, metrics and summary under run_dir/sft."""
    out = rundir.start_stage(run_dir, "sft", recipe)
    cfg = recipe.sft
    rows = load_sft_rows(recipe.data.sft, recipe.data.sft_limit)
    dataset = Dataset.from_list([to_chat(r, recipe.task.system_prompt) for r in rows])
    log.info("sft: %d examples from %s", len(dataset), recipe.data.sft)

    base = rundir.model_for(run_dir, "sft", recipe)
    tokenizer = load_tokenizer(base, recipe.model.revision, recipe.model.trust_remote_code)
    tokenizer.padding_side = "right"  # training pads on the right; generation switches to left
    model = load_model(base, recipe.model.dtype, recipe.model.revision, recipe.model.trust_remote_code)

    args = SFTConfig(
        **common_args(recipe, cfg, out),
        num_train_epochs=cfg.num_train_epochs,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora),
        callbacks=[JsonlMetrics(out / "metrics.jsonl")],
    )
    return train_and_save(trainer, tokenizer, run_dir, "sft", {"examples": len(dataset), "base_model": base})
