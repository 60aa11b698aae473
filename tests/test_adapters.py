"""DoRA + rsLoRA adapters: merged rollouts generate what the adapter generates, and leave no trace."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from gazal.adapters import MergedRollouts
from gazal.models import TINY_QWEN3, load_model, load_tokenizer, resolve_model


def _dora_model(dora: bool = True):
    path = resolve_model(TINY_QWEN3)
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapter really changes the outputs.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora, use_rslora=True,
                     init_lora_weights=False)
    return get_peft_model(load_model(path), cfg), load_tokenizer(path)


@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
def test_merged_rollout_matches_adapter_and_restores_base_exactly(dora):
    # Plain LoRA's default merge adds into the base weight in place; with no copy of the base kept,
    # only a merge into new tensors leaves it bit-exact, so both kinds are checked.
    model, tok = _dora_model(dora)
    model.eval()
    ids = tok(["<|im_start|>user\nFever and cough?<|im_end|>\n"], return_tensors="pt")["input_ids"]
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    storage = {n: p.data_ptr() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        adapter_logits = model(ids).logits
        with model.disable_adapter():
            plain_logits = model(ids).logits
        rollouts = MergedRollouts()
        merged_logits = rollouts.generate(model, lambda x: model(x).logits, ids)
        merged_tokens = rollouts.generate(model, model.generate, ids, max_new_tokens=8, do_sample=False)
        adapter_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert not torch.allclose(adapter_logits, plain_logits, atol=1e-3)  # the adapter matters
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-4)
    assert torch.equal(adapter_tokens, merged_tokens)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, base_before[n]), n  # bit-exact, not merely close
            assert p.data_ptr() == storage[n], n  # the very tensors, not copies of them
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert rollouts.calls == 2 and rollouts.in_place == 0  # plain weights are real storage: never written


def test_zero_rate_adapter_dropout_becomes_identity_and_saves_the_second_base_projection(monkeypatch):
    from trl.trainer.utils import disable_dropout_in_model

    from gazal.adapters import drop_inert_dropout

    path = resolve_model(TINY_QWEN3)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", use_dora=True,
                     init_lora_weights=False)
    model = get_peft_model(load_model(path), cfg)
    disable_dropout_in_model(model)  # what TRL's disable_dropout does: rates 0, modules kept
    model.train()
    ids = torch.randint(0, 100, (1, 12))
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))

    def forward():
        calls.clear()
        out = model(ids).logits
        return out, len(calls)

    before, n_before = forward()
    layers = sum(1 for m in model.modules() if hasattr(m, "lora_dropout"))
    assert drop_inert_dropout(model) == layers > 0
    after, n_after = forward()
    assert n_before - n_after == layers  # one base projection fewer per DoRA layer
    assert torch.allclose(before, after, atol=1e-5)
    assert drop_inert_dropout(model) == 0


def _peft_tiny():
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    return get_peft_model(load_model(resolve_model(TINY_QWEN3)), cfg)


def test_change_check_sees_one_changed_bit_and_a_permutation_of_a_frozen_tensor():
    from gazal.adapters import ParamSnapshot

    model = _peft_tiny()
    snapshot = ParamSnapshot(model)
    unchanged = snapshot.compare(model)
    assert unchanged["trainable_tensors_changed"] == unchanged["frozen_tensors_changed"] == 0
    assert unchanged["trainable_tensors"] == 42 and unchanged["frozen_tensors"] > 0
    params = dict(model.named_parameters())
    with torch.no_grad():
        embed = params["base_model.model.model.embed_tokens.weight"]
        embed[[3, 7]] = embed[[7, 3]]  # rows swapped: same sum, same sum of squares
        norm = params["base_model.model.model.norm.weight"]
        norm.view(torch.int32)[5] ^= 1  # the last bit of one element
        params["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"][0, 0] += 1e-3
    changed = snapshot.compare(model)
    assert changed["frozen_tensors_changed"] == 2 and changed["trainable_tensors_changed"] == 1
