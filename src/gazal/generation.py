"""Generation backends behind one interface: transformers (CPU or GPU) and vLLM (GPU extra).

Both take chat conversations and return, per conversation, `n` completions with their token
counts and whether they hit the token limit. Models are always merged checkpoints, so neither
backend ever generates through an unmerged adapter.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from gazal.config import EvalSettings, Recipe
from gazal.errors import GazalError
from gazal.models import load_model, load_tokenizer, model_kwargs
from gazal.sharding import unsharded_loading
from gazal.tasks import decode_completion

log = logging.getLogger(__name__)


# Decode steps of at most this many rows run their linears weight-first on CPU (see `weight_first_decode`).
WEIGHT_FIRST_MAX_ROWS = 4


def _weight_first_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if not 2 <= rows <= WEIGHT_FIRST_MAX_ROWS:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    y = (self.weight @ x.reshape(rows, x.shape[-1]).T).T
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], self.weight.shape[0])


@contextmanager
def weight_first_decode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """For the block, CPU linears compute decode steps of 2-4 rows as `W @ x.T` instead of `x @ W.T`.

    Hand-written on purpose: a decode step reads every weight once, so it is bound by memory
    bandwidth, and for 2-4 rows MKL's `x @ W.T` (what `F.linear` calls) reaches only about half of
    it, while the same product with the weight as the left operand streams it at about the rate of
    one row. Measured on this project's 2-core CPU with SmolLM2-135M (bench/cpu_decode.py): 4
    sequences decode about 1.6x faster, and greedy tokens are the same. 1 row (a GEMV either way)
    and 5 or more rows gain nothing, so they keep `F.linear`. A group of 4 GRPO completions is the
    case it is for. GPU linears are left alone (cuBLAS has no such gap), as are modules that already
    carry an instance-level `forward` (another library's wrapper).
    """
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
               and "forward" not in m.__dict__ and type(m.weight.data) is torch.Tensor]
    for m in linears:
        m.forward = types.MethodType(_weight_first_linear, m)
    try:
        yield model
    finally:
        for m in linears:
            del m.forward


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    truncated: bool


@dataclass(frozen=True)
class Decoding:
    """How one call generates: token budget, sampling (temperature 0: greedy), samples per prompt."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    prefill: str = ""  # the assistant turn starts with this; completions include it

    @classmethod
    def of(cls, cfg: EvalSettings, mode: str) -> Decoding:
        """The recipe's decoding for a mode: 'reasoning' as configured, 'direct' greedy and short."""
        if mode == "direct":
            return cls(cfg.direct_max_new_tokens,
                       chat_template_kwargs={**cfg.chat_template_kwargs, **cfg.direct_chat_template_kwargs},
                       prefill=cfg.direct_prefill)
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p, cfg.num_samples,
                   dict(cfg.chat_template_kwargs))


