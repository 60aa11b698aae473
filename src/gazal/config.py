"""The recipe's schema: one typed, documented section per stage, and the checks that need only
the recipe itself (its validators). Loading a YAML file, overrides and the checks that look at files,
installed packages and the training libraries are in `gazal.recipes`.

Each field's docstring is its documentation (`gazal validate --explain` prints them).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from gazal.errors import RecipeError
from gazal.tasks import TaskSettings

log = logging.getLogger(__name__)


# transformers schedulers that need no extra arguments (cosine_with_min_lr and friends need lr_scheduler_kwargs).
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "inverse_sqrt"]


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class LoraSettings(_Section):
    """PEFT adapter settings (Gazal-R1 uses DoRA with rank-stabilised scaling)."""

    r: int = Field(16, gt=0)
    """Adapter rank."""
    alpha: float = Field(32.0, gt=0)
    """Scaling numerator; with rsLoRA the scale is alpha / sqrt(r) instead of alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input. With DoRA a rate above 0 costs compute: PEFT then runs each
    base projection a second time on the dropped-out input (bench/sft_throughput.py, 'dora' vs
    'dora+dropout'). In GRPO, where TRL's disable_dropout sets the rate to 0, Gazal removes the
    dropout layers so the projection runs once."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or 'all-linear' for every linear layer except the output head."""
    use_dora: bool = True
    """Weight-decomposed low-rank adaptation (DoRA): learn a magnitude vector per output feature."""
    use_rslora: bool = True
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""


class ModelSettings(_Section):
    """Which base model to start from."""

    name_or_path: str = "gazal:smollm2-135m-instruct"
    """A Hugging Face model id, a local directory, or a model Gazal provides offline:
    'gazal:smollm2-135m-instruct' (embedded GGUF, converted once to safetensors) or
    'gazal:tiny-qwen3' (a 2-layer Qwen3 built locally, for tests)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin when loading from the hub."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for training and generation."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run."""
    attn_implementation: str | None = None
    """Attention kernel for training and transformers generation: 'sdpa', 'eager', 'flash_attention_2',
    'flash_attention_3', 'flex_attention', or a kernels-hub id (None: transformers' default)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other keyword arguments of `from_pretrained` (e.g. {use_cache: false}); dtype, revision,
    trust_remote_code and attn_implementation have keys of their own."""

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value: str | None) -> str | None:
        known = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
        if value is None or value in known or "/" in value:  # "/": a kernels-hub repository
            return value
        raise ValueError(f"unknown attention implementation (known: {', '.join(known)}, or a kernels-hub id)")


class SFTSource(_Section):
    """One source of SFT examples; several sources with weights make a mixture."""

    path: str
    """'seed:sft', a local .jsonl/.json/.parquet file, or a hub dataset id such as
    'TachyHealth/structured_medical'."""
    config: str | None = None
    """Hub dataset configuration (subset) name."""
    split: str = "train"
    """Hub dataset split."""
    revision: str | None = None
    """Hub dataset revision (branch, tag or commit) to pin."""
    weight: float = Field(1.0, gt=0)
    """Share of this source in the mixture: 1 uses every row once, 0.25 a seeded random quarter,
    2.5 every row twice plus a random half."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Gazal field -> this source's column, for fields named differently here: case, reasoning,
    answer, or messages (chat rows whose last turn is the assistant's)."""
    limit: int | None = Field(None, gt=0)
    """Use at most the first N rows of this source (before weighting)."""
    rows: int | None = Field(None, gt=0)
    """Rows this source holds, declared for a source that is not on this machine (a hub dataset), so
    `gazal validate` and `gazal plan` can estimate SFT's optimizer steps (gazal.sft_steps) without
    downloading it. A local file, seed set or pool is counted instead. None: not declared."""
    mean_tokens: int | None = Field(None, gt=0)
    """Mean tokens of one of this source's examples with the chat template applied, declared beside
    `rows`: with sft.packing the step estimate needs the data's tokens. None: not declared."""

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - {"case", "reasoning", "answer", "messages"})
        if unknown:
            raise ValueError(f"unknown Gazal field(s) {unknown}; map case, reasoning, answer or messages")
        return value


class PoolFolds(_Section):
    """How a `pubmedqa:` pool is shared out: label-stratified folds, each used by one part only."""

    k: int = Field(10, ge=2)
    """Number of folds (the PubMedQA authors cross-validate on 10 folds of 50)."""
    sft: list[int] = Field(default_factory=list)
    """Folds SFT trains on."""
    grpo: list[int] = Field(default_factory=list)
    """Folds GRPO trains on."""
    validation: list[int] = Field(default_factory=list)
    """Held-out folds: SFT's evaluation loss (every sft.eval_steps, else once per epoch); never trained on."""

    @model_validator(mode="after")
    def _disjoint(self) -> PoolFolds:
        named = [("sft", self.sft), ("grpo", self.grpo), ("validation", self.validation)]
        for part, values in named:
            bad = [f for f in values if not 0 <= f < self.k]
            if bad:
                raise RecipeError(("data", "pool_folds", part), f"data.pool_folds.{part}: folds {bad} are not in "
                                  f"0..{self.k - 1} (k={self.k})")
        for i, (a, va) in enumerate(named):
            for b, vb in named[i + 1:]:
                if set(va) & set(vb):
                    raise RecipeError(("data", "pool_folds", b), f"data.pool_folds: folds {sorted(set(va) & set(vb))} "
                                      f"are in both {a} and {b}; each fold serves one part only")
        return self


