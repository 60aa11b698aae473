"""`gazal plan`: will a recipe fit, stage by stage, before anything is launched?

For each stage (SFT, GRPO's rollout, weight sync and training phases and its vLLM server,
evaluation) the memory of one GPU (or, on CPU, the peak resident memory of the process), its parts,
a verdict against the budget, and a throughput range; every GPU the recipe uses (the training
processes' and the vLLM server's); and SFT's optimizer steps (gazal.sft_steps). Nothing is loaded
but the model's config.json (and its tokenizer, when it is on this machine, to count tokens) and
the data that is on this machine. Each stage's estimate is its own function (_sft_phases,
_grpo_phases, _server_phases, _eval_phases); the table, the verdicts and the exit decision are
gazal.plan_report's. A recipe that cannot fit raises GazalError (exit status 2) naming the recipe
key to change.

The model of memory. P parameters of b bytes (model.dtype), N processes that shard (ZeRO-3 or FSDP
full sharding; 1 under DDP), L layers, hidden h, intermediate i, q width q = heads x head_dim, KV
width k = kv_heads x head_dim, T tokens in a micro-batch, a = bytes of an activation (2 under bf16
autocast, else b):

- weights: P b / N. Sharded, the layers being computed are gathered whole: 2 decoder layers and the
  LM head (b bytes each).
- adapter: LoRA/DoRA on each target linear (in -> out) has r (in + out) parameters, DoRA adds a
  magnitude vector of out; all-linear is q, k, v, o, gate, up, down. Adapter, gradients and AdamW
  take 16 bytes a parameter (ZeRO-3: bf16 adapter and gradient, fp32 master copy and two fp32
  moments; DDP/FSDP/CPU: PEFT keeps adapters in fp32, fp32 gradient and two moments), / N.
- activations saved for the backward, per token and layer (elements; against the tensors autograd
  keeps, counted with saved-tensor hooks: within 1% on SmolLM2, 5% on the tiny Qwen3 in
  tests/test_plan.py): 2h (the two RMSNorm inputs)
  + 2q + 2k (attention's q, k, v and output) + 3i (gate, up, act(gate)) + q + k for Qwen3's q/k norms,
  plus what the adapters keep: without dropout the inputs they read (h for q/k/v, h for gate/up, i for
  down) and r per adapted linear; with dropout each adapted linear's own dropped input and its mask
  (in x (a + mask bytes)); DoRA keeps 2 x out more per linear. Times L x T x a. With gradient
  checkpointing only each layer's input is kept (L x T x h x a) and one layer is recomputed at a time
  (the "layer working set", T x per-token-layer x a, which is also added without checkpointing for
  the backward of one layer).
- LM head: TRL's fused head never builds the T x vocab logits; it projects tiles of
  min(T, 4096) x 32768. On CUDA (Triton) that is one tile in the compute dtype plus an fp32 gradient
  of the hidden states (T x h x 4); on CPU (torch fallback) about 6 fp32 tiles (measured).
- DoRA forward temporaries: PEFT builds an in x in identity, B A and W + s B A for each linear:
  (in^2 + 3 in x out) x a for the largest one.
- GRPO, in phases. Rollouts with transformers: every process generates per_device_train_batch_size
  x steps_per_generation completions at once, with the whole model gathered (ZeRO-3 / FSDP2: P b
  more), a merged copy of the linear weights when merged_rollouts (PEFT's safe merge writes new
  tensors and Gazal keeps the originals to put back), and a KV cache of
  sequences x (prompt + completion) x L x kv_heads x head_dim x 2 x b. With vLLM colocated, vLLM
  holds vllm_gpu_memory_utilization of each GPU (weights / TP and KV cache inside it) while it
  generates, and through training unless vllm_enable_sleep_mode. With a vLLM server (`trl
  vllm-serve`), its GPUs are its own: vllm_server_tensor_parallel_size x _data_parallel_size of
  them, each holding vllm_server_gpu_memory_utilization x memory (weights / TP, overhead, the rest
  KV cache at L x ceil(kv_heads / TP) x head_dim x 2 x b a token), against the rollout batch
  (per_device_train_batch_size x processes x steps_per_generation sequences, / DP an engine). The
  weight sync is Gazal's layer-wise DoRA sync (gazal.vllm_sync): one decoder layer gathered (layer
  parameters x b, when sharded) and one adapted linear folded at a time (in x out x (4 + b): a float32
  buffer and its cast), over the weight shard and adapter states; TRL's own PEFT sync would gather
  all P b at once under ZeRO-3. Training:
  as SFT, on per_device_train_batch_size x (prompt + max_completion_length) tokens.
- evaluation with vLLM: per GPU, weights / TP inside gpu_memory_utilization x memory, 4 GiB of vLLM
  overhead (profiled activations, CUDA graphs; assumed), the rest is KV cache at
  L x ceil(kv_heads / TP) x head_dim x 2 x b bytes a token; with transformers, the whole model per
  process and the KV cache of batch_size x num_samples sequences.
- 2 GiB a GPU for the CUDA context, NCCL buffers and allocator slack (assumed).

On CPU (`--cpu`, or `--gpus 0`) the same parts are in host memory, float32 for evaluation (as the
transformers backend loads on CPU), plus the process baseline (torch + transformers + TRL + PEFT +
datasets imported, tokenizer and data loaded), the end-of-stage merge (the base model loaded again
to merge the adapter into) landing on top of the activation memory glibc keeps in its heap, and an
allocator slack of CPU_SLACK x (weights + activations + KV cache), all measured on this project's
CPU runs (bench/plan_accuracy.py). On CPU, attention over rows with a mask (packed, padded, GRPO)
takes SDPA's math path, which keeps K and V repeated to every head and a row of scores per token.

Throughput is an estimate from FLOPs alone: training 6 P a token (8 P with gradient checkpointing),
decoding 2 P a token, at MFU_RANGE of the per-GPU peak (--gpu-flops, default H100 bf16 dense);
attention FLOPs, communication and the memory-bound nature of small-batch decoding are ignored.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gazal import sft_steps
from gazal.config import LoraSettings, Recipe
from gazal.errors import GazalError
from gazal.sft_steps import CHARS_PER_TOKEN, SftSteps

log = logging.getLogger(__name__)

GIB = 2**30
MIB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
H100_BF16_DENSE_TFLOPS = 989.0
MFU_RANGE = (0.25, 0.45)
CUDA_OVERHEAD_GIB = 2.0
VLLM_OVERHEAD_GIB = 4.0
# TRL 1.16's fused LM head (trl.kernels.chunked_logprob): token rows and vocabulary columns of a tile.
HEAD_TOKENS, HEAD_VOCAB = 4096, 32768
CPU_HEAD_TILES = 6
# Prompt lengths when they cannot be counted here: characters per token without the tokenizer
# (CHARS_PER_TOKEN, shared with gazal.sft_steps), and tokens when the data is not on this machine
# (GRPO from the hub; benchmarks from the hub).
DEFAULT_GRPO_PROMPT = 512
DEFAULT_EVAL_PROMPT = 1536
# CPU calibration (bench/plan_accuracy.py --baseline re-measures the baselines): peak RSS of a stage
# run as its own `gazal` command with the tiny model, whose own memory is under 1 MiB: the process
# with torch, transformers, TRL, PEFT and datasets imported, tokenizer, data and trainer built.
# Evaluation imports neither TRL nor PEFT.
CPU_BASELINE_MIB = {"sft": 530.0, "grpo": 570.0, "eval": 380.0}
# glibc fragmentation and pages the allocator keeps, as a share of the model-dependent bytes
# (weights, activations, KV cache), fitted on SmolLM2's SFT, GRPO and evaluation peaks.
CPU_SLACK = 0.33

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------
# Architectures


@dataclass(frozen=True)
class Arch:
    """The numbers of a dense decoder (Llama / Qwen family) that memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k
    attention_bias: bool = False  # Qwen2: biases on q, k, v
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear modules: name -> (in, out) features."""
        h, i, q, k = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        n = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden  # linears, two RMSNorms
        if self.attention_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    def linear_params(self) -> int:
        """Parameters of every decoder linear (what a merge rewrites)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params() + self.hidden  # + the final norm

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> int:
        """K and V of one token over all layers, on one GPU of a tensor-parallel group of `tp`."""
        return self.layers * math.ceil(self.kv_heads / tp) * self.head_dim * 2 * dtype_bytes

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, {self.heads} heads / "
                f"{self.kv_heads} KV heads x {self.head_dim}, vocab {self.vocab}, "
                f"{'tied' if self.tied else 'untied'} embeddings")


