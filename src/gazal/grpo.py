"""Stage 2: GRPO with the recipe's multi-component reward (TRL GRPOTrainer), watched by the monitor."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from trl import GRPOConfig, GRPOTrainer

from gazal import audit, difficulty, manifest, pubmedqa, rundir, vllm_sync
from gazal.adapters import MergedRollouts, drop_inert_dropout, lora_config, upcast_dora_magnitudes
from gazal.advantages import gate_on_accuracy, neutral_skips
from gazal.config import Recipe
from gazal.errors import GazalError
from gazal.generation import weight_first_decode
from gazal.models import load_model, load_tokenizer, model_kwargs, resolve_model
from gazal.monitor import JsonlMetrics, MonitorCallback
from gazal.rewards import resolve_reward
from gazal.tasks import completion_text, decode_completion, messages, prompt_text
from gazal.training import common_args, restore_checkpoint, resume_checkpoint, set_only, train_and_save, trl_config

log = logging.getLogger(__name__)


class GazalGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose transformers rollouts run on merged weights, and which writes rollout samples.

    PEFT computes DoRA's weight norm in every forward, so generating through the adapter is several
    times slower than through the base model. For each rollout the adapter is merged into the
    weights and taken out again afterwards. The merge has to see whole weights, so it happens
    inside TRL's own generation context, after TRL has gathered ZeRO-3 parameters: the model's
    `generate` is wrapped for the length of one `_generate_single_turn` call, and TRL calls it
    inside that gather (see `adapters.MergedRollouts` for ZeRO-3, FSDP2 and plain parameters).
    vLLM rollouts are untouched (TRL syncs merged weights to vLLM itself).
    tests/test_grpo.py fails if TRL stops calling `_generate_single_turn` or `generate`.
    """

    merged_rollouts: bool = True
    sampler_logprobs: bool = False
    samples_every: int = 0
    samples_dir: Path | None = None
    accuracy_column: int | None = None  # index of the accuracy reward, when the set has one
    gated_columns: tuple[int, ...] = ()  # rewards counted only where accuracy varies in the group

    def __init__(self, *args, **kwargs):
        self.rollouts = MergedRollouts()
        self.gated_groups = 0
        self.sampler_logprob_batches = 0
        self.sampler_logprob_skipped = 0
        self._sampler_logps: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model)
        if not self.merged_rollouts or self.use_vllm or not isinstance(model, PeftModel):
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        # FSDP registers its own instance-level `generate`; it is kept and put back as it was.
        own = model.__dict__.get("generate")
        generate = model.generate
        self._sampler_logps = None

        def sample(*a, **k):
            with weight_first_decode(model):
                sequences = generate(*a, **k)
            if self.sampler_logprobs:
                # The log-probs of the sampled tokens under the weights that sampled them (merged),
                # computed by TRL's own per-token routine (temperature, fused head) while still merged.
                n = k["input_ids"].shape[1]
                mask = torch.cat([k["attention_mask"], torch.ones_like(sequences[:, n:])], dim=1)
                self._sampler_logps, _, _ = self._get_per_token_logps_and_entropies(
                    model, sequences, mask, sequences.shape[1] - n, batch_size=self.args.per_device_train_batch_size)
            return sequences

        model.generate = lambda *a, **k: self.rollouts.generate(model, sample, *a, **k)
        try:
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        finally:
            if own is None:
                del model.generate
            else:
                model.generate = own
        if self._sampler_logps is not None:
            logprobs = [row[: len(ids)].tolist() for row, ids in zip(self._sampler_logps.float().cpu(), completion_ids)]
        return completion_ids, logprobs

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # The rewards read the completion text by evaluation's decode rule, not TRL's
        # skip_special_tokens=True, which drops <think> where a tokenizer makes it special. In place:
        # TRL logs this same list afterwards, so rollout samples show the text that was rewarded.
        texts = [decode_completion(self.processing_class, ids) for ids in completion_ids_list]
        completions[:] = [[{"role": "assistant", "content": t}] if isinstance(c, list) else t
                          for c, t in zip(completions, texts)]
        # TRL returns every process's rewards gathered, before it groups and normalises them: the
        # one place where a group's accuracy can be seen whole (a group may span processes).
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        size = self.num_generations if mode == "train" else self.num_generations_eval
        if size < 2:
            return rewards
        rewards = neutral_skips(rewards, size)
        if self.accuracy_column is None:
            return rewards
        rewards, constant = gate_on_accuracy(rewards, self.accuracy_column, self.gated_columns, size)
        self._metrics[mode]["gazal/accuracy_zero_std_frac"].append(constant)
        self.gated_groups += round(constant * rewards.shape[0] / size) if self.gated_columns else 0
        return rewards

    def _generate_and_score_completions(self, inputs):
        # tests/test_grpo.py (sampler_logprob_batches, counted only here) fails if TRL stops calling it.
        out = super()._generate_and_score_completions(inputs)
        # Only where Gazal's merged rollouts sampled: under vLLM TRL already multiplies the loss by
        # exp(old - sampler) (its importance sampling correction), and replacing "old" as well would
        # count the mismatch twice and clip against the sampler. Validation refuses the pair; this
        # guard keeps a trainer built by hand honest too.
        if self.sampler_logprobs and not self.use_vllm and "sampling_per_token_logps" in out:
            sampled = out["sampling_per_token_logps"]
            if torch.isnan(sampled[out["completion_mask"].bool()]).any():
                # A missing log-prob must not become NaN in the loss: keep TRL's own old log-probs
                # (or, where it computed none, the learner's, i.e. ratio 1) for this batch.
                self.sampler_logprob_skipped += 1
                log.warning("grpo: a sampler log-prob is NaN; this batch keeps TRL's old log-probs")
            else:
                # The sampler is the behaviour policy: its log-probs are PPO's "old" log-probs, so the
                # ratio (and its clipping) corrects for what merged bfloat16 weights change.
                out["old_per_token_logps"] = sampled
                self.sampler_logprob_batches += 1
        return out

    def importance_correction(self) -> str:
        """Which correction for sampler/learner mismatch this trainer applies, for summary.json."""
        if self.use_vllm:
            return "trl_vllm_importance_sampling" if self.vllm_importance_sampling_correction else "none"
        return "gazal_sampler_logprobs" if self.sampler_logprobs else "none"

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        step = self.state.global_step
        if (self.samples_every and self.samples_dir is not None and step % self.samples_every == 0
                and "loss" in logs and self.accelerator.is_main_process):
            # TRL keeps the latest generation batch in `_logs` (sized to it) for its own completion tables.
            write_samples(self.samples_dir, step, list(self._logs["prompt"]), list(self._logs["completion"]),
                          {name: list(v) for name, v in self._logs["rewards"].items()}, list(self._logs["advantages"]))