class DataSettings(_Section):
    """Training data. 'seed:sft' and 'seed:grpo' are the examples bundled with Gazal."""

    sft: list[SFTSource] = Field(default_factory=lambda: [SFTSource(path="seed:sft")])
    """SFT sources: a path or hub id, or a list of sources with weights and column mappings. Rows are
    {case, reasoning, answer} or chat {messages}."""
    grpo: str = "seed:grpo"
    """GRPO questions: a JSONL file of {question, options, answer} rows, or 'seed:grpo'."""
    sft_limit: int | None = Field(None, gt=0)
    """Use at most this many SFT examples after mixing (None: all)."""
    grpo_limit: int | None = Field(None, gt=0)
    """Use at most this many GRPO questions (None: all)."""
    sft_validation_fraction: float = Field(0.0, ge=0, lt=1)
    """Fraction of the SFT mixture held out for evaluation loss during training (0: none)."""
    pool_folds: PoolFolds | None = None
    """For `pubmedqa:` sources: which label-stratified folds SFT, GRPO and the validation slice use
    (None: both stages use the whole pool and nothing is held out)."""

    @field_validator("sft", mode="before")
    @classmethod
    def _one_source(cls, value: Any) -> Any:
        # A bare string is the common case: one source, every row once.
        if isinstance(value, str):
            return [{"path": value}]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value


class SFTSettings(_Section):
    """Stage 1: supervised fine-tuning on structured clinical reasoning (TRL SFTTrainer)."""

    enabled: bool = True
    """Run this stage in `gazal run`."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    num_train_epochs: float = Field(1.0, gt=0)
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: use num_train_epochs)."""
    per_device_train_batch_size: int = Field(4, gt=0)
    """Examples per device per forward pass."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Forward passes per optimizer step."""
    max_length: int = Field(1024, gt=0)
    """Longest example in tokens."""
    warmup_steps: float = Field(0.0, ge=0)
    """Learning-rate warmup: a whole number of steps, or a fraction of all steps if below 1."""
    lr_scheduler_type: Scheduler = "cosine"
    """transformers scheduler name (cosine, linear, constant, ...)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float | None = Field(None, ge=0)
    """Gradient clipping norm (0: no clipping; None: TRL's default, 1.0, or `sft.trl`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    bf16: bool = False
    """Mixed precision in bfloat16 (GPUs)."""
    logging_steps: int = Field(1, gt=0)
    """Log metrics every this many steps."""
    save_steps: int = Field(50, ge=0)
    """Write a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) every this
    many steps; 0: none. `--resume` continues from the newest one."""
    save_total_limit: int | None = Field(2, gt=0)
    """Keep only the newest N checkpoints (None: all)."""
    eval_steps: int | None = Field(None, gt=0)
    """Evaluation loss on the held-out split every this many steps (None: once per epoch)."""
    packing: bool = False
    """Pack several examples into each max_length row (TRL best-fit packing, padding-free): no
    compute is spent on padding. Examples never attend across their boundaries."""
    padding_free: bool = False
    """Concatenate a batch without padding (position ids mark example boundaries); implied by packing."""
    use_liger_kernel: bool = False
    """Liger Triton kernels (fused cross-entropy etc.) on GPUs; needs the gpu extra."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    trl: dict[str, Any] = Field(default_factory=dict)
    """Any other field of TRL's SFTConfig (e.g. max_grad_norm, neftune_noise_alpha), checked against
    the dataclass at validation; fields Gazal sets from its own keys are refused, naming that key."""
    """The adapter trained in this stage."""


class RewardSpec(_Section):
    """One reward component: its registered name, its weight and its own parameters."""

    name: str
    """A name from gazal.rewards.REWARDS, or a dotted path 'package.module:function'."""
    weight: float = 1.0
    """Weight of this component in the total reward."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword parameters for the reward factory."""
    only_when_accuracy_varies: bool = False
    """Count this component only in groups whose accuracy varies (some completions right, some wrong).
    In a group that is all right or all wrong, its values are replaced by their group mean, so it adds
    no advantage there: a secondary reward (length, style) cannot be the whole learning signal on
    questions that are too easy or too hard. Needs an `accuracy` component in the set."""


class MonitorSettings(_Section):
    """The GRPO training monitor: reward-hacking and instability rules, their thresholds and actions."""

    enabled: bool = True
    """Watch every logged step; events go to grpo/events.jsonl and the log."""
    window: int = Field(6, ge=2)
    """Steps compared for trends (newer half vs older half) and for baselines and medians."""
    accuracy_flat: float = 0.02
    """reward_hacking: accuracy counts as flat when its trend is at most this."""
    proxy_rise: float = Field(0.15, gt=0)
    """reward_hacking: the format or total reward trend that, with flat accuracy, looks like hacking."""
    rate_rise: float = Field(0.15, gt=0)
    """Rise in hedge, no-answer or format-failure rate (or in repetition penalty) over the window that fires."""
    length_low: float = Field(0.4, gt=0, lt=1)
    """length_collapse: mean completion length below this fraction of its starting level."""
    length_high: float = Field(2.5, gt=1)
    """length_explosion: mean completion length above this multiple of its starting level."""
    clipped_max: float = Field(0.8, gt=0, le=1)
    """length_explosion: fraction of completions cut at max_completion_length that fires."""
    zero_std_max: float = Field(0.95, gt=0, le=1)
    """zero_std: frac_reward_zero_std at or above this ..."""
    patience: int = Field(4, ge=1)
    """... for this many logged steps in a row."""
    accuracy_zero_std_max: float = Field(0.9, gt=0, le=1)
    """accuracy_zero_std: gazal/accuracy_zero_std_frac (groups whose accuracy reward is all 0 or all 1)
    at or above this for `patience` logged steps in a row."""
    entropy_low: float = Field(0.3, gt=0, lt=1)
    """entropy_collapse: entropy below this fraction of its starting level."""
    entropy_high: float = Field(2.0, gt=1)
    """entropy_blowup: entropy above this multiple of its starting level."""
    kl_max: float = Field(1.0, gt=0)
    """kl_spike: KL to the reference above this always fires."""
    spike_factor: float = Field(5.0, gt=1)
    """kl_spike, grad_norm_spike: a value above this multiple of its recent median fires."""
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1)
    """rollback: the learning rate is multiplied by this after restoring the last good checkpoint."""
    max_rollbacks: int = Field(2, ge=0)
    """rollback: at most this many rollbacks in a run (a resumed run counts those in its events.jsonl);
    the next rule whose action is rollback stops training instead."""
    actions: dict[
        Literal["reward_hacking", "hedge_rate_rising", "no_answer_rate_rising", "format_failure_rising",
                "length_collapse", "length_explosion", "repetition_rising", "zero_std", "accuracy_zero_std",
                "entropy_collapse", "entropy_blowup", "kl_spike", "grad_norm_spike", "nan_loss"],
        Literal["warn", "stop", "rollback"],
    ] = Field(default_factory=lambda: {"nan_loss": "rollback", "entropy_blowup": "stop"})
    """What each rule does when it fires (rules not listed warn): warn, stop (with a clear message),
    or rollback (restore the last checkpoint, lower the learning rate, go on)."""


