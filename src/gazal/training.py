"""What the SFT and GRPO stages share: trainer arguments, checkpoints and resume, the train-check-save finish."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from gazal import rundir
from gazal.adapters import ParamSnapshot, save_adapter_and_merged
from gazal.config import GRPOSettings, Recipe, SFTSettings
from gazal.errors import GazalError, TrainingStopped

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
        "save_strategy": "steps" if cfg.save_steps else "no",
        "save_steps": cfg.save_steps or 500,
        "save_total_limit": cfg.save_total_limit,
        "report_to": "none",
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning is meaningless (and warns) on CPU
        # Several processes without a GPU: tell the trainer, so it runs DDP over gloo instead of
        # training one independent copy per process.
        "use_cpu": rundir.distributed() and not torch.cuda.is_available(),
    }


def resume_checkpoint(out: Path) -> str:
    """The newest complete checkpoint under out/checkpoints, and metrics.jsonl cut back to it.

    The trainer writes trainer_state.json last, so a checkpoint without it was cut by a kill and
    is skipped. Metrics logged after the checkpoint are dropped: the resumed run logs those steps again.
    """
    folder = out / "checkpoints"
    done = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if (path / "trainer_state.json").is_file() and path.name.rsplit("-", 1)[1].isdigit():
            done.append((int(path.name.rsplit("-", 1)[1]), path))
    if not done:
        raise GazalError(f"--resume: no finished checkpoint under {folder} (is {out.name}.save_steps set?)")
    step, path = max(done)
    metrics = out / "metrics.jsonl"
    if rundir.is_main_process() and metrics.is_file():
        rows = [line for line in metrics.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.endswith("\n") and json.loads(line).get("step", 0) <= step]
        rundir.write_text(metrics, "".join(rows))
    log.info("resuming from %s (step %d)", path, step)
    return str(path)


def train_and_save(trainer, tokenizer, run_dir: Path, stage: str, summary: dict[str, Any],
                   resume_from: str | None = None, stopped: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Train, record which parameters changed, save adapter + merged model, summary, then DONE.

    `stopped` tells after training whether a monitor rule stopped it: the outputs are then saved for
    inspection, but the stage is not marked done and TrainingStopped is raised.
    """
    snapshot = ParamSnapshot(trainer.model)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    summary = {**summary, "steps": result.global_step, "train_loss": result.training_loss,
               "resumed_from": resume_from, "processes": trainer.accelerator.num_processes, "seconds": round(time.time() - start, 1),
               "parameters": snapshot.compare(trainer.model), "peak_rss_mb": rundir.peak_rss_mb()}
    evals = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
    if evals:
        summary["eval_loss"] = evals[-1]
    event = stopped() if stopped else None
    if event is not None:
        summary["stopped_by_monitor"] = {"step": event.step, "rule": event.rule, "message": event.message}
    tokenizer.padding_side = "left"  # saved tokenizers serve batched generation next
    out = run_dir / stage
    # Under `accelerate launch` every process trains; one writes.
    if trainer.accelerator.is_main_process:
        save_adapter_and_merged(trainer.model, tokenizer, out, summary)
        rundir.write_json(out / "summary.json", summary)
        if event is None:
            rundir.finish_stage(run_dir, stage)
    trainer.accelerator.wait_for_everyone()
    if event is not None:
        raise TrainingStopped(f"{stage} stopped by the monitor at step {event.step}: {event.rule}: {event.message}. "
                              f"Outputs so far are in {out}; events in {out / 'events.jsonl'}. Adjust "
                              f"{stage}.monitor (thresholds or actions) or the recipe, then rerun the stage.")
    log.info("%s: done in %.0fs, loss %.4f", stage, summary["seconds"], summary["train_loss"])
    return summary
