"""Stage 1: supervised fine-tuning with DoRA + rsLoRA on structured clinical reasoning (TRL SFTTrainer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from gazal import manifest, pubmedqa, rundir
from gazal.adapters import lora_config, upcast_dora_magnitudes
from gazal.config import Recipe
from gazal.data import load_sft_mixture
from gazal.errors import GazalError
from gazal.models import load_model, load_tokenizer, model_kwargs
from gazal.monitor import JsonlMetrics
from gazal.training import common_args, resume_checkpoint, set_only, train_and_save, trl_config

log = logging.getLogger(__name__)


def to_chat(row: dict[str, Any], system_prompt: str | None) -> dict[str, list[dict[str, str]]]:
    """An SFT example -> prompt/completion messages.

    {case, reasoning, answer} becomes a user turn and the assistant turn `<think>reasoning</think>`
    followed by the answer; {messages} rows keep their turns, the last (assistant) one being the
    completion. Prompt/completion form makes TRL put the loss on the completion only.
    """
    if "messages" in row:
        msgs = row["messages"]
        prompt = list(msgs[:-1])
        if system_prompt and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
        return {"prompt": prompt, "completion": [msgs[-1]]}
    prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompt.append({"role": "user", "content": row["case"]})
    completion = [{"role": "assistant", "content": f"<think>\n{row['reasoning'].strip()}\n</think>\n{row['answer'].strip()}"}]
    return {"prompt": prompt, "completion": completion}


def drop_overlong(examples: list[dict], tokenizer, max_length: int) -> tuple[list[dict], list[str]]:
    """Examples whose whole conversation fits max_length tokens, and where the others came from.

    TRL would truncate an over-long example from the end, silently keeping a question whose answer
    is gone (or, cut from the start, an answer without its question); dropping it is honest.
    """
    kept, dropped = [], []
    for ex in examples:
        text = tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=False)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        # +1: TRL appends an EOS token when the template does not end with one.
        (kept if n + 1 <= max_length else dropped).append(ex)
    return [{k: v for k, v in ex.items() if k != "where"} for ex in kept], [ex["where"] for ex in dropped]


def config_kwargs(recipe: Recipe, out: Path, validation: bool) -> dict[str, Any]:
    """SFTConfig arguments Gazal sets from the recipe (the `sft.trl` mapping adds the rest)."""
    cfg = recipe.sft
    eval_args: dict[str, Any] = {}
    if validation:
        eval_args = {"eval_strategy": "steps" if cfg.eval_steps else "epoch", "eval_steps": cfg.eval_steps,
                     "per_device_eval_batch_size": cfg.per_device_train_batch_size}
    return {
        **common_args(recipe, cfg, out),
        **eval_args,
        "num_train_epochs": cfg.num_train_epochs,
        "max_length": cfg.max_length,
        "warmup_steps": cfg.warmup_steps,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "weight_decay": cfg.weight_decay,
        "packing": cfg.packing,
        "padding_free": cfg.padding_free,
        "use_liger_kernel": cfg.use_liger_kernel,
        # Keys left unset leave the field to TRL's default (or to `sft.trl`).
        **set_only(max_grad_norm=cfg.max_grad_norm),
    }


def build_trainer(recipe: Recipe, out: Path, base: str, tokenizer, train: list[dict], validation: list[dict],
                  callbacks: list | None = None) -> SFTTrainer:
    """The SFTTrainer of this stage: chat data, DoRA/rsLoRA adapter, checkpoints and metrics under `out`."""
    cfg = recipe.sft
    tokenizer.padding_side = "right"  # training pads on the right; generation switches to left
    args = trl_config(SFTConfig, "sft", config_kwargs(recipe, out, bool(validation)), cfg.trl)
    # The model comes after the arguments: they set up the distributed state, under which
    # from_pretrained partitions weights as they load (ZeRO-3's zero.Init) or loads them on rank 0
    # only (FSDP's CPU-RAM-efficient loading), instead of a whole copy in every process.
    model = load_model(base, recipe.model.dtype, recipe.model.revision, recipe.model.trust_remote_code,
                       **model_kwargs(recipe.model))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(validation) if validation else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora),
        callbacks=[JsonlMetrics(out / "metrics.jsonl"), *(callbacks or [])],
    )
    upcast_dora_magnitudes(trainer.model)
    return trainer


def main(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    """Train the SFT adapter; write adapter, merged model, metrics and summary under run_dir/sft."""
    out = rundir.start_stage(run_dir, "sft", recipe, keep=rundir.RESUMABLE if resume else ())
    cfg = recipe.sft
    pool, pool_validation, pool_overlap = pubmedqa.sft_sources(recipe)
    rows, held_out = load_sft_mixture(recipe.data.sft, recipe.seed, recipe.data.sft_limit,
                                      recipe.data.sft_validation_fraction, loaded=pool)
    held_out += pool_validation
    base = rundir.model_for(run_dir, "sft", recipe)
    manifest.record_stage(run_dir, "sft", recipe, base)
    tokenizer = load_tokenizer(base, recipe.model.revision, recipe.model.trust_remote_code)
    train, dropped = drop_overlong([{**to_chat(r, recipe.task.system_prompt), "where": r["where"]} for r in rows],
                                   tokenizer, cfg.max_length)
    validation, dropped_val = drop_overlong(
        [{**to_chat(r, recipe.task.system_prompt), "where": r["where"]} for r in held_out], tokenizer, cfg.max_length)
    if dropped or dropped_val:
        log.warning("sft: dropped %d training and %d validation examples longer than sft.max_length=%d tokens "
                    "(first: %s)", len(dropped), len(dropped_val), cfg.max_length, (dropped + dropped_val)[0])
    if not train:
        raise GazalError(f"sft.max_length: every training example is longer than {cfg.max_length} tokens")
    log.info("sft: %d training and %d validation examples", len(train), len(validation))

    trainer = build_trainer(recipe, out, base, tokenizer, train, validation)
    checkpoint = resume_checkpoint(out) if resume else None
    summary = train_and_save(trainer, trainer.processing_class, run_dir, "sft", {
        "examples": len(train), "validation_examples": len(validation), "dropped_overlong": len(dropped),
        "dropped_overlong_validation": len(dropped_val), "base_model": base,
        "sources": [s.model_dump(mode="json") for s in recipe.data.sft],
        **({"test_overlap": pool_overlap} if pool_overlap else {})}, recipe, base, checkpoint)
    return summary