class DifficultyFilterSettings(_Section):
    """Before GRPO, drop the questions the starting policy gets all right or all wrong in k samples (gazal.difficulty)."""

    # A group whose completions are all right or all wrong has no accuracy signal. TRL 1.16 has no
    # DAPO dynamic sampling, which would resample such groups during training, so Gazal filters once,
    # before training. Rows go to grpo/pass_rates.jsonl; a rerun reuses the rows that the same model,
    # decoding, task, seed and samples produced.

    enabled: bool = False
    """Filter the GRPO questions before training (the counts go to grpo/summary.json)."""
    samples: int = Field(4, ge=2)
    """Completions sampled per question (k), with the rollouts' decoding: grpo.temperature, top_p,
    max_completion_length, and top_k, min_p and chat_template_kwargs from grpo.trl."""
    min_correct: int = Field(1, ge=0)
    """Keep a question only if at least this many of its k completions are right (fewer: too hard)."""
    min_wrong: int = Field(1, ge=0)
    """Keep a question only if at least this many of its k completions are wrong (fewer: too easy)."""
    prompts_per_call: int = Field(8, gt=0)
    """Questions per generate call (x samples sequences): a CPU decode step's cost grows far slower
    than its rows. A kill loses the call in flight."""
    max_prompts: int | None = Field(None, gt=0)
    """Estimate at most this many questions, the first of a seeded shuffle, to bound the cost; the
    rest are not trained on. None: all."""


