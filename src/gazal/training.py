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
from peft import PeftModel
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from gazal import manifest, rundir, trackers
from gazal.adapters import ParamSnapshot, fsdp2_adapter_state_dict, save_adapter_and_merged
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
        **trackers.training_args(recipe, out),  # report_to, run_name, project (logging section)
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


# TRL fields that Gazal sets from a key of its own named differently (a field named like a key of
# the stage's section, e.g. grpo.temperature, points at that key).
OWN_TRL_FIELDS = {
    "output_dir": "--run-dir", "report_to": "logging.report_to", "run_name": "logging.run_name",
    "logging_dir": "logging.logging_dir", "project": "logging.project", "seed": "seed", "data_seed": "seed",
    "reward_weights": "grpo.rewards (each component's weight)", "reward_funcs": "grpo.rewards",
    "save_strategy": "{stage}.save_steps", "eval_strategy": "sft.eval_steps",
    "per_device_eval_batch_size": "sft.per_device_train_batch_size",
    "use_cpu": "the launch (Gazal sets it: DDP over gloo without GPUs)", "ddp_timeout": "Gazal (4 hours)",
    "dataloader_pin_memory": "Gazal (pinned only with CUDA)",
}


def check_trl_fields(config_cls: type, stage: str, own: set[str], extra: dict[str, Any]) -> dict[str, Any]:
    """`<stage>.trl` entries checked against TRL's dataclass: the field exists, Gazal does not set it
    (`own`: the stage section's keys and the arguments Gazal builds), and its value has the field's
    type (coerced as pydantic's lax mode does: 0.5 for "0.5", never for "abc"). Raises GazalError
    naming the key; returns the coerced values."""
    import dataclasses
    import difflib
    import typing

    from pydantic import TypeAdapter, ValidationError

    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    out = {}
    for key, value in extra.items():
        where = f"{stage}.trl.{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            raise GazalError(f"{where}: {config_cls.__name__} has no field '{key}'"
                             + (f" (closest: {', '.join(close)})" if close else ""))
        if key in own or key in OWN_TRL_FIELDS:
            mine = OWN_TRL_FIELDS.get(key, f"{stage}.{key}").format(stage=stage)
            raise GazalError(f"{where}: Gazal sets {key} from {mine}; set that instead")
        try:
            adapter = TypeAdapter(hints[key])
        except Exception:  # a type pydantic cannot describe: the dataclass's own checks below remain
            out[key] = value
            continue
        try:
            out[key] = adapter.validate_python(value)
        except ValidationError as exc:
            raise GazalError(f"{where}: {exc.errors()[0]['msg']} (got {value!r}; {config_cls.__name__}.{key} is "
                             f"{hints[key]})") from None
    if out:
        import tempfile

        # The dataclass's own checks (__post_init__) on these values, before any training starts;
        # bf16 off, as TRL's default of on is refused on a machine without a GPU (where `gazal
        # validate` may well run), and the recipe's own bf16 key is not what is checked here.
        with tempfile.TemporaryDirectory() as tmp:
            try:
                config_cls(output_dir=tmp, bf16=False, **out)
            except (TypeError, ValueError) as exc:
                raise GazalError(f"{stage}.trl: {config_cls.__name__} refuses {sorted(out)}: {exc}") from None
    return out


def set_only(**values: Any) -> dict[str, Any]:
    """The arguments whose recipe key is set (None: leave the field to TRL's default or `trl:`)."""
    return {k: v for k, v in values.items() if v is not None}


def own_fields(stage: str, managed: dict[str, Any]) -> set[str]:
    """What a `<stage>.trl` mapping may not set: the arguments Gazal builds from the recipe (a
    first-class key left unset is not among them, so `trl:` may set that field instead)."""
    return set(managed)


def trl_config(config_cls: type, stage: str, managed: dict[str, Any], extra: dict[str, Any]):
    """TRL's config for a stage: Gazal's arguments plus the recipe's checked `<stage>.trl` fields."""
    return config_cls(**managed, **check_trl_fields(config_cls, stage, own_fields(stage, managed), extra))


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
    resumed checkpoint is loaded. Every rank takes it: each remembers its own shards, and the
    comparison's all-reduce is collective."""

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


def adapter_only_fsdp_saves(trainer) -> bool:
    """Under FSDP with a PEFT model, make the trainer's `save_model` (every checkpoint and the final
    adapter) gather only the trainable tensors; returns whether it was installed.

    `Trainer.save_model` is public and called by `_save_checkpoint` as `self.save_model(...)`, so an
    instance attribute takes its place; what it writes (PEFT's `save_pretrained` through the
    trainer's `_save`) is the same adapter files. The optimizer and scheduler are still saved by the
    trainer, which under FSDP2 already saves the adapter's state only (accelerate's
    `adapter_only`). tests/test_sharding.py checks what it gathers on FSDP2 shards over two CPU
    processes, and runs the trainers' checkpoints, rollback and resume under FSDP2 there.
    """
    if not trainer.is_fsdp_enabled or not isinstance(trainer.accelerator.unwrap_model(trainer.model), PeftModel):
        return False

    def save_model(output_dir: str | None = None, _internal_call: bool = False) -> None:
        state_dict = fsdp2_adapter_state_dict(trainer.model)
        if trainer.args.should_save:
            trainer._save(output_dir or trainer.args.output_dir, state_dict=state_dict)
        trainer.adapter_only_saves += 1

    trainer.adapter_only_saves = 0
    trainer.save_model = save_model
    return True


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
    adapter_only_fsdp_saves(trainer)
    check = ChangeCheck()
    trainer.add_callback(check)
    close_trackers = trackers.start(trainer, recipe, run_dir, stage, resumed=resume_from is not None)
    start = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        close_trackers()
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
            # The manifest's end first: a run killed between the two has no DONE, so the stage runs
            # again, rather than a DONE stage whose manifest never says it finished.
            manifest.finish_stage(run_dir, stage, processes=summary["processes"], sharding=summary["sharding"])
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
