"""Generation backends behind one interface: transformers (CPU or GPU) and vLLM (GPU extra).

Both take chat conversations and return, per conversation, `n` completions with their token
counts and whether they hit the token limit. Models are always merged checkpoints, so neither
backend ever generates through an unmerged adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gazal.config import Recipe
from gazal.errors import GazalError
from gazal.models import load_model, load_tokenizer
from gazal.sharding import unsharded_loading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    truncated: bool


class TransformersGenerator:
    """Batched `generate` with left padding; greedy when temperature is 0."""

    def __init__(self, model_path: str, recipe: Recipe):
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=recipe.model.trust_remote_code)
        self.tokenizer.padding_side = "left"
        dtype = recipe.model.dtype if torch.cuda.is_available() else "float32"
        # A whole model in this process, even after a ZeRO-3 training stage of `gazal run` left
        # DeepSpeed's config active (it would partition the weights and wait for other ranks).
        with unsharded_loading():
            self.model = load_model(model_path, dtype, trust_remote_code=recipe.model.trust_remote_code)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.model.eval()
        self.cfg = recipe.eval
        self.stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict[str, str]]], n: int = 1) -> list[list[Completion]]:
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        sampling = self.cfg.temperature > 0
        out = self.model.generate(
            **enc,
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=sampling,
            temperature=self.cfg.temperature if sampling else None,
            top_p=self.cfg.top_p if sampling else None,
            top_k=None,
            num_return_sequences=n,
            pad_token_id=self.tokenizer.pad_token_id,
            # This process generates alone on a whole model; transformers would otherwise sync every
            # step with other ranks when a ZeRO-3 config is active.
            synced_gpus=False,
        )
        flat = []
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            ids = row if end is None else row[:end]
            # Special tokens such as <think> are kept: some tokenizers mark them special.
            flat.append(Completion(self.tokenizer.decode(ids, skip_special_tokens=False), len(ids), end is None))
        return [flat[i * n:(i + 1) * n] for i in range(len(conversations))]


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
        self.llm = LLM(model=model_path, dtype=recipe.model.dtype, seed=recipe.seed,
                       gpu_memory_utilization=recipe.eval.vllm_gpu_memory_utilization,
                       trust_remote_code=recipe.model.trust_remote_code)

    def generate(self, conversations: list[list[dict[str, str]]], n: int = 1) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p if self.cfg.temperature > 0 else 1.0,
                                max_tokens=self.cfg.max_new_tokens)
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        return [[Completion(o.text, len(o.token_ids), o.finish_reason == "length") for o in req.outputs] for req in outputs]


def make_generator(model_path: str, recipe: Recipe) -> TransformersGenerator | VLLMGenerator:
    """The recipe's backend over a merged model."""
    if recipe.eval.backend == "vllm":
        return VLLMGenerator(model_path, recipe)
    return TransformersGenerator(model_path, recipe)
