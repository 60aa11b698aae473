"""Weight sync from a PEFT LoRA/DoRA policy to vLLM, with one decoder layer whole at a time.

vLLM cannot serve DoRA adapters, so the policy's weights must reach it merged. TRL's
`VLLMGeneration.sync_weights` gathers every parameter at once for a PEFT model (ZeRO-3), merges the
adapter in place, streams the weights and unmerges: each rank holds the whole model, ~73 GiB for a
32B model. Here the model is walked in groups (each decoder layer; the embeddings, final norm and
head apart), only one group is gathered at a time, and each adapted weight is folded into a new
tensor exactly as PEFT's merge computes it; the parameters themselves are never written. Tensors
the adapter never changes (norms, embeddings, biases, linears it does not target) are sent once
per run, not at every sync.

Gathering is a collective (ZeRO-3's all-gather, FSDP2's `full_tensor`): every rank must iterate
`folded_tensors` to the end, in the same order, whether or not it sends anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from torch.distributed.tensor import DTensor

from gazal.adapters import fold
from gazal.sharding import is_zero3

log = logging.getLogger(__name__)


@dataclass
class _Out:
    """One tensor vLLM receives: a parameter as it is, or a base weight/bias with the adapter folded in."""

    name: str  # vLLM's name for it
    param: torch.nn.Parameter  # the tensor sent, or the base tensor the folded one replaces
    lora: LoraLinear | None = None  # the adapted layer folding into `param`, if any
    adapter: str | None = None

    @property
    def changes(self) -> bool:
        """Sent at every sync: folded weights and trained plain tensors (modules_to_save)."""
        return self.lora is not None or self.param.requires_grad

    def needs(self) -> list[torch.nn.Parameter]:
        """The parameters that must be whole to compute it."""
        if self.lora is None:
            return [self.param]
        a = self.adapter
        if self.param is not self.lora.get_base_layer().weight:  # a bias with lora_bias
            return [self.param, self.lora.lora_B[a].bias]
        need = [self.param, self.lora.lora_A[a].weight, self.lora.lora_B[a].weight]
        if self.lora.use_dora.get(a):
            need.append(self.lora.lora_magnitude_vector[a].weight)
        return need


def _active_adapter(module: LoraLayer) -> str | None:
    """The one active adapter of an adapted layer (None when it has none), or an error where the
    fold below would not compute what PEFT's merge computes."""
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return None
    if module.merged:
        # The base weight already holds the adapter: folding it again would add it twice.
        raise ValueError(f"{type(module).__name__}: adapter already merged into the base weight; unmerge it first")
    if len(active) > 1:
        raise NotImplementedError(f"layer-wise vLLM sync folds one active adapter per layer, found {active}")
    adapter = active[0]
    if not isinstance(module, LoraLinear):
        raise NotImplementedError(f"layer-wise vLLM sync folds LoRA/DoRA linears only, not {type(module).__name__}")
    if adapter in module.lora_variant and not module.use_dora.get(adapter):
        raise NotImplementedError(f"layer-wise vLLM sync: LoRA variant "
                                  f"{type(module.lora_variant[adapter]).__name__} is not supported")
    return adapter


def vllm_name(name: str, adapter: str = "default", prefix: str = "lora_") -> str | None:
    """vLLM's name for a PEFT model parameter, as TRL's `_iter_named_params` builds it; None for
    tensors vLLM does not have (adapter weights, the frozen original of a modules_to_save copy)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if prefix in name or "original_module" in name:
        return None
    if ".modules_to_save." in name:
        if f".modules_to_save.{adapter}." not in name:
            return None  # another adapter's trained copy
        name = name.replace(f"modules_to_save.{adapter}.", "")
    return name.replace("_checkpoint_wrapped_module.", "")


def _layers_path(model: torch.nn.Module) -> list[str]:
    """Attribute path to the decoder layers: the ModuleList named `layers` (Llama, Qwen, Mistral...),
    else the ModuleList holding the most parameters (GPT-2's `h`); [] when there is none."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)
             and len(module) and name]
    named = [name for name, _ in lists if name.rsplit(".", 1)[-1] == "layers"]
    if named:
        return named[0].split(".")
    if not lists:
        return []
    name, _ = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return name.split(".")


def _group_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, bool]]:
    """(prefix, module, recurse) per group, in `named_parameters` order: each decoder layer, and
    each other subtree beside the path down to the layers (embeddings, final norm, head)."""
    path = _layers_path(model)
    if not path:
        log.warning("layer-wise vLLM sync: no `layers` ModuleList found; the model is one group")
        return [("", model, True)]
    groups: list[tuple[str, torch.nn.Module, bool]] = []

    def walk(module: torch.nn.Module, prefix: str, depth: int) -> None:
        if any(True for _ in module.parameters(recurse=False)):
            groups.append((prefix, module, False))  # an ancestor's own parameters
        for name, child in module.named_children():
            child_prefix = f"{prefix}.{name}" if prefix else name
            if name != path[depth]:
                groups.append((child_prefix, child, True))
            elif depth == len(path) - 1:
                groups.extend((f"{child_prefix}.{i}", layer, True) for i, layer in child.named_children())
            else:
                walk(child, child_prefix, depth + 1)

    walk(model, "", 0)
    return groups