class GRPOSettings(_Section):
    """Stage 2: GRPO with a multi-component reward (TRL GRPOTrainer)."""

    enabled: bool = True
    """Run this stage in `gazal run`."""
    learning_rate: float = Field(1e-5, gt=0)
    """Peak learning rate."""
    max_steps: int = Field(10, gt=0)
    """Optimizer steps."""
    warmup_steps: float = Field(0.0, ge=0)
    """Learning-rate warmup: a whole number of steps, or a fraction of all steps if below 1."""
    lr_scheduler_type: Scheduler = "linear"
    """transformers scheduler name (linear, TRL's default, decays to zero by max_steps; constant, cosine, ...)."""
    per_device_train_batch_size: int = Field(4, gt=0)
    """Completions per device per forward pass; times steps_per_generation, a multiple of num_generations."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Forward passes per optimizer step."""
    steps_per_generation: int | None = Field(None, gt=0)
    """Forward passes each rollout batch serves (None: gradient_accumulation_steps). Above that, one
    generation call samples for several optimizer steps, and TRL corrects the staleness by importance
    sampling; rewards are then logged on the steps that generate."""
    num_generations: int = Field(4, ge=2)
    """Completions sampled per question (the GRPO group)."""
    max_completion_length: int = Field(256, gt=0)
    """Longest completion in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature for rollouts."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling for rollouts."""
    beta: float = Field(0.0, ge=0)
    """KL weight; 0 loads no reference model."""
    epsilon: float = Field(0.2, gt=0)
    """Lower clipping range."""
    epsilon_high: float | None = None
    """Upper clipping range (DAPO clip-higher); None: same as epsilon."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """How token losses are normalised."""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """How TRL combines the components: weight and sum, then normalise per group (GRPO), or normalise
    each component within its group, then weight and sum (GDPO; each component then moves the policy
    in proportion to its weight, not to its spread; TRL normalises the sum over the batch and ignores
    scale_rewards)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the reward std of the group, the batch, or not at all."""
    mask_truncated_completions: bool = False
    """Exclude completions cut at max_completion_length from the loss."""
    num_iterations: int = Field(1, gt=0)
    """Optimisation passes per generated batch."""
    importance_sampling_level: Literal["token", "sequence"] | None = None
    """PPO ratio per token (GRPO/DAPO) or one per sequence, the mean log-ratio over its tokens (GSPO;
    pair it with loss_type grpo, as the GSPO paper does). None: TRL's default, token."""
    top_entropy_quantile: float | None = Field(None, ge=0, le=1)
    """Keep in the loss only this top quantile of tokens by entropy ('Beyond the 80/20 rule'
    recommends 0.2). None: TRL's default, 1.0 (all tokens)."""
    max_grad_norm: float | None = Field(None, ge=0)
    """Gradient clipping norm (0: no clipping). None: TRL's default, 1.0 (or `grpo.trl`)."""
    weight_decay: float | None = Field(None, ge=0)
    """AdamW weight decay on the adapter. None: TRL's default, 0."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower; TRL turns it on by default)."""
    bf16: bool = False
    """Mixed precision in bfloat16 (GPUs)."""
    logging_steps: int = Field(1, gt=0)
    """Log metrics every this many steps."""
    save_steps: int = Field(50, ge=0)
    """Write a resumable checkpoint every this many steps; 0: none. `--resume` continues from the newest."""
    save_total_limit: int | None = Field(2, gt=0)
    """Keep only the newest N checkpoints (None: all)."""
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(dropout=0.0))
    trl: dict[str, Any] = Field(default_factory=dict)
    """Any other field of TRL's GRPOConfig (e.g. top_k, repetition_penalty, delta), checked against
    the dataclass at validation; fields Gazal sets from its own keys are refused, naming that key."""
    """The adapter trained in this stage, on top of the merged SFT model. Its dropout defaults to
    0: rollouts sample without dropout, so a training forward with it would learn a policy other
    than the one that sampled."""
    disable_dropout: bool = True
    """Turn every dropout layer of the policy off for GRPO (TRL's disable_dropout), adapter dropout
    included, so the policy that samples is the policy that learns."""
    merged_rollouts: bool = True
    """Generate rollouts with the adapter merged into the weights (base-model speed; DoRA through
    PEFT generates several times slower). False: TRL's default, generating through the adapter."""
    sampler_logprobs: bool | None = None
    """With merged rollouts: compute each sampled token's log-prob under the merged weights that
    sampled it and use it as PPO's old log-prob, so the ratio corrects for the difference between
    merged sampling and the adapter forward that learns (one extra forward per rollout batch).
    None: on when model.dtype is not float32 (bfloat16 rounding of merged weights is measurable)
    and rollouts are Gazal's own; never under use_vllm, where TRL's importance sampling correction
    (vllm_importance_sampling_correction) is the one correction applied."""
    adapter: Literal["new", "continue"] = "new"
    """new: merge the SFT adapter into the weights and train a fresh adapter on top (the paper's
    two-stage setup); continue: keep training the SFT adapter itself on the base model."""
    use_vllm: bool = False
    """Roll out with vLLM (GPU, gpu extra); TRL syncs the merged adapter weights into it every step."""
    vllm_mode: Literal["colocate", "server"] = "colocate"
    """colocate: vLLM shares the training GPUs; server: a separate `trl vllm-serve` process."""
    vllm_server_base_url: str | None = None
    """Server mode: the URL of `trl vllm-serve` (e.g. http://localhost:8000)."""
    vllm_server_tensor_parallel_size: int | None = Field(None, gt=0)
    """Server mode: the --tensor-parallel-size `trl vllm-serve` is started with. It does not start the
    server; it tells `gazal plan` the server's GPUs (tensor x data parallel, on nodes of their own,
    beside the training processes') and what each holds. None: not declared, and plan cannot count
    the server's GPUs (`gazal plan --strict` refuses)."""
    vllm_server_data_parallel_size: int | None = Field(None, gt=0)
    """Server mode: the server's --data-parallel-size (engine replicas of vllm_server_tensor_parallel_size
    GPUs each). None: 1. TRL 1.16's vllm-serve says values above 1 error for dense models (vLLM PR
    #30739), so `gazal plan` refuses them: use tensor parallelism alone."""
    vllm_server_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Server mode: the server's --gpu-memory-utilization (trl vllm-serve's default, 0.9), for `gazal
    plan`'s estimate of its KV cache."""
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Colocate mode: the share of GPU memory vLLM may take."""
    vllm_tensor_parallel_size: int | None = Field(None, gt=0)
    """Colocate mode: GPUs each vLLM engine shards the policy over (server mode: the server's flag).
    None: TRL's default, 1."""
    vllm_enable_sleep_mode: bool | None = None
    """Colocate mode: vLLM offloads its weights and cache during the optimizer step (less memory,
    slower wake-up). None: TRL's default, off."""
    vllm_importance_sampling_correction: bool | None = None
    """Correct the PPO ratio for vLLM's sampling log-probs differing from the trainer's (TRL's
    truncated importance sampling). None: TRL's default, on."""
    samples_every: int = Field(5, ge=0)
    """Every this many steps, append the latest rollouts (prompt, completion, each reward component,
    advantage) to grpo/samples.jsonl and grpo/samples.md; 0: never."""
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    """Rules that catch reward hacking and instability while training."""
    difficulty_filter: DifficultyFilterSettings = Field(default_factory=DifficultyFilterSettings)
    """Keep only questions whose pass rate under the starting policy is neither all right nor all wrong."""
    skip_reward_audit: bool = False
    """Start training even if `gazal rewards audit` finds a completion that games the reward."""
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="accuracy", weight=1.0), RewardSpec(name="format", weight=0.5)]
    )
    """Reward components and their weights."""


