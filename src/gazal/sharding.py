"""Whole values of sharded parameters: DeepSpeed ZeRO-3 partitions and FSDP2 DTensor shards.

Under ZeRO-3 a parameter outside a gather is an empty placeholder whose slice lives in
`param.ds_tensor`; under FSDP2 (`fully_shard`) it is a DTensor holding one shard per rank. Code
that reads or rewrites whole weights (the adapter merge for rollouts, the change check, saving)
must go through these helpers, and every one of them is a collective: all ranks call it, in the
same order. A plain (or DDP) parameter passes through untouched.

The kind of sharding is read off the parameters themselves rather than the accelerator, so the
same code serves the trainers and `fully_shard` applied directly (the CPU tests).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


def is_zero3(param: torch.Tensor) -> bool:
    """A ZeRO-3 partitioned parameter (DeepSpeed tags each with a ds_id)."""
    return hasattr(param, "ds_id")


def sharding_of(model: torch.nn.Module) -> str:
    """'zero3', 'fsdp2' or 'none', from the model's parameters."""
    for p in model.parameters():
        if is_zero3(p):
            return "zero3"
        if isinstance(p, DTensor):
            return "fsdp2"
    return "none"


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole value of one parameter, detached (a copy when it had to be gathered)."""
    if isinstance(param, DTensor):
        return param.full_tensor().detach()
    if is_zero3(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().clone()
    return param.detach()


def full_named_tensors(model: torch.nn.Module, trainable: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole value) for every parameter, one at a time so only one is ever gathered.

    trainable=True / False keeps only parameters that do / do not require grad.
    """
    for name, param in model.named_parameters():
        if trainable is None or param.requires_grad == trainable:
            yield name, full_tensor(param)


def fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def fsdp2_unsharded(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2: every FSDP unit of the model unsharded for the whole block, and kept unsharded
    across the forwards inside it (generation runs hundreds); resharded after.

    Unsharded parameters live in FSDP's all-gather buffers, separate from the shards, and reshard
    frees them without writing back: in-place changes made inside (a merged adapter) are dropped
    and the shards stay bit-exact. Holds the whole model on each rank while inside, as TRL's own
    ZeRO-3 generation gather does.
    """
    modules = fsdp2_modules(model)
    # Whether each unit reshards after forward lives only in FSDP's private state; it is read and
    # restored exactly (the root unit is kept unsharded by default, other units are not).
    # tests/test_sharding.py runs this on real fully_shard units and fails if these names move.
    saved = []
    for m in modules:
        state = m._get_fsdp_state()
        saved.append((state, state._auto_reshard_after_forward,
                      [g.post_forward_mesh_info for g in state._fsdp_param_groups]))
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
        for state, auto, infos in saved:
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos):
                group.post_forward_mesh_info = info


@contextmanager
def unsharded_loading() -> Iterator[None]:
    """`from_pretrained` inside loads an ordinary whole model in this process alone.

    Once training arguments exist under ZeRO-3, transformers builds every model inside
    `deepspeed.zero.Init` (a collective that partitions it), and under FSDP with CPU-RAM-efficient
    loading it gives ranks other than 0 empty weights. Neither is wanted for the merged model that
    the main process builds from a saved adapter.
    """
    import os

    import transformers.integrations.deepspeed as hf_deepspeed

    # transformers keeps the active DeepSpeed config behind a private weak reference; it is
    # put back exactly as it was (tests/test_sharding.py checks a model loads whole inside).
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    efficient = os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref
        if efficient is not None:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = efficient
