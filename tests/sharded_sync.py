"""Gazal's layer-wise vLLM sync on real sharded parameters: run by tests/test_vllm_sync.py under
`torchrun --nproc_per_node 2` (gloo, CPU), as `sharded_sync.py OUT.json zero3|fsdp2`.

The tiny PEFT DoRA model is built with the same seed on both ranks and an unsharded copy kept.

zero3: the model is partitioned by `deepspeed.initialize` with ZeRO-3 (persistence threshold 0:
every tensor partitioned, as in src/gazal/accelerate/deepspeed_zero3_cpu.json). Both ranks walk
`folded_tensors`; at every yield each rank records which parameters are gathered (ds_status
AVAILABLE). Then a `LayerwiseSync` in server mode runs with a recording client on rank 0 while
rank 1 only takes part in the gathers.

fsdp2: torch's `fully_shard` on each decoder layer and the root (as tests/sharded_fsdp2.py does);
both ranks walk `folded_tensors` and the shards must be left exactly as they were.

Rank 0 writes a JSON of findings to argv[1].
"""

import copy
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from peft import LoraConfig, get_peft_model

from gazal.models import TINY_QWEN3, load_model, resolve_model
from gazal.sharding import sharding_of
from gazal.vllm_sync import LayerwiseSync, folded_tensors, weight_metadata
from vllm_stubs import RecordingClient


def group_of(name: str) -> str:
    """The sync group of a parameter (PEFT name) or of a sent tensor (vLLM name)."""
    name = name.removeprefix("base_model.model.")
    layer = re.match(r"(model\.layers\.\d+)\.", name)
    return layer.group(1) if layer else name.rsplit(".", 1)[0]


def build():
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, use_rslora=True,
                     init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(load_model(resolve_model(TINY_QWEN3)), cfg)
    with torch.no_grad():  # magnitudes away from the base norms, so DoRA's rescaling matters
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    expected = {k: v.clone() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}
    return model, expected