BenchmarkName = Literal["medqa", "mmlu_pro", "pubmedqa", "medmcqa"]


# Sampling presets for thinking models, as their makers advise (Qwen3 model card, "Best Practices":
# thinking mode temperature 0.6, top-p 0.95, top-k 20, min-p 0; greedy decoding is advised against
# there because it can loop). A preset fills only the decoding keys the recipe leaves unset.
DECODING_PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0, "top_p": 1.0, "top_k": None, "min_p": None},
    "qwen3-thinking": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    "qwen3-non-thinking": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0},
}


class EvalSettings(_Section):
    """Evaluation on the medical benchmarks."""

    enabled: bool = True
    """Run this stage in `gazal run`."""
    benchmarks: list[BenchmarkName] = Field(default_factory=lambda: ["medqa", "mmlu_pro", "pubmedqa"])
    """Benchmarks to evaluate."""
    limit: int | None = Field(None, gt=0)
    """Evaluate only N items of each benchmark (None: all); which N is `limit_strategy`."""
    limit_strategy: Literal["stratified", "first"] = "stratified"
    """How `limit` picks items: 'stratified', a seeded random sample in proportion to each (gold label,
    category) stratum (the first 50 PubMedQA items are all 'yes': a first-N run measures a bias);
    'first', the first N in file order."""
    limit_seed: int | None = None
    """Seed of the stratified sample (None: the recipe's seed). The chosen ids go into results.json."""
    benchmarks_dir: str | None = None
    """Directory of local benchmark JSONL files; None: $GAZAL_BENCHMARKS_DIR, else the hub."""
    mmlu_pro_categories: list[str] = Field(default_factory=lambda: ["health"])
    """MMLU-Pro categories that make up 'MMLU-Pro medical'."""
    modes: list[Literal["reasoning", "direct"]] = Field(default_factory=lambda: ["reasoning"], min_length=1)
    """'reasoning': the task's prompt (think, then answer). 'direct': the same question with
    `direct_instruction` instead (answer at once, `direct_max_new_tokens`), greedy: what the model
    recalls without reasoning. With both, the report shows recall against reasoning item by item."""
    direct_instruction: str = ("Do not explain or think step by step. Reply with only one line: 'The answer is' "
                               "followed by the {what}.")
    """Instruction of the direct mode; {what} becomes 'option letter' or 'yes, no or maybe'."""
    direct_max_new_tokens: int = Field(16, gt=0)
    """Token budget of a direct answer (after `direct_prefill`)."""
    direct_prefill: str = "<think>\n\n</think>\n\nThe answer is"
    """Text the direct answer's assistant turn starts with; the model continues it, and the text
    scored is this prefill plus the continuation. The default closes an empty think block and opens
    the answer statement, as Qwen3's non-thinking template does: a model trained to think would
    otherwise start <think> whatever the instruction says, and its direct answer would be cut off
    unanswered. With a template that closes the block itself (Qwen3 with
    direct_chat_template_kwargs {enable_thinking: false}) use 'The answer is'; '' turns it off."""
    stages: list[Literal["base", "sft", "grpo"]] | None = None
    """The stage report card: evaluate each listed stage's model ('base': the recipe's model; 'sft',
    'grpo': that stage's merged model, when it finished) on the same items with the same decoding,
    and compare consecutive stages and the first with the last item by item (paired tests). The last
    evaluated stage's results are eval/results.json as before; the others go to eval/stages/<stage>/.
    None: only the newest finished stage's model."""
    limits: dict[BenchmarkName, PositiveInt] = Field(default_factory=dict)
    """Per-benchmark `limit`, overriding it (e.g. {pubmedqa: 300, medqa: 40}): a study's own test set
    in full, other benchmarks on a small stratified sample to show forgetting."""
    cache: bool = False
    """Reuse finished evaluations of the same model (by weight-file content), items, prompts and
    decoding from Gazal's cache ($GAZAL_CACHE/eval): the base model of a recipe is then evaluated once,
    not once per run. Cached completions are scored again by the current extractor."""
    max_new_tokens: int = Field(512, gt=0)
    """Longest generation per item."""
    batch_size: int = Field(8, gt=0)
    """Items per fixed batch of a benchmark (items are sorted by prompt length first, so a batch pads
    little): the unit that is seeded, resumed and shared between processes."""
    generation_batch_size: int | None = Field(None, gt=0)
    """Sequences per generate call for greedy reasoning-mode decoding: fixed batches of every
    benchmark are packed up to it (a CPU decode step's cost grows far slower than its rows, and a
    benchmark smaller than `batch_size` would leave a call part-empty). None: one fixed batch per
    call. Sampled decoding never packs, so each fixed batch keeps its own seed; direct mode never
    packs either (a few new tokens: its cost is the prompt, which packing pads). A kill loses the
    packed call in flight, not only one fixed batch."""
    preset: Literal["greedy", "qwen3-thinking", "qwen3-non-thinking"] | None = None
    """Decoding preset (see DECODING_PRESETS); it sets temperature, top_p, top_k and min_p where the
    recipe does not set them itself."""
    temperature: float = Field(0.0, ge=0)
    """0 is greedy decoding."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling when temperature > 0."""
    top_k: int | None = Field(None, gt=0)
    """Sample only among the k likeliest tokens (None: no limit)."""
    min_p: float | None = Field(None, ge=0, le=1)
    """Drop tokens less likely than min_p x the likeliest (None or 0: off)."""
    num_samples: int = Field(1, gt=0)
    """Completions per item; accuracy is their mean, with an interval over items. More than 1 needs
    temperature > 0."""
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments of the chat template, for both backends (Qwen3: {enable_thinking: true})."""
    direct_chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """What the direct mode changes in `chat_template_kwargs` (Qwen3: {enable_thinking: false}, so the
    template closes an empty think block and the model answers at once)."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """Generation engine: transformers (CPU or GPU) or vLLM (GPU, `pip install gazal[gpu]`)."""
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of GPU memory vLLM may take."""
    vllm_tensor_parallel_size: int = Field(1, gt=0)
    """GPUs one vLLM engine shards the model over."""
    vllm_data_parallel_size: int = Field(1, gt=0)
    """vLLM engines (replicas) that evaluate shares of the items at once, each on its own
    `vllm_tensor_parallel_size` GPUs; `gazal eval` starts them as subprocesses."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + completion vLLM plans its KV cache for (None: the model's own limit)."""

    @model_validator(mode="after")
    def _apply_preset(self) -> EvalSettings:
        if self.preset:
            for key, value in DECODING_PRESETS[self.preset].items():
                if key not in self.model_fields_set:
                    object.__setattr__(self, key, value)
        return self


