"""How far the policy that samples (merged weights) is from the policy that learns (adapter forward).

Merged-weight rollouts sample from W' = merge(W, adapter), while GRPO's loss evaluates the same
tokens through the adapter forward (base output plus the DoRA/LoRA path). In exact arithmetic the
two are equal; in floating point they differ by rounding, most in bfloat16 where the merged weight
is rounded to 8 bits of mantissa. This prints, per dtype, the per-token log-probability gap of
the sampled tokens: log p_sample (from the logits generate sampled with, merged) minus
log p_learn (one adapter forward over prompt + completion, as TRL computes it). Dropout is off in
both, as Gazal's GRPO runs it.

    python bench/rollout_logprob_gap.py                       # tiny Qwen3, adapter with random B
    python bench/rollout_logprob_gap.py --model gazal:smollm2-135m-instruct
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model

from gazal.adapters import MergedRollouts
from gazal.models import TINY_QWEN3, load_model, load_tokenizer, resolve_model

PROMPTS = [
    "A 64-year-old man has crushing chest pain for 40 minutes with ST elevation in V1-V4. Next step?",
    "A 25-year-old woman has fever, dysuria and flank pain. Which antibiotic is appropriate?",
    "A child has a barking cough and inspiratory stridor. What is the most likely diagnosis?",
    "An 80-year-old woman on warfarin has an INR of 9 without bleeding. What should be done?",
]


def _sampled_logprobs(model, tok, batch, tokens: int, merged: bool):
    """Sample with the adapter merged (Gazal) or through it (TRL's default); return the sequences,
    the log-probabilities the sampler used, and those of one adapter forward (what GRPO learns from)."""
    rollouts = MergedRollouts()
    kwargs = dict(max_new_tokens=tokens, do_sample=True, temperature=1.0, top_p=1.0, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = (rollouts.generate(model, model.generate, **batch, **kwargs) if merged
               else model.generate(**batch, **kwargs))
        n = batch["input_ids"].shape[1]
        completion = out.sequences[:, n:]
        mask = torch.cat([batch["attention_mask"], torch.ones_like(completion)], dim=1)
        learn = model(input_ids=out.sequences, attention_mask=mask).logits[:, n - 1:-1].float().log_softmax(-1)
        learn_lp = learn.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        if merged:  # the merge alone: the same full forward, merged weights vs the adapter
            full = rollouts.generate(model, lambda **k: model(**k).logits, input_ids=out.sequences, attention_mask=mask)
            sample_lp = full[:, n - 1:-1].float().log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
            merge_only = sample_lp - learn_lp
    # Tokens after an end-of-sequence are padding, not samples.
    eos = (completion == tok.eos_token_id).int().cumsum(1)
    keep = (eos == 0) | ((eos == 1) & (completion == tok.eos_token_id))
    d = (torch.stack(out.logits, dim=1).float().log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
         - learn_lp)
    return {"sampled": d[keep], **({"merge only": merge_only[keep]} if merged else {})}


def gap(model_name: str, dtype: torch.dtype, tokens: int, seed: int, b_std: float,
        device: str = "cpu") -> dict[str, dict[str, float]]:
    path = resolve_model(model_name)
    tok = load_tokenizer(path)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=True, use_rslora=True,
                     lora_dropout=0.0)
    model = get_peft_model(load_model(path, "float32"), cfg)
    with torch.no_grad():  # B starts at zero; a trained adapter's is small but not zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + b_std * torch.randn_like(p))
    model = model.to(device=device, dtype=dtype).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    batch = tok(texts, return_tensors="pt", padding=True).to(device)
    out = {}
    for mode, merged in (("adapter", False), ("merged", True)):
        torch.manual_seed(seed)
        for kind, d in _sampled_logprobs(model, tok, batch, tokens, merged).items():
            ratio = d.exp()
            out[f"{mode}, {kind}"] = {"tokens": int(d.numel()), "mean_abs": float(d.abs().mean()),
                "p99_abs": float(d.abs().quantile(0.99)), "max_abs": float(d.abs().max()),
                "mean": float(d.mean()), "outside": float(((ratio < 0.8) | (ratio > 1.28)).float().mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TINY_QWEN3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2, help="repeats with different adapters and samples")
    parser.add_argument("--b-std", type=float, default=0.01, help="std of lora_B (and relative jitter of DoRA magnitudes)")
    args = parser.parse_args()
    print(f"model {args.model}, 4 prompts x {args.tokens} sampled tokens, DoRA + rsLoRA r=16, lora_B ~ N(0, {args.b_std})")
    print("d = log p(sampled token) under the sampler - under one adapter forward (GRPO's learning forward)")
    print("sampler 'adapter': generation through the PEFT adapter (TRL's default); 'merged': Gazal's merged weights;")
    print("'sampled' uses the logits generate sampled with (KV cache); 'merge only' one full forward with merged weights")
    print(f"{'dtype':<9} {'sampler':<20} {'seed':>4} {'tokens':>6} {'mean |d|':>9} {'p99 |d|':>9} {'max |d|':>9} "
          f"{'mean d':>9} {'ratio outside [0.8, 1.28]':>26}")
    for dtype in (torch.float32, torch.bfloat16):
        for seed in range(args.seeds):
            for mode, r in gap(args.model, dtype, args.tokens, seed, args.b_std).items():
                print(f"{str(dtype).split('.')[1]:<9} {mode:<20} {seed:>4} {r['tokens']:>6} {r['mean_abs']:>9.2e} "
                      f"{r['p99_abs']:>9.2e} {r['max_abs']:>9.2e} {r['mean']:>9.2e} {r['outside']:>26.2%}")


if __name__ == "__main__":
    main()