def _plan(model: torch.nn.Module, frozen_sent: set[str] | None) -> list[list[_Out]]:
    """What one sync sends, group by group; groups with nothing to send are left out."""
    adapter = getattr(model, "active_adapter", "default")
    adapter = adapter if isinstance(adapter, str) else adapter[0]
    prefix = getattr(model, "prefix", "lora_")
    seen: set[int] = set()  # tied weights: sent once, under their first name, as named_parameters does
    plan = []
    for group_prefix, module, recurse in _group_modules(model):
        folds: dict[int, tuple[LoraLinear, str]] = {}
        for sub in (module.modules() if recurse else [module]):
            if isinstance(sub, LoraLayer) and (a := _active_adapter(sub)) is not None:
                base = sub.get_base_layer()
                folds[id(base.weight)] = (sub, a)
                if sub.lora_bias.get(a):
                    folds[id(base.bias)] = (sub, a)
        outs = []
        for pname, param in module.named_parameters(prefix=group_prefix, recurse=recurse, remove_duplicate=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = vllm_name(pname, adapter, prefix)
            if name is None:
                continue
            lora, a = folds.get(id(param), (None, None))
            out = _Out(name, param, lora, a)
            if out.changes or frozen_sent is None or name not in frozen_sent:
                outs.append(out)
        if outs:
            plan.append(outs)
    return plan


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _global_shape(param: torch.Tensor) -> list[int]:
    """The whole tensor's shape without gathering it (ZeRO-3 keeps it in ds_shape; a DTensor's
    shape is already global)."""
    return list(param.ds_shape) if is_zero3(param) else list(param.shape)


def weight_metadata(model: torch.nn.Module, frozen_sent: set[str] | None = None) -> list[tuple[str, str, list[int]]]:
    """(name, vLLM dtype string, shape) for every tensor `folded_tensors(model, frozen_sent=...)`
    will yield with the same `frozen_sent`, in the same order; gathers nothing, changes nothing."""
    return [(out.name, _dtype_name(out.param.dtype), _global_shape(out.param))
            for group in _plan(model, frozen_sent) for out in group]


def _whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value once its group is gathered (a collective for a DTensor)."""
    if isinstance(param, DTensor):
        if param.device.type == "cpu" and torch.cuda.is_available():
            param = param.to("cuda")  # CPU-offloaded shards: NCCL gathers on the GPU, as TRL does
        return param.full_tensor().detach()
    if is_zero3(param):
        return param.data  # whole inside GatheredParameters
    return param.detach()


@contextmanager
def _gathered(params: list[torch.nn.Parameter]) -> Iterator[dict[int, torch.Tensor]]:
    """Whole values of one group's parameters (by id), released on exit."""
    zero = [p for p in params if is_zero3(p)]
    if zero:
        import deepspeed

        # modifier_rank=None: nothing is written, so nothing is broadcast back on exit.
        with deepspeed.zero.GatheredParameters(zero, modifier_rank=None):
            yield {id(p): _whole(p) for p in params}
    else:
        yield {id(p): _whole(p) for p in params}


@torch.no_grad()
def _fold(out: _Out, whole: dict[int, torch.Tensor]) -> torch.Tensor:
    """The base weight (or bias) with the adapter merged, as PEFT's `Linear.merge` and
    `DoraLinearVariant.merge_*` compute it, in float32, cast to the base tensor's dtype."""
    module, a = out.lora, out.adapter
    base = whole[id(out.param)]
    scaling = module.scaling[a]
    if out.param is not module.get_base_layer().weight:  # lora_bias: b + scaling * lora_B.bias
        return (base.float() + whole[id(module.lora_B[a].bias)].float() * scaling).to(base.dtype)
    magnitude = whole[id(module.lora_magnitude_vector[a].weight)] if module.use_dora.get(a) else None
    return fold(base, whole[id(module.lora_A[a].weight)], whole[id(module.lora_B[a].weight)], scaling, magnitude,
                module.fan_in_fan_out)


def folded_tensors(model: torch.nn.Module, *, frozen_sent: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(vLLM name, whole tensor) for the PEFT model with its adapter folded in, one group gathered at a time.

    Adapted weights are folded into new tensors (the model is never written). Frozen tensors the
    adapter does not change are yielded only when their name is not in `frozen_sent`, and added
    to it once the consumer has taken them, so a set kept across syncs sends each once per run.
    Names follow TRL's `_iter_named_params` (what vLLM's `load_weights` expects).

    A yielded tensor is valid when yielded: the consumer must copy or send it before advancing,
    as the group it came from is released when the walk moves on (under ZeRO-3 and FSDP2 it is
    the gathered copy). Gathering is a collective: every rank iterates to the end, in step.
    """
    for group in _plan(model, frozen_sent):
        need: dict[int, torch.nn.Parameter] = {}
        for out in group:
            for p in out.needs():
                need.setdefault(id(p), p)
        with _gathered(list(need.values())) as whole:
            for out in group:
                tensor = _fold(out, whole) if out.lora is not None else whole[id(out.param)]
                yield out.name, tensor
                del tensor  # not kept alive while the next one is computed
                if frozen_sent is not None and not out.changes:
                    frozen_sent.add(out.name)
            del whole


class LayerwiseSync:
    """Replaces `VLLMGeneration.sync_weights` (`gen.sync_weights = LayerwiseSync(gen)`) for a PEFT policy.

    Server mode: the main process streams through `vllm_client.update_named_params`, the other
    ranks walk the model with it (they take part in the gathers). Colocate mode: every rank loads
    each tensor into its own vLLM engine. Frozen tensors go once per run, except after a level-2
    sleep (colocate sleep mode), which discards every weight; should the vLLM server restart, clear
    `frozen_sent` so they go again. Counts for logs and tests: `syncs`,
    `tensors_sent`, `bytes_sent` (all syncs) and `seconds` (the last one).
    """

    def __init__(self, gen) -> None:
        self.gen = gen
        self.frozen_sent: set[str] = set()
        self.syncs = 0
        self.tensors_sent = 0
        self.bytes_sent = 0
        self.seconds = 0.0

    def summary(self) -> dict[str, float]:
        """What the run's syncs sent, for the stage's summary.json."""
        return {"syncs": self.syncs, "tensors_sent": self.tensors_sent,
                "mib_sent": round(self.bytes_sent / 2**20, 1), "last_seconds": round(self.seconds, 3)}

    def _counted(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            self.tensors_sent += 1
            self.bytes_sent += tensor.numel() * tensor.element_size()
            yield name, tensor

    def __call__(self) -> None:
        gen = self.gen
        start, tensors_before, bytes_before = time.perf_counter(), self.tensors_sent, self.bytes_sent
        if gen.mode == "colocate" and gen.enable_sleep_mode:
            # As TRL does: map the weights' memory before loading into it.
            from trl.generation.vllm_generation import empty_cache

            empty_cache()
            gen.llm.wake_up(tags=["weights"])
            gen._llm_weights_sleeping = False
            # Sleep level 2 discarded every weight, frozen ones included: all must go again.
            self.frozen_sent.clear()
        model = gen.model
        if gen.mode == "server":
            main = gen.accelerator.is_main_process
            # The server must be told every tensor before the first is broadcast; computed before
            # the walk starts (it changes frozen_sent), without gathering anything.
            metadata = weight_metadata(model, self.frozen_sent) if main else None
            tensors = self._counted(folded_tensors(model, frozen_sent=self.frozen_sent))
            if main:
                gen.vllm_client.update_named_params(metadata, tensors)
            else:
                for _ in tensors:  # take part in the gathers
                    pass
            if main:
                gen.vllm_client.reset_prefix_cache()
        elif gen.mode == "colocate":
            target = gen.llm.llm_engine.model_executor.driver_worker.model_runner.model
            for name, tensor in self._counted(folded_tensors(model, frozen_sent=self.frozen_sent)):
                target.load_weights([(name, tensor)])
            gen.llm.reset_prefix_cache()
        else:
            raise ValueError(f"vllm_mode must be 'server' or 'colocate', got {gen.mode!r}")
        self.syncs += 1
        self.seconds = time.perf_counter() - start
        log.info("vLLM weight sync %d (layer-wise): %d tensors, %.1f MiB in %.2f s", self.syncs,
                 self.tensors_sent - tensors_before, (self.bytes_sent - bytes_before) / 2**20, self.seconds)


def install(trainer) -> LayerwiseSync | None:
    """Put a `LayerwiseSync` in place of the trainer's vLLM weight sync when it generates with
    vLLM from a PEFT model; returns it, or None when nothing was installed."""
    gen = getattr(trainer, "vllm_generation", None)
    if not getattr(trainer, "use_vllm", False) or gen is None:
        return None
    if not isinstance(trainer.accelerator.unwrap_model(trainer.model), PeftModel):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in gen.model.modules()):
        # FSDP1 flattens parameters, so the walk by name cannot find them; TRL's own sync stays.
        log.warning("layer-wise vLLM sync: FSDP1 model, keeping TRL's weight sync")
        return None
    sync = LayerwiseSync(gen)
    gen.sync_weights = sync  # an instance attribute: TRL's generate() calls self.sync_weights() too
    log.info("vLLM weight sync: layer-wise, adapter folded per layer, frozen tensors sent once")
    return sync