class SynthSettings(_Section):
    """`gazal data synth`: generate SFT examples through an OpenAI-compatible chat endpoint."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """The endpoint: `gazal serve`, a vLLM server, or a hosted API."""
    model: str = "gazal"
    """Model name to ask the endpoint for."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (never written to logs or files); unset: no key."""
    templates_dir: str | None = None
    """Folder of <category>.txt prompt templates; None: the templates shipped with Gazal."""
    categories: list[str] = Field(default_factory=lambda: ["diagnostic", "uncertainty", "treatment", "prognosis"])
    """Reasoning categories; each needs a template file."""
    specialties: list[str] = Field(default_factory=lambda: [
        "cardiology", "pulmonology", "gastroenterology", "nephrology", "endocrinology", "neurology",
        "infectious disease", "hematology", "rheumatology", "obstetrics", "pediatrics", "psychiatry"])
    """Seed dimension: the specialty of each case."""
    care_settings: list[str] = Field(default_factory=lambda: [
        "emergency department", "outpatient clinic", "inpatient ward", "intensive care unit"])
    """Seed dimension: where the patient is seen."""
    patient_profiles: list[str] = Field(default_factory=lambda: [
        "a young adult", "a pregnant woman", "an older adult with several comorbidities", "a child",
        "a middle-aged adult"])
    """Seed dimension: who the patient is."""
    complexities: list[str] = Field(default_factory=lambda: ["straightforward", "moderately complex", "complex"])
    """Seed dimension: how hard the case is."""
    num_items: int = Field(100, gt=0)
    """Examples to generate; seed combinations are drawn in a fixed order from the recipe seed."""
    concurrency: int = Field(4, gt=0)
    """Requests in flight at once."""
    max_retries: int = Field(4, ge=0)
    """Retries with exponential backoff on timeouts, 429 and 5xx (per request, by the OpenAI client)."""
    malformed_retries: int = Field(2, ge=0)
    """Extra attempts when a response is not a well-formed example."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds to wait for one response."""
    temperature: float = Field(0.7, ge=0)
    """Teacher sampling temperature."""
    max_tokens: int = Field(1024, gt=0)
    """Longest teacher response."""
    output_dir: str = "data/synth"
    """Where items.jsonl, failures.jsonl and manifest.json go."""
    price_per_1k_prompt_tokens: float = Field(0.0, ge=0)
    """For cost accounting in the manifest (your provider's price, in your currency)."""
    price_per_1k_completion_tokens: float = Field(0.0, ge=0)
    """For cost accounting in the manifest."""


