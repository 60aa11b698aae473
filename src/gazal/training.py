"""What the SFT and GRPO stages share: trainer arguments, checkpoints and resume, the train-check-save finish."""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from gazal import rundir
from gazal.adapters import ParamSnapshot, save_adapter_and_merged
from gazal.sharding import sharding_of
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
        # At the end of a stage the main process rebuilds the merged model on the CPU (for 32B: load
        # ~61 GiB, merge, write) while the other processes wait at a barrier; torch's default of 30
        # minutes for a collective is too short a margin for that.
        "ddp_timeout": 4 * 3600,
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


class ChangeCheck(TrainerCallback):
    """Snapshots the parameters when training begins: after the trainer has wrapped and sharded
    the model (before that, FSDP's efficient loading leaves other ranks' weights empty) and after a
    resumed checkpoint is loaded. Every rank takes it, since gathering is collective."""

    def __init__(self) -> None:
        self.snapshot: ParamSnapshot | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.snapshot = ParamSnapshot(model)


def restore_checkpoint(trainer, path: str) -> None:
    """Load a checkpoint's adapter, optimizer and scheduler into a running trainer, the way the
    trainer itself resumes (transformers' Trainer._inner_training_loop), so that DeepSpeed,
    FSDP and plain runs each read their own checkpoint format: DeepSpeed's engine checkpoint,
    FSDP's sharded state, or PEFT's adapter file with optimizer.pt. Every rank must call it.

    These are private Trainer methods; tests/test_monitor.py runs a rollback end to end and fails
    if they move.
    """
    from transformers.integrations.deepspeed import deepspeed_load_checkpoint

    if trainer.is_deepspeed_enabled:
        deepspeed_load_checkpoint(trainer.model_wrapped, path, load_module_strict=False)
    elif trainer.is_fsdp_enabled:
        trainer._load_from_checkpoint(path, trainer.model_wrapped)
    else:
        trainer._load_from_checkpoint(path)
    trainer._load_optimizer_and_scheduler(path)


def train_and_save(trainer, tokenizer, run_dir: Path, stage: str, summary: dict[str, Any], recipe: Recipe,
                   base: str, resume_from: str | None = None, stopped: Callable[[], Any] | None = None,
                   extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train, record which parameters changed, save adapter + merged model, summary, then DONE.

    Every process runs all of it (the change check and the adapter save gather sharded weights);
    only the main process writes files. `base` is the model the adapter sits on, from which the
    merged model is rebuilt. `stopped` tells after training whether a monitor rule stopped it: the
    outputs are then saved for inspection, but the stage is not marked done and TrainingStopped is
    raised. `extra` adds summary fields known only after training. What the trainer holds is released before returning, so the next stage of `gazal run`
    starts from an empty process.
    """
    if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
        # Trainer.save_model writes weights under FSDP only from a full state dict; found out
        # after training, the adapter would be lost.
        raise GazalError("the accelerate config's fsdp_state_dict_type must be FULL_STATE_DICT: Gazal saves the "
                         "adapter gathered whole (see src/gazal/accelerate/fsdp.yaml)")
    check = ChangeCheck()
    trainer.add_callback(check)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    summary = {**summary, "steps": result.global_step, "train_loss": result.training_loss,
               "resumed_from": resume_from, "processes": trainer.accelerator.num_processes,
               "sharding": sharding_of(trainer.model), "seconds": round(time.time() - start, 1),
               "parameters": check.snapshot.compare(trainer.model)}
    if extra is not None:
        summary.update(extra())
    evals = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
    if evals:
        summary["eval_loss"] = evals[-1]
    event = stopped() if stopped else None
    if event is not None:
        summary["stopped_by_monitor"] = {"step": event.step, "rule": event.rule, "message": event.message}
    tokenizer.padding_side = "left"  # saved tokenizers serve batched generation next
    out = run_dir / stage
    save_adapter_and_merged(trainer, tokenizer, out, base, recipe.model.dtype, summary,
                            recipe.model.trust_remote_code)
    summary.update(rundir.peak_memory())
    # Every process's own peak (a collective: each rank contributes its figure).
    summary["peak_rss_mb_per_process"] = [m["peak_rss_mb"] for m in gather_object([rundir.peak_memory()])]
    if trainer.accelerator.is_main_process:
        rundir.write_json(out / "summary.json", summary)
        if event is None:
            rundir.finish_stage(run_dir, stage)
    trainer.accelerator.wait_for_everyone()
    release(trainer)
    if event is not None:
        raise TrainingStopped(f"{stage} stopped by the monitor at step {event.step}: {event.rule}: {event.message}. "
                              f"Outputs so far are in {out}; events in {out / 'events.jsonl'}. Adjust "
                              f"{stage}.monitor (thresholds or actions) or the recipe, then rerun the stage.")
    log.info("%s: done in %.0fs, loss %.4f", stage, summary["seconds"], summary["train_loss"])
    return summary


def release(trainer) -> None:
    """Drop what a finished trainer holds (model, optimizer, DeepSpeed engine, CUDA cache)."""
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    trainer.callback_handler.model = trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
