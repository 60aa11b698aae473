"""What the SFT and GRPO stages share: common trainer arguments and the train-check-save finish."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from gazal import rundir
from gazal.adapters import ParamSnapshot, save_adapter_and_merged
from gazal.config import GRPOSettings, Recipe, SFTSettings

log = logging.getLogger(__name__)


def common_args(recipe: Recipe, cfg: SFTSettings | GRPOSettings, out: Path) -> dict[str, Any]:
    """TrainingArguments both stages take from the recipe in the same way."""
    return {
        "output_dir": str(out / "checkpoints"),
        "learning_rate": cfg.learning_rate,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "bf16": cfg.bf16,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "no",
        "report_to": "none",
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning is meaningless (and warns) on CPU
    }


def train_and_save(trainer, tokenizer, run_dir: Path, stage: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Train, record which parameters changed, save adapter + merged model, summary, then DONE."""
    snapshot = ParamSnapshot(trainer.model)
    start = time.time()
    result = trainer.train()
    summary = {**summary, "steps": result.global_step, "train_loss": result.training_loss,
               "seconds": round(time.time() - start, 1), "parameters": snapshot.compare(trainer.model),
               "peak_rss_mb": rundir.peak_rss_mb()}
    tokenizer.padding_side = "left"  # saved tokenizers serve batched generation next
    out = run_dir / stage
    save_adapter_and_merged(trainer.model, tokenizer, out)
    rundir.write_json(out / "summary.json", summary)
    rundir.finish_stage(run_dir, stage)
    log.info("%s: done in %.0fs, loss %.4f", stage, summary["seconds"], summary["train_loss"])
    return summary