class CurateSettings(_Section):
    """`gazal data curate`: validate, filter, deduplicate and decontaminate examples."""

    min_chars: int = Field(40, ge=0)
    """Drop rows whose reasoning (SFT) or question (multiple choice) is shorter than this."""
    max_chars: int = Field(20000, gt=0)
    """Drop rows whose whole text is longer than this."""
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1)
    """Estimated Jaccard similarity of word 5-gram shingles (MinHash) at which a row is a near duplicate."""
    decontamination_ngram: int = Field(6, ge=3)
    """Word n-gram size compared with benchmark test items."""
    decontamination_threshold: float = Field(0.2, gt=0, le=1)
    """Drop a row when this fraction of the n-grams of its text or of a benchmark item's (the shorter)
    is shared with that item. Stems shared by many benchmark items are ignored."""
    judge_base_url: str | None = None
    """An OpenAI-compatible endpoint that checks each kept row's answer; None: no judge."""
    judge_model: str = "gazal"
    """Model name to ask the judge endpoint for."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the judge's API key (never written anywhere)."""


Tracker = Literal["none", "tensorboard", "wandb", "mlflow", "trackio"]
# The importable packages that make each tracker work (any one of them), and what to install.
TRACKER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "trackio": (("trackio",), "pip install trackio"),
}


