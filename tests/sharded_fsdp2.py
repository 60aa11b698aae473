"""Gazal's sharded code paths on real FSDP2 shards: run by tests/test_sharding.py under
`torchrun --nproc_per_node 2` (gloo, CPU). accelerate turns FSDP on only for GPU-like devices, so
torch's `fully_shard` is applied here directly, the way accelerate's FSDP2 plugin wraps a model
(each decoder layer, then the root), and Gazal's functions are called on the result.

Writes a JSON of findings to argv[1] from rank 0; the test asserts on it.
"""

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from gazal.adapters import MergedRollouts, ParamSnapshot, merge_saved_adapter
from gazal.training import adapter_only_fsdp_saves
from gazal.models import TINY_QWEN3, load_model, load_tokenizer, resolve_model
from gazal.sharding import sharding_of


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    path = resolve_model(TINY_QWEN3)
    tok = load_tokenizer(path)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, use_rslora=True,
                     init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(load_model(path), cfg)  # same seed on both ranks: the same adapter
    reference = copy.deepcopy(model).eval()  # whole, unsharded: what one process would compute
    initial_adapter = {k: v.clone() for k, v in get_peft_model_state_dict(reference).items()}

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "generate")  # as transformers' Trainer does for FSDP2
    model.eval()
    found: dict = {"sharding": sharding_of(model)}
    params = dict(model.named_parameters())
    found["all_dtensor"] = all(isinstance(p, DTensor) for p in params.values())
    q = params["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    found["local_rows"], found["full_rows"] = q.to_local().shape[0], q.shape[0]

    ids = tok(["<|im_start|>user\nFever, cough and pleuritic chest pain?<|im_end|>\n<|im_start|>assistant\n"],
              return_tensors="pt")["input_ids"]
    shards_before = {n: p.to_local().clone() for n, p in params.items()}
    gathers = []
    full_tensor = DTensor.full_tensor
    DTensor.full_tensor = lambda self, *a, **k: gathers.append(1) or full_tensor(self, *a, **k)
    snapshot = ParamSnapshot(model)  # the change check reads shards: no gather
    DTensor.full_tensor = full_tensor
    with torch.no_grad():
        forward_before = model(ids).logits

    # Merged rollouts on the sharded model, against the adapter on whole weights.
    rollouts = MergedRollouts()
    with torch.no_grad():
        merged_tokens = rollouts.generate(model, model.generate, ids, max_new_tokens=10, do_sample=False)
        merged_logits = rollouts.generate(model, lambda x: model(x).logits, ids)
        adapter_tokens = reference.generate(ids, max_new_tokens=10, do_sample=False)
        adapter_logits = reference(ids).logits
        with reference.disable_adapter():
            plain_logits = reference(ids).logits
    found["rollout_calls"] = rollouts.calls
    found["folded_in_place"] = rollouts.in_place  # into FSDP's all-gather buffers: no second copy
    found["tokens_equal"] = torch.equal(merged_tokens, adapter_tokens)
    found["new_tokens"] = merged_tokens.shape[1] - ids.shape[1]
    found["logits_max_diff"] = float((merged_logits - adapter_logits).abs().max())
    found["adapter_effect"] = float((adapter_logits - plain_logits).abs().max())
    found["shards_exact_after_rollout"] = all(torch.equal(p.to_local(), shards_before[n]) for n, p in params.items())
    found["sharded_after_rollout"] = all(isinstance(p, DTensor) for p in model.parameters())
    found["merged_flag_after"] = any(getattr(m, "merged", False) for m in model.modules())
    with torch.no_grad():  # what FSDP gathers afresh after the rollout, not a leftover of the unmerge
        found["forward_exact_after_rollout"] = torch.equal(model(ids).logits, forward_before)

    # One training step on the shards; the change check must see it on whole values.
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    DTensor.full_tensor = lambda self, *a, **k: gathers.append(1) or full_tensor(self, *a, **k)
    found["parameters"] = snapshot.compare(model)
    DTensor.full_tensor = full_tensor
    found["change_check_gathers"] = len(gathers)

    # Adapter gathered whole by Gazal's FSDP save_model, saved by rank 0, merged there from a fresh
    # base: its logits must be the trained sharded model's.
    model.eval()
    with torch.no_grad():
        trained_logits = model(ids).logits
    # The trainer's save_model as Gazal installs it under FSDP (every checkpoint and the final
    # adapter), on a stand-in trainer whose `_save` is transformers' for a PEFT model.
    adapter_dir, merged_dir = out.parent / "adapter", out.parent / "merged"
    trainer = SimpleNamespace(is_fsdp_enabled=True, model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                              args=SimpleNamespace(should_save=rank == 0, output_dir=str(adapter_dir)),
                              _save=lambda path, state_dict: model.save_pretrained(path, state_dict=state_dict))
    found["adapter_only_installed"] = adapter_only_fsdp_saves(trainer)
    gathered = []
    redistribute = DTensor.redistribute
    DTensor.redistribute = lambda self, *a, **k: gathered.append(1) or redistribute(self, *a, **k)
    trainer.save_model()
    DTensor.redistribute = redistribute
    # Only what trains is gathered; what accelerate's full state dict gathers, for comparison.
    found["save_gathers"], found["adapter_only_saves"] = len(gathered), trainer.adapter_only_saves
    found["full_state_dict_tensors"] = len(dict(model.named_parameters()))
    if rank == 0:
        saved = load_file(adapter_dir / "adapter_model.safetensors")
        found["saved_keys_match"] = sorted(saved) == sorted(initial_adapter)
        found["saved_shapes_match"] = all(saved[k].shape == initial_adapter[k].shape for k in saved)
        found["saved_nonempty"] = all(t.numel() > 0 for t in saved.values())
        found["saved_changed"] = sum(not torch.equal(saved[k], initial_adapter[k]) for k in saved)
        found["saved_tensors"] = len(saved)
        merge_saved_adapter(path, adapter_dir, merged_dir, "float32")
        merged = load_model(str(merged_dir)).eval()
        with torch.no_grad():
            found["merged_vs_trained_max_diff"] = float((merged(ids).logits - trained_logits).abs().max())
        out.write_text(json.dumps(found, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