class TransformersGenerator:
    """Batched `generate` with left padding; greedy when temperature is 0."""

    def __init__(self, model_path: str, recipe: Recipe):
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=recipe.model.trust_remote_code)
        self.tokenizer.padding_side = "left"
        dtype = recipe.model.dtype if torch.cuda.is_available() else "float32"
        # A whole model in this process, even after a ZeRO-3 training stage of `gazal run` left
        # DeepSpeed's config active (it would partition the weights and wait for other ranks).
        with unsharded_loading():
            self.model = load_model(model_path, dtype, trust_remote_code=recipe.model.trust_remote_code,
                                    **model_kwargs(recipe.model))
        if torch.cuda.is_available():
            # Under data-parallel evaluation each process takes its own GPU.
            self.model.to(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        self.model.eval()
        self.cfg = recipe.eval
        self.stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict[str, str]]], decoding: Decoding | None = None,
                 seed: int = 0) -> list[list[Completion]]:
        """`decoding`'s completions per conversation (None: the recipe's reasoning-mode decoding)."""
        decoding = decoding or Decoding.of(self.cfg, "reasoning")
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False,
                                                      **decoding.chat_template_kwargs) + decoding.prefill
                   for c in conversations]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        sampling = decoding.temperature > 0
        # Seeded per call (evaluation passes one seed per fixed batch), so a resumed or data-parallel
        # run samples what an uninterrupted single-process run samples.
        torch.manual_seed(seed)
        with weight_first_decode(self.model):
            out = self.model.generate(
                **enc,
                max_new_tokens=decoding.max_new_tokens,
                do_sample=sampling,
                temperature=decoding.temperature if sampling else None,
                top_p=decoding.top_p if sampling else None,
                # 0 switches top-k off (the model's generation config would otherwise bring its own, often 50).
                top_k=(decoding.top_k or 0) if sampling else None,
                min_p=(decoding.min_p or None) if sampling else None,
                num_return_sequences=decoding.n,
                pad_token_id=self.tokenizer.pad_token_id,
                # This process generates alone on a whole model; transformers would otherwise sync every
                # step with other ranks when a ZeRO-3 config is active.
                synced_gpus=False,
            )
        flat = []
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            ids = row if end is None else row[:end]
            flat.append(Completion(decoding.prefill + decode_completion(self.tokenizer, ids), len(ids), end is None))
        n = decoding.n
        return [flat[i * n:(i + 1) * n] for i in range(len(conversations))]


def vllm_engine_kwargs(recipe: Recipe, model_path: str) -> dict[str, Any]:
    """Keyword arguments of vLLM's `LLM(...)` for the recipe."""
    cfg = recipe.eval
    kwargs = {"model": model_path, "dtype": recipe.model.dtype, "seed": recipe.seed,
              "gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
              "tensor_parallel_size": cfg.vllm_tensor_parallel_size,
              "trust_remote_code": recipe.model.trust_remote_code}
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    return kwargs


class VLLMGenerator:
    """vLLM offline engine (GPU). Install with `pip install gazal[gpu]`."""

    def __init__(self, model_path: str, recipe: Recipe):
        try:
            from vllm import LLM
        except ImportError:
            raise GazalError("eval.backend: 'vllm' needs the vllm package (pip install 'gazal[gpu]')") from None
        if not torch.cuda.is_available():
            raise GazalError("eval.backend: 'vllm' needs a CUDA GPU; use 'transformers' on CPU")
        self.cfg = recipe.eval
        self.llm = LLM(**vllm_engine_kwargs(recipe, model_path))
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, conversations: list[list[dict[str, str]]], decoding: Decoding | None = None,
                 seed: int = 0) -> list[list[Completion]]:
        """`decoding`'s completions per conversation (None: the recipe's reasoning-mode decoding)."""
        decoding = decoding or Decoding.of(self.cfg, "reasoning")
        from vllm import SamplingParams

        extra = {k: v for k, v in (("top_k", decoding.top_k), ("min_p", decoding.min_p)) if v}
        params = SamplingParams(n=decoding.n, temperature=decoding.temperature,
                                top_p=decoding.top_p if decoding.temperature > 0 else 1.0,
                                max_tokens=decoding.max_new_tokens, seed=seed, **extra)
        if decoding.prefill:
            # vLLM's chat() cannot start the assistant turn with given text: render the template here.
            prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False,
                                                          **decoding.chat_template_kwargs) + decoding.prefill
                       for c in conversations]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        else:
            outputs = self.llm.chat(conversations, params, use_tqdm=False,
                                    chat_template_kwargs=decoding.chat_template_kwargs or None)
        eos = self.tokenizer.eos_token_id
        return [[Completion(decoding.prefill + decode_completion(self.tokenizer, o.token_ids),
                            len([t for t in o.token_ids if t != eos]), o.finish_reason == "length")
                 for o in req.outputs] for req in outputs]


def make_generator(model_path: str, recipe: Recipe) -> TransformersGenerator | VLLMGenerator:
    """The recipe's backend over a merged model."""
    if recipe.eval.backend == "vllm":
        return VLLMGenerator(model_path, recipe)
    return TransformersGenerator(model_path, recipe)