class LoggingSettings(_Section):
    """Experiment trackers: training metrics of every stage, the resolved recipe and evaluation results."""

    report_to: list[Tracker] = Field(default_factory=lambda: ["none"])
    """Trackers to log to: tensorboard, wandb, mlflow, trackio (several at once), or none. Each stage is
    one tracker run named <run_name>-<stage> (sft, grpo, eval), grouped by run_name (W&B group, MLflow
    tag gazal.run, TensorBoard folder); the recipe is the run's config."""
    run_name: str | None = None
    """Name of this run in the trackers (None: the run directory's name)."""
    project: str | None = None
    """W&B or Trackio project, or MLflow experiment, the runs go to (None: the recipe's name)."""
    logging_dir: str | None = None
    """Root of the trackers' local files, shared by several runs: TensorBoard events go to
    <logging_dir>/<run_name>/<stage>, W&B's files beside them (None: <run dir>/logs/<stage>)."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _none_alone(cls, value: list[str]) -> list[str]:
        if "none" in value and len(value) > 1:
            raise ValueError("'none' cannot be combined with a tracker")
        return value or ["none"]


class Recipe(_Section):
    """A whole Gazal run: model, data, SFT, GRPO and evaluation."""

    name: str = "gazal"
    """Run name; the run directory is <output_dir>/<name>-<timestamp>."""
    seed: int = 42
    """Seed for data order, adapter initialisation and sampling."""
    output_dir: str = "runs"
    """Where run directories are created."""
    model: ModelSettings = Field(default_factory=ModelSettings)
    task: TaskSettings = Field(default_factory=TaskSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    sft: SFTSettings = Field(default_factory=SFTSettings)
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    synth: SynthSettings = Field(default_factory=SynthSettings)
    curate: CurateSettings = Field(default_factory=CurateSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        """Keys that are each valid but cannot run together: refused naming the key (RecipeError
        carries it past pydantic, so the loader can add the file and line)."""
        e, g = self.eval, self.grpo
        if e.num_samples > 1 and e.temperature == 0:
            raise RecipeError(("eval", "num_samples"), "eval.num_samples > 1 needs eval.temperature > 0 (greedy "
                              "decoding gives the same completion every time)")
        if e.generation_batch_size is not None and e.generation_batch_size < e.batch_size * e.num_samples:
            raise RecipeError(("eval", "generation_batch_size"), f"eval.generation_batch_size={e.generation_batch_size} "
                              f"is below one fixed batch (eval.batch_size={e.batch_size} x eval.num_samples="
                              f"{e.num_samples} sequences), which is never split")
        if e.vllm_data_parallel_size > 1 and e.backend != "vllm":
            raise RecipeError(("eval", "vllm_data_parallel_size"), "eval.vllm_data_parallel_size needs "
                              "eval.backend=vllm; with transformers, launch `gazal eval` under accelerate launch / "
                              "torchrun and every process evaluates its share")
        try:
            e.direct_instruction.format(what="option letter")
        except (KeyError, IndexError, ValueError) as exc:
            raise RecipeError(("eval", "direct_instruction"), "eval.direct_instruction: only {what} may appear in "
                              f"braces ({exc!r})") from None
        names = [spec.name for spec in g.rewards]
        for i, spec in enumerate(g.rewards):
            if spec.only_when_accuracy_varies and (spec.name == "accuracy" or "accuracy" not in names):
                raise RecipeError(("grpo", "rewards", str(i), "only_when_accuracy_varies"),
                                  f"grpo.rewards.{i} ({spec.name}): only_when_accuracy_varies needs an 'accuracy' "
                                  "component to gate on, and cannot be set on accuracy itself")
        if g.multi_objective_aggregation == "normalize_then_sum" and g.scale_rewards != "group":
            raise RecipeError(("grpo", "scale_rewards"), f"grpo.scale_rewards={g.scale_rewards} has no effect with "
                              "grpo.multi_objective_aggregation=normalize_then_sum (TRL normalises each component "
                              "per group and the sum over the batch); leave scale_rewards at 'group'")
        if g.use_vllm and g.sampler_logprobs:
            # Replacing TRL's old log-probs with vLLM's while TRL also multiplies the loss by
            # exp(old - vLLM) would count the sampler mismatch twice and clip against the sampler.
            raise RecipeError(("grpo", "sampler_logprobs"), "grpo.sampler_logprobs: true applies to Gazal's "
                              "merged transformers rollouts; with grpo.use_vllm TRL corrects for vLLM's sampling "
                              "log-probs itself (grpo.vllm_importance_sampling_correction), and a second "
                              "correction would count the mismatch twice. Leave it unset or false")
        if g.use_vllm and g.vllm_mode == "server" and (g.vllm_tensor_parallel_size or 1) > 1:
            raise RecipeError(("grpo", "vllm_tensor_parallel_size"), "grpo.vllm_tensor_parallel_size applies to "
                              "vllm_mode colocate; a vLLM server takes its own --tensor-parallel-size (declare "
                              "it as grpo.vllm_server_tensor_parallel_size so `gazal plan` counts its GPUs)")
        if g.use_vllm and g.vllm_mode == "colocate":
            # A server's GPUs declared for a layout that has no server: plan would count GPUs that
            # the run never uses, and the colocated engine's size is another key.
            for key in ("vllm_server_tensor_parallel_size", "vllm_server_data_parallel_size"):
                if getattr(g, key) is not None:
                    raise RecipeError(("grpo", key), f"grpo.{key} describes the `trl vllm-serve` server of "
                                      "grpo.vllm_mode server; with vllm_mode colocate vLLM runs on the training "
                                      "GPUs (grpo.vllm_tensor_parallel_size): remove it or set it to null")
        if g.lora.dropout > 0 and not g.disable_dropout:
            raise RecipeError(("grpo", "lora", "dropout"), f"grpo.lora.dropout={g.lora.dropout} with "
                              "grpo.disable_dropout false: rollouts sample without dropout, so the policy that "
                              "learns would not be the one that sampled; set grpo.lora.dropout=0 or "
                              "grpo.disable_dropout=true")
        d = g.difficulty_filter
        if d.min_correct + d.min_wrong > d.samples:
            raise RecipeError(("grpo", "difficulty_filter", "min_correct"), "grpo.difficulty_filter: min_correct="
                              f"{d.min_correct} + min_wrong={d.min_wrong} exceeds samples={d.samples}, so no "
                              "question could be kept")
        return self


def explain(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """One line per recipe key with its type, default and docstring (for `gazal validate --explain`)."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append(f"{key}: {(ann.__doc__ or '').strip()}")
            rows.extend(explain(ann, key + "."))
        else:
            default = field.get_default(call_default_factory=True)
            doc = " ".join((field.description or "").split())
            rows.append(f"{key} = {default!r}: {doc}")
    return rows
