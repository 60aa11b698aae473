"""Generation backends: transformers everywhere, vLLM only where CUDA and vllm exist."""

import importlib.util

import pytest
import torch

from gazal.config import load_recipe
from gazal.errors import GazalError
from gazal.generation import TransformersGenerator, VLLMGenerator, make_generator
from gazal.models import TINY_QWEN3, resolve_model

CONV = [[{"role": "user", "content": "Fever?"}], [{"role": "user", "content": "A much longer question about a cough?"}]]


def test_transformers_batched_equals_one_at_a_time_greedy():
    recipe = load_recipe("demo", ["eval.max_new_tokens=6"])
    gen = TransformersGenerator(resolve_model(TINY_QWEN3), recipe)
    batched = gen.generate(CONV)
    single = [gen.generate([c])[0] for c in CONV]
    assert [b[0].text for b in batched] == [s[0].text for s in single]
    assert all(c[0].tokens <= 6 for c in batched)


def test_samples_per_item():
    recipe = load_recipe("demo", ["eval.max_new_tokens=4", "eval.temperature=1.0", "eval.num_samples=3"])
    out = TransformersGenerator(resolve_model(TINY_QWEN3), recipe).generate(CONV, n=3)
    assert [len(x) for x in out] == [3, 3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_vllm_backend_refuses_plainly_without_cuda():
    recipe = load_recipe("demo", ["eval.backend=vllm"])
    with pytest.raises(GazalError, match="vllm"):
        make_generator(resolve_model(TINY_QWEN3), recipe)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                    reason="needs CUDA and vllm")
def test_vllm_matches_transformers_greedy():
    recipe = load_recipe("demo", ["eval.max_new_tokens=8", "eval.backend=vllm"])
    path = resolve_model(TINY_QWEN3)
    vllm_out = VLLMGenerator(path, recipe).generate(CONV)
    hf_out = TransformersGenerator(path, recipe).generate(CONV)
    assert [len(x) for x in vllm_out] == [1, 1]
    assert sum(a[0].text == b[0].text for a, b in zip(vllm_out, hf_out)) >= 1
