"""DoRA + rsLoRA adapters: merged rollouts generate what the adapter generates, and leave no trace."""

import torch
from peft import LoraConfig, get_peft_model

from gazal.adapters import MergedRollouts
from gazal.models import TINY_QWEN3, load_model, load_tokenizer, resolve_model


def _dora_model():
    path = resolve_model(TINY_QWEN3)
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapter really changes the outputs.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, use_rslora=True,
                     init_lora_weights=False)
    return get_peft_model(load_model(path), cfg), load_tokenizer(path)


def test_merged_rollout_matches_adapter_and_restores_base_exactly():
    model, tok = _dora_model()
    model.eval()
    ids = tok(["<|im_start|>user\nFever and cough?<|im_end|>\n"], return_tensors="pt")["input_ids"]
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
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
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert rollouts.calls == 2
