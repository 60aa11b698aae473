"""Generation backends: transformers everywhere, vLLM only where CUDA and vllm exist."""

import importlib.util

import pytest
import torch

from gazal.recipes import load_recipe
from gazal.errors import GazalError
import gazal.generation
from gazal.generation import Decoding, TransformersGenerator, VLLMGenerator, make_generator, weight_first_decode
from gazal.models import TINY_QWEN3, resolve_model

CONV = [[{"role": "user", "content": "Fever?"}], [{"role": "user", "content": "A much longer question about a cough?"}]]


def test_transformers_batched_equals_one_at_a_time_greedy():
    recipe = load_recipe("demo", ["eval.max_new_tokens=6"])
    gen = TransformersGenerator(resolve_model(TINY_QWEN3), recipe)
    batched = gen.generate(CONV)
    single = [gen.generate([c])[0] for c in CONV]
    assert [b[0].text for b in batched] == [s[0].text for s in single]
    assert all(c[0].tokens <= 6 for c in batched)


def test_weight_first_decode_computes_what_f_linear_does_and_leaves_no_trace(monkeypatch):
    calls = []
    real = gazal.generation._weight_first_linear
    monkeypatch.setattr(gazal.generation, "_weight_first_linear", lambda self, x: calls.append(x.shape) or real(self, x))
    recipe = load_recipe("demo", ["eval.max_new_tokens=8"])
    gen = TransformersGenerator(resolve_model(TINY_QWEN3), recipe)
    model = gen.model
    ids = torch.randint(0, model.config.vocab_size, (3, 5))
    with torch.no_grad():
        stock = model(ids[:, -1:]).logits  # 3 rows per linear: the weight-first path
        with weight_first_decode(model) as same:
            assert same is model
            fast = model(ids[:, -1:]).logits
            prefill = model(ids).logits  # 15 rows: F.linear
    assert {tuple(s[:2]) for s in calls} == {(3, 1), (3, 5)}  # every linear, decode step and prefill
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    assert torch.equal(prefill, model(ids).logits)
    # Nothing stays patched, and the generator itself decodes through the weight-first path.
    assert not any("forward" in m.__dict__ for m in model.modules())
    calls.clear()
    assert [c[0].text for c in gen.generate(CONV)] == [gen.generate([c])[0][0].text for c in CONV]
    assert calls


def test_samples_per_item():
    recipe = load_recipe("demo", ["eval.max_new_tokens=4", "eval.temperature=1.0", "eval.num_samples=3"])
    gen = TransformersGenerator(resolve_model(TINY_QWEN3), recipe)
    out = gen.generate(CONV, Decoding.of(recipe.eval, "reasoning"), seed=7)
    assert [len(x) for x in out] == [3, 3]
    again = gen.generate(CONV, Decoding.of(recipe.eval, "reasoning"), seed=7)
    assert [[c.text for c in x] for x in out] == [[c.text for c in x] for x in again]  # seeded per call


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
    assert [a[0].text for a in vllm_out] == [b[0].text for b in hf_out]


def test_sampling_keys_and_chat_template_kwargs_reach_transformers(monkeypatch):
    recipe = load_recipe("demo", ["eval.max_new_tokens=3", "eval.preset=qwen3-thinking",
                                  "eval.chat_template_kwargs={enable_thinking: true}"])
    assert (recipe.eval.temperature, recipe.eval.top_p, recipe.eval.top_k, recipe.eval.min_p) == (0.6, 0.95, 20, 0.0)
    gen = TransformersGenerator(resolve_model(TINY_QWEN3), recipe)
    seen = {}
    template, generate = gen.tokenizer.apply_chat_template, gen.model.generate
    monkeypatch.setattr(gen.tokenizer, "apply_chat_template", lambda *a, **k: seen.setdefault("tpl", k) and template(*a, **k))
    monkeypatch.setattr(gen.model, "generate", lambda **k: seen.setdefault("gen", k) is not None and generate(**k))
    gen.generate(CONV[:1])
    assert seen["tpl"]["enable_thinking"] is True
    assert (seen["gen"]["temperature"], seen["gen"]["top_p"], seen["gen"]["top_k"]) == (0.6, 0.95, 20)
    # A preset fills only what the recipe leaves unset.
    assert load_recipe("demo", ["eval.preset=qwen3-thinking", "eval.top_k=5"]).eval.top_k == 5


def test_vllm_options_reach_the_engine_without_a_gpu(monkeypatch):
    """A stand-in `vllm` module records what Gazal hands to LLM(...), SamplingParams and chat()."""
    import sys
    import types

    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen["llm"] = kwargs

        def get_tokenizer(self):
            from gazal.models import load_tokenizer
            return load_tokenizer(resolve_model(TINY_QWEN3))

        def chat(self, conversations, params, **kwargs):
            seen["chat"] = kwargs
            ids = self.get_tokenizer()("<think>x</think>The answer is A.")["input_ids"]
            out = types.SimpleNamespace(token_ids=ids, finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out] * params.n) for _ in conversations]

    def sampling_params(**kwargs):
        seen["params"] = kwargs
        return types.SimpleNamespace(**kwargs)

    recipe = load_recipe("demo", ["eval.backend=vllm", "eval.vllm_tensor_parallel_size=4", "eval.max_model_len=4096",
                                  "eval.preset=qwen3-thinking", "eval.chat_template_kwargs={enable_thinking: false}"])
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=sampling_params))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = VLLMGenerator("/models/x", recipe).generate(CONV, Decoding.of(recipe.eval, "reasoning"), seed=3)
    assert seen["llm"]["tensor_parallel_size"] == 4 and seen["llm"]["max_model_len"] == 4096
    assert seen["llm"]["model"] == "/models/x"
    assert seen["chat"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert (seen["params"]["top_k"], seen["params"]["temperature"], seen["params"]["seed"]) == (20, 0.6, 3)
    assert out[0][0].text.startswith("<think>x</think>")  # the one decode rule, on vLLM's token ids


def test_one_decode_rule_keeps_special_reasoning_tags():
    """The tiny tokenizer makes <think> a special token: TRL's skip_special_tokens=True would drop it."""
    from gazal.models import load_tokenizer
    from gazal.tasks import decode_completion

    tok = load_tokenizer(resolve_model(TINY_QWEN3))
    assert tok.convert_tokens_to_ids("<think>") in tok.all_special_ids
    ids = tok("<think>fever</think>\nThe answer is A.<|im_end|><|endoftext|>", add_special_tokens=False)["input_ids"]
    assert "<think>" not in tok.decode(ids, skip_special_tokens=True)
    assert decode_completion(tok, ids) == "<think>fever</think>\nThe answer is A."
