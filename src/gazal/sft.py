"""Stage 1: supervised fine-tuning with DoRA + rsLoRA on structured clinical reasoning (TRL SFTTrainer)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from gazal import rundir
from gazal.adapters import ParamSnapshot, lora_config, save_adapter_and_merged
from gazal.config import Recipe
from gazal.data import load_sft_rows
from gazal.models import load_model, load_tokenizer
from gazal.monitor import JsonlMetrics

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
        output_dir=str(out / "checkpoints"),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=cfg.bf16,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=recipe.seed,
        data_seed=recipe.seed,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora),
        callbacks=[JsonlMetrics(out / "metrics.jsonl")],
    )
    snapshot = ParamSnapshot(trainer.model)
    start = time.time()
    result = trainer.train()
    summary = {
        "examples": len(dataset),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "seconds": round(time.time() - start, 1),
        "base_model": base,
        "parameters": snapshot.compare(trainer.model),
    }
    tokenizer.padding_side = "left"
    save_adapter_and_merged(trainer.model, tokenizer, out)
    rundir.write_json(out / "summary.json", summary)
    rundir.finish_stage(run_dir, "sft")
    log.info("sft: done in %.0fs, loss %.4f", summary["seconds"], summary["train_loss"])
    return summary