def write_samples(folder: Path, step: int, prompts: list, completions: list, rewards: dict[str, list],
                  advantages: list) -> None:
    """Append one step's rollouts to samples.jsonl and a readable table to samples.md."""
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        rows.append({"step": step, "prompt": prompt_text(prompt), "completion": completion_text(completion),
                     "rewards": {name: values[i] for name, values in rewards.items()},
                     "advantage": advantages[i] if i < len(advantages) else None})
    with (folder / "samples.jsonl").open("a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    names = list(rewards)
    md = [f"\n## step {step}\n", "| prompt (end) | completion | " + " | ".join(names) + " | advantage |",
          "|---|---|" + "---|" * len(names) + "---|"]

    def cell(text: str, n: int) -> str:
        return " ".join(text.split())[:n].replace("|", "\\|")

    for r in rows:
        values = " | ".join("—" if r["rewards"][n] is None else f"{r['rewards'][n]:.2f}" for n in names)
        adv = "—" if r["advantage"] is None else f"{r['advantage']:.2f}"
        md.append(f"| …{cell(r['prompt'][-80:], 80)} | {cell(r['completion'], 300)} | {values} | {adv} |")
    with (folder / "samples.md").open("a", encoding="utf-8") as fh:
        fh.write("\n".join(md) + "\n")


def sampler_logprobs(cfg, dtype: str) -> bool:
    """Whether merged rollouts hand their own log-probs to the loss: `grpo.sampler_logprobs`, or by
    default whenever the policy's weights are not float32. In float32 the merged weights sample
    what the adapter computes to ~1e-6 nats per token; in bfloat16 the rounding of merged weights
    moves log-probs by ~0.04 nats (bench/rollout_logprob_gap.py), which the PPO ratio should see.
    float32 weights under bf16 autocast are left out: TRL generates without autocast, so the
    sampler is float32 there and the log-probs, computed under autocast, would not be its own."""
    if cfg.sampler_logprobs is not None:
        return cfg.sampler_logprobs
    return dtype != "float32"


def config_kwargs(recipe: Recipe, out: Path) -> dict[str, Any]:
    """GRPOConfig arguments Gazal sets from the recipe (the `grpo.trl` mapping adds the rest)."""
    cfg = recipe.grpo
    vllm: dict[str, Any] = {"use_vllm": cfg.use_vllm}
    if cfg.use_vllm:
        vllm.update(vllm_mode=cfg.vllm_mode, vllm_server_base_url=cfg.vllm_server_base_url,
                    vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                    **set_only(vllm_tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                               vllm_enable_sleep_mode=cfg.vllm_enable_sleep_mode,
                               vllm_importance_sampling_correction=cfg.vllm_importance_sampling_correction))
    return {
        **common_args(recipe, cfg, out),
        **vllm,
        "warmup_steps": cfg.warmup_steps,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "steps_per_generation": cfg.steps_per_generation,
        "num_generations": cfg.num_generations,
        "max_completion_length": cfg.max_completion_length,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "beta": cfg.beta,
        "epsilon": cfg.epsilon,
        "epsilon_high": cfg.epsilon_high,
        "loss_type": cfg.loss_type,
        "scale_rewards": cfg.scale_rewards,
        "mask_truncated_completions": cfg.mask_truncated_completions,
        "num_iterations": cfg.num_iterations,
        # Keys left unset leave the field to TRL's default (or to `grpo.trl`).
        **set_only(importance_sampling_level=cfg.importance_sampling_level,
                   top_entropy_quantile=cfg.top_entropy_quantile, max_grad_norm=cfg.max_grad_norm,
                   weight_decay=cfg.weight_decay),
        "multi_objective_aggregation": cfg.multi_objective_aggregation,
        "reward_weights": [spec.weight for spec in cfg.rewards],
        # Merged-weight rollouts sample without dropout; the learning forward must match them.
        "disable_dropout": cfg.disable_dropout,
    }


def _policy(recipe: Recipe, run_dir: Path):
    """The model to train and the PEFT config to give TRL (None when the model already has its adapter)."""
    cfg = recipe.grpo
    if cfg.adapter == "continue":
        adapter = run_dir / "sft" / "adapter"
        if not rundir.is_done(run_dir, "sft") or not (adapter / "adapter_config.json").is_file():
            raise GazalError(f"grpo.adapter: 'continue' needs a finished SFT adapter in {adapter}")
        base = resolve_model(recipe.model.name_or_path, recipe.model.revision)
        model = load_model(base, recipe.model.dtype, recipe.model.revision, recipe.model.trust_remote_code,
                           **model_kwargs(recipe.model))
        log.info("grpo continues the SFT adapter %s on %s", adapter, base)
        from transformers.integrations import is_deepspeed_zero3_enabled

        # PEFT upcasts a loaded adapter (DoRA magnitudes included) to float32 by default. Under
        # ZeRO-3 that mixes dtypes in DeepSpeed's partition buffer, which fails at the first step;
        # TRL turns the upcast off there for the adapters it builds, and so does Gazal for this one
        # (DeepSpeed's float32 master weights keep the updates; see upcast_dora_magnitudes).
        return (PeftModel.from_pretrained(model, str(adapter), is_trainable=True,
                                          autocast_adapter_dtype=not is_deepspeed_zero3_enabled()), None, base)
    base = rundir.model_for(run_dir, "grpo", recipe)
    model = load_model(base, recipe.model.dtype, recipe.model.revision, recipe.model.trust_remote_code,
                       **model_kwargs(recipe.model))
    return model, lora_config(cfg.lora), base


def main(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    """Train the GRPO adapter; write adapter, merged model, metrics, events and samples under run_dir/grpo."""
    resumable = rundir.RESUMABLE + ("events.jsonl", "samples.jsonl", "samples.md") if resume else ()
    # The difficulty estimate is kept even without --resume: each row carries the key of what sampled it.
    out = rundir.start_stage(run_dir, "grpo", recipe, keep=resumable + difficulty.FILES)
    cfg = recipe.grpo
    items = pubmedqa.grpo_questions(recipe)
    start = rundir.model_for(run_dir, "grpo", recipe)
    if cfg.adapter == "continue":  # the policy: the base model with SFT's adapter, trained further
        manifest.record_stage(run_dir, "grpo", recipe, resolve_model(recipe.model.name_or_path, recipe.model.revision),
                              adapter=run_dir / "sft" / "adapter")
    else:
        manifest.record_stage(run_dir, "grpo", recipe, start)
    tokenizer = load_tokenizer(start, recipe.model.revision, recipe.model.trust_remote_code)
    audit.check_or_refuse(recipe, tokenizer)  # before loading weights: a gameable reward stops here
    reward_funcs = [resolve_reward(s.name, s.params, tokenizer, cfg.max_completion_length) for s in cfg.rewards]
    filtered = None
    if cfg.difficulty_filter.enabled:  # sampled from the starting policy, freed before the trainer loads
        items, filtered = difficulty.run(items, recipe, start, out)
    # The dataset's extra columns (answer, options, labels) reach every reward function as keywords.
    dataset = Dataset.from_list(
        [{"prompt": messages(it, recipe.task), "answer": it.answer, "options": it.options, "labels": it.labels}
         for it in items]
    )
    log.info("grpo: %d questions from %s", len(dataset), recipe.data.grpo)

    args = trl_config(GRPOConfig, "grpo", config_kwargs(recipe, out), cfg.trl)
    # The model comes after the arguments: they set up the distributed state, under which
    # from_pretrained partitions weights as they load (ZeRO-3's zero.Init) or loads them on rank 0
    # only (FSDP's CPU-RAM-efficient loading), instead of a whole copy in every process.
    model, peft_config, base = _policy(recipe, run_dir)
    monitor = MonitorCallback(cfg.monitor, out / "events.jsonl") if cfg.monitor.enabled else None
    trainer = GazalGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[JsonlMetrics(out / "metrics.jsonl"), *([monitor] if monitor else [])],
    )
    trainer.merged_rollouts, trainer.samples_every, trainer.samples_dir = cfg.merged_rollouts, cfg.samples_every, out
    names = [spec.name for spec in cfg.rewards]
    trainer.accuracy_column = names.index("accuracy") if "accuracy" in names else None
    trainer.gated_columns = tuple(i for i, spec in enumerate(cfg.rewards) if spec.only_when_accuracy_varies)
    trainer.sampler_logprobs = cfg.merged_rollouts and not cfg.use_vllm and sampler_logprobs(cfg, recipe.model.dtype)
    # TRL's PEFT sync gathers the whole model at once under ZeRO-3; Gazal's sends one layer at a
    # time, DoRA folded in (vLLM cannot serve DoRA adapters). tests/test_grpo_vllm.py fails if
    # TRL stops calling `vllm_generation.sync_weights`.
    layerwise = vllm_sync.install(trainer) if cfg.use_vllm else None
    upcast_dora_magnitudes(trainer.model)
    # TRL's disable_dropout has set every rate to 0; PEFT's DoRA still recomputes base projections
    # for a Dropout module whatever its rate.
    inert_dropout = drop_inert_dropout(trainer.model) if cfg.disable_dropout else 0
    if monitor is not None:
        monitor.restore = lambda path: restore_checkpoint(trainer, path)
    checkpoint = resume_checkpoint(out) if resume else None
    if monitor is not None and checkpoint is not None:  # history and rollbacks from before the checkpoint
        monitor.resume(out / "metrics.jsonl", out / "events.jsonl", int(checkpoint.rsplit("-", 1)[1]))
    summary = {"questions": len(dataset), "base_model": base, "adapter": cfg.adapter,
               "rewards": {spec.name: spec.weight for spec in cfg.rewards}, "inert_dropout_replaced": inert_dropout}
    if filtered is not None:
        summary["difficulty_filter"] = filtered
    if monitor is not None:
        summary["monitor_rollbacks"] = monitor.rollbacks  # filled in while training
    summary = train_and_save(trainer, tokenizer, run_dir, "grpo", summary, recipe, base, checkpoint,
                          stopped=(lambda: monitor.stopped) if monitor else None,
                          extra=lambda: {"merged_rollout_generations": trainer.rollouts.calls,
                                         "importance_correction": trainer.importance_correction(),
                                         **({"vllm_weight_sync": layerwise.summary()} if layerwise else {}),
                                         "sampler_logprob_batches": trainer.sampler_logprob_batches,
                                         "sampler_logprob_batches_skipped": trainer.sampler_logprob_skipped,
                                         "groups_gated_on_accuracy": trainer.gated_groups})
    return summary