def fsdp2(out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    model, expected = build()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    shards = {n: p.to_local().clone() for n, p in model.named_parameters()}
    sent: set[str] = set()
    metadata = weight_metadata(model, sent)
    first = {n: t.clone() for n, t in folded_tensors(model, frozen_sent=sent)}
    second = {n: t.clone() for n, t in folded_tensors(model, frozen_sent=sent)}
    found = {"sharding": sharding_of(model), "world": dist.get_world_size(),
             "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
             "shards_exact": all(torch.equal(p.to_local(), shards[n]) for n, p in model.named_parameters()),
             "names_match": set(first) == set(expected) - {"lm_head.weight"},
             "max_diff": max(float((first[n] - expected[n]).abs().max()) for n in first),
             "second_names": list(second),
             "metadata_matches": metadata == [(n, str(t.dtype).removeprefix("torch."), list(t.shape))
                                              for n, t in first.items()]}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(found, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def zero3(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model, expected = build()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ds_config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "train_micro_batch_size_per_gpu": 1}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config,
                                      optimizer=torch.optim.AdamW(trainable, lr=1e-3))
    params = dict(model.named_parameters())

    def available() -> list[str]:
        return [n for n, p in params.items() if p.ds_status == ZeroParamStatus.AVAILABLE]

    found: dict = {"sharding": sharding_of(model), "world": dist.get_world_size(),
                   "partitioned": all(p.numel() == 0 and p.ds_tensor.numel() < p.ds_numel for p in params.values()),
                   "available_before": available()}
    metadata = weight_metadata(model, set())
    found["available_after_metadata"] = available()

    def walk(frozen_sent: set[str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
        got, seen = {}, []
        for name, tensor in folded_tensors(model, frozen_sent=frozen_sent):
            got[name] = tensor.clone()
            live = available()
            seen.append({"name": name, "available": len(live),
                         "groups": sorted({group_of(n) for n in live}), "group": group_of(name),
                         "group_params": sum(group_of(n) == group_of(name) for n in params)})
        return got, seen

    sent: set[str] = set()
    first, first_seen = walk(sent)
    second, second_seen = walk(sent)
    found["available_after"] = available()
    found["first_names"], found["second_names"] = list(first), list(second)
    found["first_seen"], found["second_seen"] = first_seen, second_seen
    found["metadata_matches"] = metadata == [(n, str(t.dtype).removeprefix("torch."), list(t.shape))
                                             for n, t in first.items()]
    found["second_metadata_matches"] = weight_metadata(model, sent) == [
        (n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in second.items()]

    # The replacement for TRL's sync in server mode: rank 0 streams, rank 1 only gathers.
    client = RecordingClient() if rank == 0 else None
    gen = SimpleNamespace(mode="server", model=model, enable_sleep_mode=False,
                          accelerator=SimpleNamespace(is_main_process=rank == 0), vllm_client=client)
    sync = LayerwiseSync(gen)
    sync()
    sync()
    found["sync_tensors"] = sync.tensors_sent
    found["available_after_sync"] = available()

    found.update(merged_rollouts(engine, model, params))

    if rank == 0:
        names = set(expected) - {"lm_head.weight"}  # tied to the embeddings: vLLM loads it once
        found["expected_tied"] = torch.equal(expected["lm_head.weight"], expected["model.embed_tokens.weight"])
        found["names_match"] = set(first) == names and len(first) == len(names)
        found["max_diff"] = max(float((first[n] - expected[n]).abs().max()) for n in first)
        found["second_max_diff"] = max(float((second[n] - expected[n]).abs().max()) for n in second)
        base = {n.removeprefix("base_model.model.").replace(".base_layer", "") for n in params if "base_layer.weight" in n}
        found["second_is_adapted"] = set(second) == base
        found["client_resets"] = client.resets
        found["client_updates"] = len(client.updates)
        (md1, t1), (md2, t2) = client.updates
        found["client_first_names"] = [n for n, _ in t1]
        found["client_second_names"] = [n for n, _ in t2]
        found["client_metadata_matches"] = all(
            md == [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in ts] for md, ts in client.updates)
        found["client_max_diff"] = max(float((t - expected[n]).abs().max()) for n, t in t1 + t2)
        out.write_text(json.dumps(found, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def merged_rollouts(engine, model, params: dict) -> dict:
    """Merged rollouts inside TRL's own ZeRO-3 generation gather (GatheredParameters over every
    parameter, DeepSpeed's hooks removed, as trl.models.utils._unwrap_model_for_generation does),
    against the adapter on an unsharded copy."""
    from trl.models.utils import add_hooks, remove_hooks

    from gazal.adapters import MergedRollouts

    reference, _ = build()  # the same seed: the same adapter, unsharded
    reference.eval()
    model.eval()
    ids = torch.tensor([[9, 401, 11, 156, 323, 220, 66, 30, 198]]) % reference.config.vocab_size
    partitions = {n: p.ds_tensor.clone() for n, p in params.items()}
    bases = [n for n in params if "base_layer.weight" in n]
    rollouts, same_storage = MergedRollouts(), []
    with torch.no_grad():
        # One merged generation per gather, as TRL does it (the folds stay in the gathered buffers
        # until the gather ends).
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            remove_hooks(engine)
            gathered = {n: params[n].data_ptr() for n in bases}

            def generate(*args, **kwargs):
                # The folds sit in the gathered buffers themselves: no second copy of a weight.
                same_storage.append(all(params[n].data_ptr() == gathered[n] for n in bases))
                return model.generate(*args, **kwargs)

            tokens = rollouts.generate(model, generate, ids, max_new_tokens=10, do_sample=False)
            add_hooks(engine)
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            remove_hooks(engine)
            logits = rollouts.generate(model, lambda: model(ids).logits)
            add_hooks(engine)
        expected_tokens = reference.generate(ids, max_new_tokens=10, do_sample=False)
        expected_logits = reference(ids).logits
    return {"rollout_in_place": rollouts.in_place, "rollout_same_storage": same_storage,
            "rollout_tokens_equal": torch.equal(tokens, expected_tokens),
            "rollout_new_tokens": tokens.shape[1] - ids.shape[1],
            "rollout_logits_max_diff": float((logits - expected_logits).abs().max()),
            "partitions_exact_after_rollout": all(torch.equal(p.ds_tensor, partitions[n]) for n, p in params.items()),
            "partitioned_after_rollout": all(p.numel() == 0 for p in params.values())}


if __name__ == "__main__":
    {"zero3": zero3, "fsdp2": fsdp2}[sys.argv[2]](Path(sys.argv[1]))