def _qwen3(layers, hidden, intermediate, heads, tied) -> dict[str, Any]:
    return dict(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=8, head_dim=128,
                vocab=151936, tied=tied, qk_norm=True)


_SMOLLM2_135M = dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152,
                     tied=True)
# Models whose numbers are known here (their published config.json), for hub ids not on this machine.
KNOWN: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-32B": _qwen3(64, 5120, 25600, 64, False),
    "Qwen/Qwen3-14B": _qwen3(40, 5120, 17408, 40, False),
    "Qwen/Qwen3-8B": _qwen3(36, 4096, 12288, 32, False),
    "Qwen/Qwen3-4B": _qwen3(36, 2560, 9728, 32, True),
    "Qwen/Qwen3-1.7B": _qwen3(28, 2048, 6144, 16, True),
    "Qwen/Qwen3-0.6B": _qwen3(28, 1024, 3072, 16, True),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "gazal:smollm2-135m-instruct": _SMOLLM2_135M,
}


def arch_from_config(cfg: dict[str, Any], name: str, source: str) -> Arch:
    """An Arch from a transformers config.json (a dict)."""
    cfg = cfg.get("text_config") or cfg
    experts = [cfg.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")]
    if any(e for e in experts if isinstance(e, int) and e > 1):
        raise GazalError(f"model.name_or_path: {name} is a mixture-of-experts model; `gazal plan` models dense "
                         "decoders only")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        model_type = cfg.get("model_type", "")
        return Arch(layers=int(cfg["num_hidden_layers"]), hidden=hidden, intermediate=int(cfg["intermediate_size"]),
                    heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                    head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
                    tied=bool(cfg.get("tie_word_embeddings", False)), qk_norm=model_type.startswith("qwen3"),
                    attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")), source=source)
    except KeyError as exc:
        raise GazalError(f"model.name_or_path: {name}: config.json has no {exc.args[0]}") from None


def _hub_cached(name: str, filename: str, revision: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, filename, revision=revision)
    except Exception:  # a malformed id, say: treat as not cached
        return None
    return found if isinstance(found, str) else None


def model_location(recipe: Recipe) -> tuple[str | None, str]:
    """A local folder holding the recipe model's config.json (None when there is none), and a
    description of where the architecture numbers come from."""
    from gazal.models import SMOLLM2, TINY_QWEN3, cache_dir, resolve_model

    name, revision = recipe.model.name_or_path, recipe.model.revision
    if name == TINY_QWEN3:
        path = resolve_model(name)  # built in seconds if missing
        return path, f"config.json of {path}"
    if name == SMOLLM2:
        # Converting the embedded GGUF takes a while: read the converted model only if it is there.
        path = cache_dir() / "models" / name.split(":", 1)[1]
        if (path / "config.json").is_file():
            return str(path), f"config.json of {path}"
        return None, "Gazal's table of known architectures (the converted model is not in the cache yet)"
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return str(path), f"config.json of {path}"
    cached = _hub_cached(name, "config.json", revision)
    if cached:
        return str(Path(cached).parent), f"config.json in the Hugging Face cache ({cached})"
    return None, "Gazal's table of known architectures (not read from the model: it is not on this machine)"


def resolve_arch(recipe: Recipe) -> Arch:
    """The recipe model's architecture: its config.json when on this machine, else Gazal's table."""
    name = recipe.model.name_or_path
    path, source = model_location(recipe)
    if path is not None:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        return arch_from_config(cfg, name, source)
    if name in KNOWN:
        return Arch(**KNOWN[name], source=source)
    raise GazalError(f"model.name_or_path: {name}: its config.json is not on this machine (no local folder, not in "
                     f"the Hugging Face cache) and Gazal's table does not know it (known: "
                     f"{', '.join(k for k in KNOWN if not k.startswith('gazal:'))}); pass a local folder, or download "
                     "the config first (huggingface-cli download NAME config.json)")


# ---------------------------------------------------------------------------------------------
# Adapters and activations


def target_linears(lora: LoraSettings) -> tuple[str, ...]:
    """The decoder linears a LoRA config adapts (PEFT matches names by suffix)."""
    if lora.target_modules == "all-linear":
        return ALL_LINEAR
    names = [t.rsplit(".", 1)[-1] for t in lora.target_modules]
    return tuple(n for n in ALL_LINEAR if n in names)


def adapter_params(arch: Arch, lora: LoraSettings) -> int:
    """Trainable parameters of the adapter: r (in + out) per target linear, + out for DoRA's magnitude."""
    lin = arch.linears()
    per_layer = sum(lora.r * (lin[n][0] + lin[n][1]) + (lin[n][1] if lora.use_dora else 0)
                    for n in target_linears(lora))
    return arch.layers * per_layer


def activation_elems(arch: Arch, lora: LoraSettings, dropout: bool, mask_bytes: float, act_bytes: int,
                     masked_row: int | None = None) -> float:
    """Elements saved for the backward per token and layer (non-checkpointed), frozen base + adapter.

    `masked_row`: on CPU, attention with an explicit mask (packed or padded rows of this many tokens)
    goes through SDPA's math path, which keeps K and V repeated to every head and a row of scores
    per token (measured: + row + 2 (q - k))."""
    h, i, q, k = arch.hidden, arch.intermediate, arch.q_dim, arch.kv_dim
    targets = target_linears(lora)
    lin = arch.linears()
    n = 2 * h + 2 * q + 2 * k + 3 * i + (q + k if arch.qk_norm else 0)
    if dropout:
        n += sum(lin[t][0] for t in targets) * (1 + mask_bytes / act_bytes)
    else:
        # The inputs the adapters read, once per tensor: attention's (q, k, v share it), the MLP's
        # (gate, up), down's. o's input is attention's output, counted above.
        groups = [(h, ("q_proj", "k_proj", "v_proj")), (h, ("gate_proj", "up_proj")), (i, ("down_proj",))]
        n += sum(size for size, members in groups if any(t in targets for t in members))
    n += lora.r * len(targets)
    if masked_row:
        n += masked_row + 2 * (q - k)
    if lora.use_dora:
        n += 2 * sum(lin[t][1] for t in targets)
    return n


def dora_temporaries(arch: Arch, lora: LoraSettings, act_bytes: int) -> float:
    """Bytes PEFT's DoRA forward allocates for its largest linear: eye(in), B A, W + s B A."""
    if not lora.use_dora:
        return 0.0
    lin = arch.linears()
    return max((lin[t][0] ** 2 + 3 * lin[t][0] * lin[t][1]) * act_bytes for t in target_linears(lora))


def head_bytes(arch: Arch, tokens: int, cpu: bool, compute_bytes: int) -> float:
    """The fused LM head's tiles (and, on GPU, the fp32 gradient of its input)."""
    tile = min(tokens, HEAD_TOKENS) * min(arch.vocab, HEAD_VOCAB)
    if cpu:
        return CPU_HEAD_TILES * tile * 4
    return tile * compute_bytes + tokens * arch.hidden * 4


def nograd_layer_bytes(arch: Arch, tokens: int, dtype_bytes: int) -> float:
    """One layer of a forward without gradients (prefill, scoring): hidden, q, k, v, MLP intermediates."""
    h, i = arch.hidden, arch.intermediate
    return tokens * (2 * h + arch.q_dim + 2 * arch.kv_dim + 3 * i) * dtype_bytes


# ---------------------------------------------------------------------------------------------
# Prompt lengths


def _load_tokenizer(recipe: Recipe, path: str | None):
    """The model's tokenizer if it is on this machine, else None."""
    name = recipe.model.name_or_path
    if path is None:
        cached = _hub_cached(name, "tokenizer_config.json", recipe.model.revision)
        if not cached:
            return None
        path = name
    try:
        from gazal.models import load_tokenizer

        return load_tokenizer(path, recipe.model.revision, recipe.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure means: count characters instead
        log.info("plan: tokenizer of %s not loadable here (%s); counting characters", name, exc)
        return None


def _longest_prompt(conversations: list[list[dict[str, str]]], tokenizer, extra_kwargs: dict | None = None) -> int:
    """Tokens of the longest prompt (the 8 longest by characters are tokenized)."""
    longest = sorted(conversations, key=lambda c: -sum(len(m["content"]) for m in c))[:8]
    if tokenizer is None:
        return max(math.ceil(sum(len(m["content"]) for m in c) / CHARS_PER_TOKEN) + 8 * len(c) for c in longest)
    out = 0
    for conv in longest:
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False, **(extra_kwargs or {}))
        out = max(out, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def grpo_prompt_tokens(recipe: Recipe, tokenizer) -> tuple[int, str]:
    """The longest GRPO prompt in tokens, and how it was found."""
    from gazal import pubmedqa
    from gazal.tasks import messages

    spec = recipe.data.grpo
    try:
        local = spec.startswith("seed:") or Path(spec).expanduser().is_file() or pubmedqa.is_pool(spec)
        items = pubmedqa.grpo_questions(recipe) if local else []
    except GazalError:
        local = False
    if not local:
        return DEFAULT_GRPO_PROMPT, f"assumed: {spec} is not on this machine"
    n = _longest_prompt([messages(it, recipe.task) for it in items], tokenizer)
    how = "tokenized" if tokenizer is not None else f"characters / {CHARS_PER_TOKEN}"
    return n, f"longest of {len(items)} prompts of {spec} ({how})"


def eval_prompt_tokens(recipe: Recipe, tokenizer) -> tuple[int, str, tuple[int, int] | None]:
    """The longest evaluation prompt in tokens (reasoning mode), how it was found, and the most items
    a benchmark has (a batch holds no more) with the items of all benchmarks (a packed call holds no
    more); None: not known here."""
    from gazal.benchmarks import BenchmarkUnavailable, benchmarks_dir, load_benchmark, select
    from gazal.tasks import messages

    cfg = recipe.eval
    directory = benchmarks_dir(cfg.benchmarks_dir)
    if directory is None or not directory.is_dir():
        return DEFAULT_EVAL_PROMPT, "assumed: the benchmarks are not on this machine", None
    seed = recipe.seed if cfg.limit_seed is None else cfg.limit_seed
    conversations, found, most = [], [], 0
    for name in cfg.benchmarks:
        try:
            items = select(load_benchmark(name, directory, cfg.mmlu_pro_categories), cfg.limit, cfg.limit_strategy,
                           seed)
        except (BenchmarkUnavailable, GazalError):
            continue
        found.append(name)
        most = max(most, len(items))
        conversations += [messages(it, recipe.task) for it in items]
    if not conversations:
        return DEFAULT_EVAL_PROMPT, f"assumed: none of {', '.join(cfg.benchmarks)} is in {directory}", None
    n = _longest_prompt(conversations, tokenizer, cfg.chat_template_kwargs)
    how = "tokenized" if tokenizer is not None else f"characters / {CHARS_PER_TOKEN}"
    return n, f"longest of {len(conversations)} {'+'.join(found)} prompts ({how})", (most, len(conversations))


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Phase:
    """One column of the table: a stage (or one phase of it) and its parts, in bytes."""

    stage: str
    name: str
    rows: dict[str, float]
    budget: float
    enabled: bool = True
    reserved: float | None = None  # vLLM: the memory it reserves whatever its parts (util x GPU memory)
    hint: dict[str, str] = field(default_factory=dict)  # row -> recipe key to change when it dominates

    @property
    def total(self) -> float:
        parts = sum(self.rows.values())
        return max(parts, self.reserved) if self.reserved is not None else parts

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


@dataclass
class Plan:
    recipe: Recipe
    arch: Arch
    cpu: bool
    gpus: int
    nodes: int
    sharding: str
    sharding_why: str
    budget_gib: float
    phases: list[Phase]
    lines: list[str]  # what the numbers rest on
    throughput: list[str]
    notes: list[str]
    problems: list[str] = field(default_factory=list)  # refusals that are not a memory total
    # What `gazal plan --strict` refuses as well: GPUs the plan cannot count, intervals past the run's end.
    warnings: list[str] = field(default_factory=list)
    server_gpus: int = 0  # the vLLM server's (grpo.vllm_server_*), on nodes of their own
    sft_steps: SftSteps | None = None

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def total_gpus(self) -> int:
        """Every GPU the recipe uses: the training processes' and the vLLM server's."""
        return self.world + self.server_gpus


def _training_rows(recipe: Recipe, arch: Arch, stage: str, tokens: int, cpu: bool, shards: int, sharding: str,
                   dtype_bytes: int, row_tokens: int) -> tuple[dict[str, float], dict[str, str]]:
    """The parts of a training micro-batch (SFT or GRPO), per GPU or per CPU process; rows of
    `row_tokens` tokens."""
    cfg = getattr(recipe, stage)
    lora = cfg.lora
    act_bytes = 2 if (cfg.bf16 and not cpu) else dtype_bytes
    dropout = lora.dropout > 0 and not (stage == "grpo" and recipe.grpo.disable_dropout)
    mask_bytes = act_bytes if cpu else 1  # CUDA keeps dropout masks as bool, the CPU kernel as floats
    # Rows carry an attention mask when packed, padded to each other, or (GRPO) padded prompts and completions.
    masked = stage == "grpo" or cfg.packing or cfg.padding_free or cfg.per_device_train_batch_size > 1
    per_token_layer = activation_elems(arch, lora, dropout, mask_bytes, act_bytes,
                                       row_tokens if (cpu and masked) else None) * act_bytes
    rows: dict[str, float] = {"weights": arch.params() * dtype_bytes / shards}
    if sharding in ("zero3", "fsdp") and shards > 1:
        rows["gathered layers"] = (2 * arch.layer_params() + arch.vocab * arch.hidden) * dtype_bytes
    rows["adapter + grads + AdamW"] = adapter_params(arch, lora) * 16 / shards
    if cfg.gradient_checkpointing:
        rows["activations"] = arch.layers * tokens * arch.hidden * act_bytes
    else:
        rows["activations"] = arch.layers * tokens * per_token_layer
    rows["layer working set"] = tokens * per_token_layer
    rows["LM head tiles"] = head_bytes(arch, tokens, cpu, act_bytes)
    rows["DoRA temporaries"] = dora_temporaries(arch, lora, act_bytes)
    hint = {"weights": "model.name_or_path (a smaller model), or more GPUs (--gpus) to shard over",
            "gathered layers": "model.name_or_path (a smaller model)",
            "adapter + grads + AdamW": f"{stage}.lora.r",
            "activations": (f"{stage}.per_device_train_batch_size" if cfg.per_device_train_batch_size > 1 or
                            cfg.gradient_checkpointing else f"{stage}.gradient_checkpointing"),
            "layer working set": f"{stage}.per_device_train_batch_size",
            "LM head tiles": f"{stage}.per_device_train_batch_size",
            "DoRA temporaries": f"{stage}.lora.use_dora"}
    if not cfg.gradient_checkpointing and cfg.per_device_train_batch_size > 1:
        hint["activations"] = f"{stage}.gradient_checkpointing (or {stage}.per_device_train_batch_size)"
    if cfg.per_device_train_batch_size == 1:
        length_key = "sft.max_length" if stage == "sft" else "grpo.max_completion_length"
        for part in ("layer working set", "LM head tiles"):
            hint[part] = length_key
        if cfg.gradient_checkpointing:
            hint["activations"] = length_key
    return rows, hint


def _cpu_extra(rows: dict[str, float], stage: str, extra_model_bytes: float = 0.0) -> dict[str, float]:
    model_bytes = rows.get("weights", 0) + rows.get("activations", 0) + rows.get("KV cache", 0) + extra_model_bytes
    return {"process baseline": CPU_BASELINE_MIB[stage] * MIB, **rows, "allocator slack": CPU_SLACK * model_bytes}


@dataclass
class _Machine:
    """What every stage's estimate reads (the recipe, its model, the machine), and where each stage
    writes what its numbers rest on."""

    recipe: Recipe
    arch: Arch
    tokenizer: Any
    cpu: bool
    gpus: int  # per node
    world: int  # training processes
    sharding: str
    shards: int
    b: int  # bytes of a weight (model.dtype)
    budget: float  # bytes of one GPU (or of host memory)
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def overhead(self) -> dict[str, float]:
        return {} if self.cpu else {"CUDA context + NCCL": CUDA_OVERHEAD_GIB * GIB}


def plan(recipe: Recipe, gpus: int = 1, gpu_memory_gib: float | None = None, nodes: int = 1,
         sharding: str | None = None, gpu_tflops: float | None = None, cpu: bool = False,
         memory_gib: float | None = None) -> Plan:
    """Estimate every stage of the recipe; see the module docstring for the model."""
    cpu = cpu or gpus == 0
    if not cpu and gpu_memory_gib is None:
        raise GazalError("--gpu-memory: give the memory of one GPU in GiB (e.g. 80), or plan a CPU run with --cpu")
    if nodes < 1 or (not cpu and gpus < 1):
        raise GazalError("--gpus and --nodes must be at least 1 (--gpus 0 plans a CPU run)")
    arch = resolve_arch(recipe)
    path, _ = model_location(recipe)
    tokenizer = _load_tokenizer(recipe, path)
    b = DTYPE_BYTES[recipe.model.dtype]
    P = arch.params()
    world = 1 if cpu else gpus * nodes
    if cpu:
        sharding, why = "none", "one CPU process"
        budget = (memory_gib * GIB) if memory_gib else _host_memory()
    else:
        if sharding is None:
            sharding = "zero3" if world > 1 else "ddp"
            why = ("default for several GPUs: DeepSpeed ZeRO-3 as in src/gazal/accelerate/deepspeed_zero3.yaml"
                   if world > 1 else "one GPU: nothing to shard")
        else:
            why = "--sharding"
        budget = gpu_memory_gib * GIB
    shards = world if sharding in ("zero3", "fsdp") else 1
    m = _Machine(recipe, arch, tokenizer, cpu, 0 if cpu else gpus, world, sharding, shards, b, budget)
    m.lines.append(f"model {recipe.model.name_or_path}: {P / 1e9:.3g} B parameters ({P:,}), {recipe.model.dtype}; "
                   f"{arch.describe()}; from {arch.source}")
    if not cpu:
        m.lines.append(f"weights {P * b / GIB:.1f} GiB in {recipe.model.dtype}"
                       + (f", / {shards} a GPU under {sharding}" if shards > 1 else ", whole on every GPU"))
    sft, steps = _sft_phases(m)
    grpo, grpo_tokens, seq = _grpo_phases(m)
    server, server_gpus = _server_phases(m, seq)
    evaluation = _eval_phases(m)
    if server_gpus:
        m.lines.insert(2 if not cpu else 1, f"GPUs: {world} training ({nodes} node(s) x {gpus}) + {server_gpus} for "
                       f"the vLLM server (grpo.vllm_server_*: its own node(s)) = {world + server_gpus}")
    throughput = [] if cpu else _throughput(recipe, arch, world, server_gpus, gpu_tflops)
    if not cpu:
        m.notes.append(f"host memory of the main process at the end of each training stage: the base model is loaded "
                       f"on the CPU to merge the adapter into ({P * b / GIB:.1f} GiB)")
        full_logits = grpo_tokens * arch.vocab * 4
        m.notes.append(f"TRL's fused LM head never builds whole logits: {grpo_tokens} tokens x {arch.vocab} x 4 bytes "
                       f"would be {full_logits / GIB:.1f} GiB a GRPO micro-batch")
    return Plan(recipe, arch, cpu, 0 if cpu else gpus, nodes, sharding, why, budget / GIB,
                [*sft, *grpo, *server, *evaluation], m.lines, throughput, m.notes, m.problems, m.warnings,
                server_gpus, steps)


def _sft_phases(m: _Machine) -> tuple[list[Phase], SftSteps | None]:
    """SFT's micro-batch (on CPU: training and the end-of-stage merge) and its step estimate."""
    recipe, arch, s = m.recipe, m.arch, m.recipe.sft
    sft_tokens = s.per_device_train_batch_size * s.max_length
    rows, hint = _training_rows(recipe, arch, "sft", sft_tokens, m.cpu, m.shards, m.sharding, m.b, s.max_length)
    m.lines.append(f"sft: {s.per_device_train_batch_size} x {s.max_length} = {sft_tokens} tokens a micro-batch "
                   f"(sft.per_device_train_batch_size x sft.max_length: rows assumed full, exact with "
                   f"sft.packing, an upper bound without{'' if s.packing else ', as here'}), "
                   f"adapter {_count(adapter_params(arch, s.lora))} parameters (r={s.lora.r}"
                   f"{', DoRA' if s.lora.use_dora else ''}), gradient checkpointing "
                   f"{'on' if s.gradient_checkpointing else 'off'}")
    steps, why = sft_steps.estimate(recipe, m.world, m.tokenizer) if s.enabled else (None, "sft is disabled")
    if steps is not None:
        m.lines.append(f"sft steps: {steps.describe(recipe)}")
        m.warnings += [message for _, message in sft_steps.interval_warnings(recipe, steps)]
    else:
        m.lines.append(f"sft steps: not estimated ({why})")
    if m.cpu:
        return [Phase("sft", "sft train", _cpu_extra(rows, "sft"), m.budget, s.enabled, hint=hint),
                Phase("sft", "sft save", _cpu_save(rows, arch, m.b, "sft"), m.budget, s.enabled, hint=hint)], steps
    return [Phase("sft", "sft", {**rows, **m.overhead}, m.budget, s.enabled, hint=hint)], steps


def _grpo_phases(m: _Machine) -> tuple[list[Phase], int, int]:
    """GRPO on the training GPUs: rollouts (transformers, or a colocated vLLM), the weight sync to
    vLLM, and training; with the tokens of a training micro-batch and of one sequence."""
    recipe, arch, g, b, cpu = m.recipe, m.arch, m.recipe.grpo, m.b, m.cpu
    prompt, prompt_how = grpo_prompt_tokens(recipe, m.tokenizer)
    seq = prompt + g.max_completion_length
    spg = g.steps_per_generation or g.gradient_accumulation_steps
    gen_seqs = g.per_device_train_batch_size * spg
    grpo_tokens = g.per_device_train_batch_size * seq
    m.lines.append(f"grpo: prompt {prompt} tokens ({prompt_how}) + grpo.max_completion_length "
                   f"{g.max_completion_length} = {seq} a sequence; training micro-batch "
                   f"{g.per_device_train_batch_size} sequences = {grpo_tokens} tokens; rollouts: {gen_seqs} sequences "
                   f"a process at once (grpo.per_device_train_batch_size x steps_per_generation {spg})")
    rows, hint = _training_rows(recipe, arch, "grpo", grpo_tokens, cpu, m.shards, m.sharding, b, seq)
    persistent = {k: rows[k] for k in ("weights", "adapter + grads + AdamW")}
    sharded = m.sharding in ("zero3", "fsdp") and m.shards > 1
    if cpu or not g.use_vllm:
        rollout, rhint = _transformers_rollout(m, persistent, hint, prompt, seq, gen_seqs, grpo_tokens)
        if cpu:
            return [Phase("grpo", "grpo rollout", _cpu_extra(rollout, "grpo", rollout.get("merged rollout copy", 0)),
                          m.budget, g.enabled, hint=rhint),
                    Phase("grpo", "grpo train", _cpu_extra(rows, "grpo"), m.budget, g.enabled, hint=hint),
                    Phase("grpo", "grpo save", _cpu_save(rows, arch, b, "grpo"), m.budget, g.enabled, hint=hint)], \
                grpo_tokens, seq
        return [Phase("grpo", "grpo rollout", {**rollout, **m.overhead}, m.budget, g.enabled, hint=rhint),
                Phase("grpo", "grpo train", {**rows, **m.overhead}, m.budget, g.enabled, hint=hint)], grpo_tokens, seq

    # vLLM: generation happens in vLLM (colocated on these GPUs, or a server of its own); the
    # training processes send it the policy's weights every step.
    rollout: dict[str, float] = dict(persistent)
    rhint = dict(hint)
    sync: dict[str, float] = dict(persistent)
    shint = dict(hint)
    train_rows = dict(rows)
    if g.vllm_mode == "colocate":
        _colocated_vllm(m, seq, gen_seqs, rollout, rhint, sync, shint, train_rows, hint)
    _layerwise_sync(m, sync, shint, sharded)
    return [Phase("grpo", "grpo rollout", {**rollout, **m.overhead}, m.budget, g.enabled, hint=rhint),
            Phase("grpo", "grpo sync", {**sync, **m.overhead}, m.budget, g.enabled, hint=shint),
            Phase("grpo", "grpo train", {**train_rows, **m.overhead}, m.budget, g.enabled, hint=hint)], \
        grpo_tokens, seq


def _layerwise_sync(m: _Machine, sync: dict[str, float], shint: dict[str, str], sharded: bool) -> None:
    """What the weight sync to vLLM adds to a training GPU's rows.

    This relies on Gazal's layer-wise DoRA sync (gazal.vllm_sync) being the one used, in server and
    colocate modes: it gathers one decoder layer's shards at a time and folds each adapted linear,
    one after the other, into a new tensor as PEFT's merge computes it (a float32 buffer, then cast
    to the weight's dtype), sends it and releases it before the next. Its extra peak is one layer
    gathered plus the largest linear's fold, where TRL's own PEFT sync gathers the whole model at
    once under ZeRO-3 (P x b more: 61 GiB for Qwen3-32B in bfloat16). The frozen embeddings and LM
    head, sent once a run, are gathered one module at a time: on small models with a large
    vocabulary that module is the peak instead.
    """
    arch, b = m.arch, m.b
    layer = arch.layer_params() * b if sharded else 0.0  # unsharded, the layer is whole already
    fold = max(i * o for i, o in arch.linears().values()) * (4 + b)
    embedding = arch.vocab * arch.hidden * b if sharded else 0.0
    hint = "model.name_or_path (a smaller model)"
    if embedding > layer + fold:
        sync["gathered embeddings (layer-wise sync)"] = embedding
        shint["gathered embeddings (layer-wise sync)"] = hint
    else:
        if layer:
            sync["gathered layer (layer-wise sync)"] = layer
            shint["gathered layer (layer-wise sync)"] = hint
        sync["folded linear (layer-wise sync)"] = fold
        shint["folded linear (layer-wise sync)"] = hint
    m.lines.append("grpo weight sync to vLLM, one decoder layer at a time (gazal.vllm_sync): "
                   + (f"a gathered layer {layer / GIB:.2f} GiB + " if layer else "")
                   + f"the largest linear folded {fold / GIB:.2f} GiB (float32 + its cast)"
                   + (f"; the embeddings, gathered once a run, {embedding / GIB:.2f} GiB"
                      if embedding > layer + fold else "")
                   + f", over what training keeps; TRL's own PEFT sync would gather the whole model "
                   f"({arch.params() * b / GIB:.1f} GiB) under ZeRO-3")


def _colocated_vllm(m: _Machine, seq: int, gen_seqs: int, rollout: dict[str, float], rhint: dict[str, str],
                    sync: dict[str, float], shint: dict[str, str], train: dict[str, float],
                    hint: dict[str, str]) -> None:
    """A vLLM engine colocated on the training GPUs: its share of each GPU added to the rollout, sync
    and (unless it sleeps) training phases' rows."""
    arch, g, b = m.arch, m.recipe.grpo, m.b
    P = arch.params()
    tp = g.vllm_tensor_parallel_size or 1
    sleep = bool(g.vllm_enable_sleep_mode)
    vllm_weights = P * b / tp
    colocated = g.vllm_gpu_memory_utilization * m.budget
    room = colocated - vllm_weights - VLLM_OVERHEAD_GIB * GIB
    kv_tok = arch.kv_bytes_per_token(b, tp)
    fit = room / kv_tok / seq if room > 0 else 0
    m.lines.append(f"grpo vLLM colocated: {g.vllm_gpu_memory_utilization} x {m.budget / GIB:g} GiB = "
                   f"{colocated / GIB:.1f} GiB a GPU: weights / TP {tp} = {vllm_weights / GIB:.1f} GiB, "
                   f"{VLLM_OVERHEAD_GIB:g} GiB overhead, KV cache {max(room, 0) / GIB:.1f} GiB = "
                   f"{max(room, 0) / kv_tok:,.0f} tokens = {fit:.1f} sequences of {seq} tokens"
                   f"{'; asleep (weights and cache released) while training' if sleep else ''}")
    engine_seqs = gen_seqs * tp
    if g.enabled and 1 <= fit < engine_seqs:
        m.notes.append(f"grpo: each vLLM engine gets {engine_seqs} sequences at once (its {tp} processes' "
                       f"rollouts) and its cache holds {fit:.0f}: the rest wait their turn (slower, not out of "
                       "memory)")
    if g.enabled and (room <= 0 or fit < 1):
        key = ("grpo.vllm_tensor_parallel_size" if vllm_weights + VLLM_OVERHEAD_GIB * GIB > colocated
               else "grpo.vllm_gpu_memory_utilization")
        m.problems.append(f"grpo: vLLM's share ({colocated / GIB:.1f} GiB) cannot hold the weights "
                          f"({vllm_weights / GIB:.1f} GiB at TP {tp}), its overhead and one {seq}-token "
                          f"sequence of KV cache: change {key}")
    rollout["vLLM (colocated)"] = colocated
    rhint["vLLM (colocated)"] = "grpo.vllm_gpu_memory_utilization (or grpo.vllm_mode=server)"
    # Awake for the sync: all of it, or (sleep mode) its weights only.
    sync["vLLM (colocated)"] = vllm_weights if sleep else colocated
    shint["vLLM (colocated)"] = "grpo.vllm_tensor_parallel_size"
    if not sleep:
        train["vLLM (colocated)"] = colocated
        hint["vLLM (colocated)"] = "grpo.vllm_enable_sleep_mode (or grpo.vllm_gpu_memory_utilization)"


def _transformers_rollout(m: _Machine, persistent: dict[str, float], hint: dict[str, str], prompt: int, seq: int,
                          gen_seqs: int, grpo_tokens: int) -> tuple[dict[str, float], dict[str, str]]:
    """Rollouts generated by the training processes themselves (transformers), per GPU or process."""
    arch, g, b = m.arch, m.recipe.grpo, m.b
    rollout: dict[str, float] = dict(persistent)
    rhint = dict(hint)
    gather = g.trl.get("ds3_gather_for_generation", True)
    sampler = g.merged_rollouts and (g.sampler_logprobs if g.sampler_logprobs is not None
                                     else m.recipe.model.dtype != "float32")
    if m.sharding in ("zero3", "fsdp") and m.shards > 1 and (gather or m.sharding == "fsdp"):
        rollout["gathered weights (whole model)"] = arch.params() * b
        rhint["gathered weights (whole model)"] = ("grpo.use_vllm (rollouts in vLLM, with Gazal's layer-wise weight "
                                                   "sync)")
    if g.merged_rollouts:
        if "gathered weights (whole model)" in rollout:
            # Folded into the gathered buffers in place, one layer at a time (adapters._merged):
            # the largest linear's float32 fold is the only transient.
            rollout["merged rollout fold (one linear)"] = max(i * o for i, o in arch.linears().values()) * (4 + b)
            rhint["merged rollout fold (one linear)"] = "grpo.merged_rollouts"
        else:
            # Unsharded weights are real storage: folds are new tensors beside the kept originals.
            rollout["merged rollout copy"] = arch.linear_params() * b
            rhint["merged rollout copy"] = "grpo.merged_rollouts"
    spg = g.steps_per_generation or g.gradient_accumulation_steps
    rollout["KV cache"] = gen_seqs * seq * arch.kv_bytes_per_token(b)
    rhint["KV cache"] = ("grpo.steps_per_generation" if spg > 1 else "grpo.per_device_train_batch_size"
                         if g.per_device_train_batch_size > 1 else "grpo.max_completion_length")
    work = nograd_layer_bytes(arch, gen_seqs * prompt, b)
    if sampler:
        work = max(work, nograd_layer_bytes(arch, grpo_tokens, b) + head_bytes(arch, grpo_tokens, m.cpu, b))
    rollout["layer working set"] = work
    rhint["layer working set"] = rhint["KV cache"]
    return rollout, rhint


def _server_phases(m: _Machine, seq: int) -> tuple[list[Phase], int]:
    """The `trl vllm-serve` server of grpo.vllm_mode server, per server GPU, and how many GPUs it takes
    (0: none, or not declared)."""
    recipe, arch, g, b = m.recipe, m.arch, m.recipe.grpo, m.b
    if m.cpu or not g.use_vllm or g.vllm_mode != "server" or not g.enabled:
        return [], 0
    tp = g.vllm_server_tensor_parallel_size
    if tp is None:
        m.lines.append("grpo vLLM server: its GPUs are not declared, so they are neither counted nor planned")
        m.warnings.append("grpo vLLM server: grpo.vllm_server_tensor_parallel_size (and _data_parallel_size) are "
                          "not set, so the GPUs `trl vllm-serve` runs on are not counted and its memory is not "
                          "planned: declare the server's --tensor-parallel-size / --data-parallel-size")
        return [], 0
    dp = g.vllm_server_data_parallel_size or 1
    util = g.vllm_server_gpu_memory_utilization
    P = arch.params()
    reserved = util * m.budget
    weights = P * b / tp
    room = reserved - weights - VLLM_OVERHEAD_GIB * GIB
    kv_tok = arch.kv_bytes_per_token(b, tp)
    fit = max(room, 0) / kv_tok / seq
    spg = g.steps_per_generation or g.gradient_accumulation_steps
    # TRL's main process sends every process's prompts to the server at once: the whole rollout batch.
    batch = g.per_device_train_batch_size * m.world * spg
    per_engine = math.ceil(batch / dp)
    waves = math.ceil(per_engine / fit) if fit >= 1 else 0
    m.lines.append(f"grpo vLLM server (trl vllm-serve, TP {tp} x DP {dp} = {tp * dp} GPUs of the same memory, on "
                   f"node(s) of its own): {util} x {m.budget / GIB:g} GiB = {reserved / GIB:.1f} GiB a GPU: weights "
                   f"/ TP {tp} = {weights / GIB:.1f} GiB, {VLLM_OVERHEAD_GIB:g} GiB overhead, KV cache "
                   f"{max(room, 0) / GIB:.1f} GiB at {kv_tok / 1024:g} KiB a token = {max(room, 0) / kv_tok:,.0f} "
                   f"tokens = {fit:.0f} sequences of {seq}; a rollout batch is {batch} completions "
                   f"(grpo.per_device_train_batch_size x {m.world} processes x steps_per_generation {spg}), "
                   f"{per_engine} an engine: "
                   + ("all in the cache at once" if waves == 1 else f"in {waves} waves" if waves else "none fit"))
    if tp > m.gpus:
        m.problems.append(f"grpo: grpo.vllm_server_tensor_parallel_size={tp} spans nodes of {m.gpus} GPUs (--gpus): "
                          "vLLM's tensor parallelism stays within a node here; change "
                          "grpo.vllm_server_tensor_parallel_size")
    if arch.heads % tp or (arch.kv_heads % tp and tp % arch.kv_heads):
        m.problems.append(f"grpo: vLLM splits {arch.heads} attention heads / {arch.kv_heads} KV heads evenly over "
                          f"tensor parallel ranks, and {tp} does not divide them: change "
                          "grpo.vllm_server_tensor_parallel_size")
    if dp > 1:
        m.problems.append(f"grpo: grpo.vllm_server_data_parallel_size={dp}: TRL 1.16's vllm-serve errors above 1 for "
                          "dense models (vLLM PR #30739); use the server's GPUs for tensor parallelism: change "
                          "grpo.vllm_server_data_parallel_size")
    if room <= 0 or fit < 1:
        m.problems.append(f"grpo: the vLLM server's share of a GPU ({reserved / GIB:.1f} GiB) cannot hold the weights "
                          f"({weights / GIB:.1f} GiB at TP {tp}), its overhead and one {seq}-token sequence: change "
                          "grpo.vllm_server_tensor_parallel_size (and the server's --tensor-parallel-size)")
    elif waves > 1:
        m.notes.append(f"grpo: the vLLM server's cache holds {fit:.0f} sequences an engine and a rollout batch brings "
                       f"{per_engine}: the rest wait their turn (slower, not out of memory)")
    rows = {"weights": weights, "vLLM overhead": VLLM_OVERHEAD_GIB * GIB, "KV cache": max(room, 0)}
    hint = {"weights": "grpo.vllm_server_tensor_parallel_size",
            "vLLM overhead": "grpo.vllm_server_gpu_memory_utilization",
            "KV cache": "grpo.vllm_server_gpu_memory_utilization"}
    return [Phase("grpo", "grpo server", rows, m.budget, g.enabled, reserved=reserved, hint=hint)], tp * dp


def _eval_phases(m: _Machine) -> list[Phase]:
    """Evaluation: vLLM engines on the training node, or transformers in every process."""
    recipe, arch, e, b, cpu = m.recipe, m.arch, m.recipe.eval, m.b, m.cpu
    P = arch.params()
    eprompt, eprompt_how, counts = eval_prompt_tokens(recipe, m.tokenizer)
    most_items, all_items = counts or (None, None)
    new = max(e.max_new_tokens if "reasoning" in e.modes else 0, e.direct_max_new_tokens if "direct" in e.modes else 0)
    eseq = eprompt + new
    if cpu or e.backend == "transformers":
        eb = 4 if cpu else b  # the transformers backend loads float32 on CPU
        seqs = min(e.batch_size, most_items or e.batch_size) * e.num_samples
        packed = e.generation_batch_size is not None and e.temperature == 0
        if packed:  # greedy batches of all benchmarks share calls (evaluate._packed)
            seqs = min(e.generation_batch_size, all_items or e.generation_batch_size)
        erows = {"weights": P * eb, "KV cache": seqs * eseq * arch.kv_bytes_per_token(eb),
                 "layer working set": nograd_layer_bytes(arch, seqs * eprompt, eb)
                 + (seqs * arch.heads * eprompt ** 2 * 4 if cpu else 0)}  # CPU SDPA with a padding mask: scores
        m.lines.append(f"eval (transformers): prompt {eprompt} tokens ({eprompt_how}) + {new} new = {eseq} a "
                       f"sequence; {seqs} sequences at once "
                       + ("(eval.generation_batch_size, or every benchmark's items when fewer); " if packed else
                          "(eval.batch_size, or the items of a benchmark when fewer, x eval.num_samples); ")
                       + "the whole model in every process")
        size_key = "eval.generation_batch_size" if packed else "eval.batch_size"
        ehint = {"weights": "eval.backend (vllm, with eval.vllm_tensor_parallel_size)", "KV cache": size_key,
                 "layer working set": size_key}
        if cpu:
            return [Phase("eval", "eval", _cpu_extra(erows, "eval"), m.budget, e.enabled, hint=ehint)]
        return [Phase("eval", "eval", {**erows, **m.overhead}, m.budget, e.enabled, hint=ehint)]
    tp, dp = e.vllm_tensor_parallel_size, e.vllm_data_parallel_size
    if tp * dp > m.gpus:
        m.problems.append(f"eval: eval.vllm_data_parallel_size ({dp}) x eval.vllm_tensor_parallel_size ({tp}) = "
                          f"{tp * dp} GPUs, but a node has {m.gpus} (--gpus): change eval.vllm_data_parallel_size")
    reserved = e.vllm_gpu_memory_utilization * m.budget
    weights = P * b / tp
    room = reserved - weights - VLLM_OVERHEAD_GIB * GIB
    kv_tok = arch.kv_bytes_per_token(b, tp)
    max_len = e.max_model_len or eseq
    fit = max(room, 0) / kv_tok / max_len
    erows = {"weights": weights, "vLLM overhead": VLLM_OVERHEAD_GIB * GIB, "KV cache": max(room, 0)}
    m.lines.append(f"eval (vLLM, {dp} engine(s) x TP {tp}): {e.vllm_gpu_memory_utilization} x {m.budget / GIB:g} GiB "
                   f"= {reserved / GIB:.1f} GiB a GPU for vLLM; KV cache {kv_tok / 1024:g} KiB a token a GPU "
                   f"({arch.layers} layers x {math.ceil(arch.kv_heads / tp)} KV heads x {arch.head_dim} x K,V x {b} "
                   f"bytes), {max(room, 0) / kv_tok:,.0f} tokens = {fit:.1f} sequences of "
                   f"{'eval.max_model_len ' if e.max_model_len else ''}{max_len} tokens (prompt {eprompt}, "
                   f"{eprompt_how}, + {new} new)")
    ehint = {"weights": "eval.vllm_tensor_parallel_size", "vLLM overhead": "eval.vllm_gpu_memory_utilization",
             "KV cache": "eval.vllm_gpu_memory_utilization"}
    if e.max_model_len is None:
        m.notes.append("eval.max_model_len is unset: vLLM plans for the model's own context length; set it to "
                       f"about {eseq} so the KV cache is sized for what evaluation generates")
    if e.enabled:
        if room <= 0:
            m.problems.append(f"eval: vLLM's share of a GPU ({reserved / GIB:.1f} GiB) cannot hold the weights "
                              f"({weights / GIB:.1f} GiB at TP {tp}) and its overhead: change "
                              "eval.vllm_tensor_parallel_size")
        elif fit < 1:
            m.problems.append(f"eval: vLLM's KV cache holds {fit:.2f} sequences of {max_len} tokens: change "
                              "eval.max_model_len (or eval.vllm_tensor_parallel_size)")
    return [Phase("eval", "eval", erows, m.budget, e.enabled, reserved=reserved, hint=ehint)]


def _cpu_save(rows: dict[str, float], arch: Arch, b: int, stage: str) -> dict[str, float]:
    """CPU end of a training stage: the base loaded again to merge into, on top of the heap glibc kept."""
    # The activations are freed by now, but glibc keeps them in its heap (allocations under its
    # 32 MiB mmap threshold), so the merge lands on top of them.
    save = {k: rows[k] for k in ("weights", "adapter + grads + AdamW", "activations")}
    merge = arch.params() * b
    return _cpu_extra({**save, "merge at save (base loaded again)": merge}, stage, merge)


def _host_memory() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _count(n: float) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M" if n >= 1e6 else f"{n:,.0f}"


def _rate(n: float) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else f"{n:.3g}"


def _throughput(recipe: Recipe, arch: Arch, world: int, server_gpus: int, gpu_tflops: float | None) -> list[str]:
    peak = (gpu_tflops or H100_BF16_DENSE_TFLOPS) * 1e12
    lo, hi = MFU_RANGE
    P = arch.params()
    where = f"--gpu-flops {gpu_tflops:g}" if gpu_tflops else f"default: H100 bf16 dense {H100_BF16_DENSE_TFLOPS:g}"
    out = [f"tokens a second, an estimate from FLOPs only: {lo:.0%}-{hi:.0%} MFU of {peak / 1e12:g} TFLOP/s a GPU "
           f"({where}); attention FLOPs and communication ignored"]

    def train(stage: str, gpus: int) -> str:
        k = 8 if getattr(recipe, stage).gradient_checkpointing else 6
        return (f"{_rate(gpus * lo * peak / (k * P))}-{_rate(gpus * hi * peak / (k * P))} tokens/s training on "
                f"{gpus} GPU(s) ({k} x P FLOPs a token{' with recomputation' if k == 8 else ''})")

    def decode(gpus: int) -> str:
        return f"{_rate(gpus * lo * peak / (2 * P))}-{_rate(gpus * hi * peak / (2 * P))} tokens/s decoding (2 x P)"

    out.append(f"  sft: {train('sft', world)}")
    rollout_gpus = server_gpus or world
    out.append(f"  grpo: {train('grpo', world)}; rollouts {decode(rollout_gpus)} on {rollout_gpus} GPU(s)"
               f"{' of the vLLM server' if server_gpus else ''} (small-batch decoding is memory-bound: expect less, "
               "especially with transformers)")
    e = recipe.eval
    gpus = e.vllm_tensor_parallel_size * e.vllm_data_parallel_size if e.backend == "vllm" else world
    out.append(f"  eval: {decode(gpus)} on {gpus} GPU(s)")
    return out
