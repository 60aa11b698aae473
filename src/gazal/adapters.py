"""PEFT adapters: the recipe's DoRA/rsLoRA settings, a check of what training changed, and saving."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch.distributed.tensor import DTensor

from gazal.config import LoraSettings
from gazal.sharding import fsdp2_unsharded, full_tensor, is_zero3, sharding_of, unsharded_loading

log = logging.getLogger(__name__)


def lora_config(settings: LoraSettings) -> LoraConfig:
    """PEFT LoraConfig from the recipe (DoRA and rsLoRA are PEFT flags, not Gazal code)."""
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
    )


class ParamSnapshot:
    """Remembers what each process holds of every parameter, to prove what training changed.

    Works on the local shards, never on whole values: under ZeRO-3 a process keeps its partition
    (`ds_tensor`), under FSDP2 its DTensor shard, otherwise the tensor itself. Trainable shards are
    copied exactly to the CPU (each process a 1/N share of the adapter, one adapter across the job,
    instead of a whole copy on every rank); frozen shards are remembered by an exact integer
    checksum of their bits, computed in chunks on their own device (no float64 copy of a whole
    tensor: for a 32B model's embedding that was ~12 GB on the GPU). `compare` finds the changes
    shard by shard and combines them with one all-reduce, so it costs no gather at all.
    """

    def __init__(self, model: torch.nn.Module):
        self.trainable = {n: _local(p).to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        self.frozen = {n: _bits_checksum(_local(p)) for n, p in model.named_parameters() if not p.requires_grad}
        self.numel = {n: _global_numel(p) for n, p in model.named_parameters() if p.requires_grad}

    def compare(self, model: torch.nn.Module) -> dict[str, int]:
        """Counts of trainable tensors that changed and frozen tensors that changed (should be 0)."""
        params = dict(model.named_parameters())
        flags = [not torch.equal(_local(params[n]).cpu(), ref) for n, ref in self.trainable.items()]
        flags += [_bits_checksum(_local(params[n])) != ref for n, ref in self.frozen.items()]
        changed = torch.tensor(flags, dtype=torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # A tensor changed if any process's shard did. NCCL reduces CUDA tensors only.
            device = (torch.device("cuda", torch.cuda.current_device())
                      if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))
            changed = changed.to(device)
            torch.distributed.all_reduce(changed, op=torch.distributed.ReduceOp.MAX)
            changed = changed.cpu()
        k = len(self.trainable)
        return {
            "trainable_tensors": k,
            "trainable_tensors_changed": int(changed[:k].sum()),
            "trainable_parameters": sum(self.numel.values()),
            "frozen_tensors": len(self.frozen),
            "frozen_tensors_changed": int(changed[k:].sum()),
        }


def _local(param: torch.Tensor) -> torch.Tensor:
    """What this process holds of a parameter: its ZeRO-3 partition, its FSDP2 shard, or itself."""
    if is_zero3(param):
        return param.ds_tensor.detach()
    if isinstance(param, DTensor):
        return param.to_local().detach()
    return param.detach()


def _global_numel(param: torch.Tensor) -> int:
    return param.ds_numel if is_zero3(param) else param.numel()


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22


def _bits_checksum(t: torch.Tensor) -> int:
    """An exact checksum of a tensor's bits: sum of each element's bit pattern times a weight that
    depends on its position. Integer arithmetic, so nothing rounds: one changed bit changes it, and
    so does a permutation (a sum and sum of squares would miss rows swapped). int64 wraps around
    deterministically on overflow. Chunked, so the transient is 2 x 32 MiB whatever the tensor."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    ints = flat.view(_INT_OF_SIZE[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, ints.numel(), _CHUNK):
        chunk = ints[start:start + _CHUNK].to(torch.int64)
        weight = torch.arange(start, start + chunk.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
        total += (chunk * weight).sum()
    return int(total)


def upcast_dora_magnitudes(model: torch.nn.Module) -> int:
    """Keep DoRA magnitude vectors in float32 whatever the model's dtype; returns how many were cast.

    A magnitude is ~1 per feature while its updates are ~lr * grad: in bfloat16 (8 bits of mantissa)
    they round away and the vector silently stops learning (TRL #7268). PEFT autocasts adapters to
    float32 by default, but TRL turns that off under ZeRO-3 and casts adapters for quantised bases,
    so the guarantee is enforced here after the trainer has built the model. Under ZeRO-3 the
    optimizer keeps float32 master weights, which protects the updates the same way.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        # TRL keeps ZeRO-3 adapters in the base dtype on purpose (autocast_adapter_dtype=False):
        # DeepSpeed gathers persistent parameters in the first one's dtype, and mixed dtypes fail
        # (TRL #6089). DeepSpeed's float32 master weights keep the updates instead.
        log.info("ZeRO-3: DoRA magnitudes stay in the model dtype; DeepSpeed's float32 master weights keep their updates")
        return 0
    cast = 0
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    if cast:
        log.info("kept %d DoRA magnitude vectors in float32", cast)
    return cast


def drop_inert_dropout(model: torch.nn.Module) -> int:
    """Replace adapter dropout layers whose rate is 0 by `nn.Identity`; returns how many were replaced.

    PEFT's DoRA forward, in training mode, treats any `nn.Dropout` in `lora_dropout` as live: it
    recomputes the base projection on the dropped-out input instead of reusing the one already
    computed, so every base matmul runs twice in the forward and in the backward, and keeps both
    inputs for the backward. TRL's `disable_dropout` sets the rates to 0 but keeps the modules,
    which is exactly that case; with `nn.Identity` PEFT takes its single-projection path, which
    computes the same values (bench/grpo_memory.py, column "+ no inert dropout").
    """
    replaced = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, layer in module.lora_dropout.items():
                if isinstance(layer, torch.nn.Dropout) and layer.p == 0:
                    module.lora_dropout[name] = torch.nn.Identity()
                    replaced += 1
    if replaced:
        log.info("replaced %d zero-rate adapter dropout layers by identities (one base projection per DoRA layer)",
                 replaced)
    return replaced


def model_card(summary: dict, adapter: bool) -> str:
    """A Hugging Face model card (README.md) for a saved adapter or merged model."""
    base = summary.get("base_model", "")
    lines = ["---", f"base_model: {base}" if not base.startswith(("/", ".")) else "base_model: null",
             *(["library_name: peft"] if adapter else []),
             "tags: [gazal, medical, reasoning, dora, rslora]", "---", "",
             f"# {'DoRA + rsLoRA adapter' if adapter else 'Merged model'} trained with Gazal", "",
             f"Started from `{base}`. Trained by Gazal's recipe (the resolved recipe is `recipe.yaml` in the "
             "stage folder of the run directory).", "",
             "| field | value |", "|---|---|"]
    for key in ("examples", "validation_examples", "dropped_overlong", "questions", "steps", "train_loss",
                "eval_loss", "seconds", "resumed_from"):
        if summary.get(key) is not None:
            lines.append(f"| {key} | {summary[key]} |")
    lines += ["", "Reasoning is written inside `<think>...</think>`, then the final answer.", ""]
    return "\n".join(lines)


def save_adapter_and_merged(trainer, tokenizer, folder: Path, base: str, dtype: str,
                            summary: dict | None = None, trust_remote_code: bool = False) -> None:
    """Save the trained adapter to folder/adapter and the merged model to folder/merged, with model cards.

    Every process must call this. The adapter is gathered by the trainer's own `save_model` (whole
    tensors under ZeRO-3 and FSDP, written by the main process). The merged model is then built on
    the main process only, from the saved adapter and a freshly loaded copy of `base` on the CPU,
    never from the (possibly sharded) training modules.
    """
    adapter_dir, merged_dir = folder / "adapter", folder / "merged"
    trainer.save_model(str(adapter_dir))
    if not trainer.accelerator.is_main_process:
        return
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # the resolved recipe is the record
    tokenizer.save_pretrained(adapter_dir)
    merge_saved_adapter(base, adapter_dir, merged_dir, dtype, trust_remote_code)
    tokenizer.save_pretrained(merged_dir)
    if summary is not None:
        (adapter_dir / "README.md").write_text(model_card(summary, adapter=True), encoding="utf-8")
        (merged_dir / "README.md").write_text(model_card(summary, adapter=False), encoding="utf-8")
    log.info("saved adapter and merged model under %s", folder)


def fsdp2_adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of an FSDP2 model, each gathered whole in turn onto rank 0's CPU
    (other ranks get an empty dict). A collective: every rank calls it.

    transformers' `Trainer.save_model` under FSDP gathers the whole model's full state dict, frozen
    base included (~61 GiB of host memory on rank 0 for Qwen3-32B, at every checkpoint), and PEFT
    keeps only the adapter from it. Written here rather than with torch's `get_model_state_dict(...,
    ignore_frozen_params=True)` because that still gathers a tied weight's second name (a tied
    embedding, vocabulary x hidden) before PEFT drops it.
    """
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = full_tensor(param)
            if main:
                out[name] = whole.to("cpu", copy=True)
            del whole
    return out


def merge_saved_adapter(base: str, adapter_dir: Path, out: Path, dtype: str, trust_remote_code: bool = False) -> None:
    """Load `base` on the CPU (never sharded, whatever the launcher set up), apply the saved
    adapter, merge it into the weights and save the plain model to `out`."""
    from gazal.models import load_model

    with unsharded_loading():
        model = load_model(base, dtype, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)


class MergedRollouts:
    """Generation on merged weights for a PEFT model, whatever holds its parameters.

    Call `generate(model, generate_fn, ...)` from inside the gather a trainer already does for
    generation. Each adapted base weight is replaced by its folded value (`fold`) while the adapter
    layers are switched off, so the forward is the plain model's on merged weights:

    - ZeRO-3: the parameters must already be gathered whole (TRL's `unwrap_model_for_generation`
      does it). The fold is written into the gathered buffers in place, one layer at a time:
      DeepSpeed drops them on exit (TRL gathers without a modifier rank, so nothing is written
      back), the partitions are untouched, and no second copy of the weights ever exists. The
      buffers hold the folded weights until the gather ends, so one merged generation per
      gather, as TRL's `_generate_single_turn` does it.
      Persistent parameters (below DeepSpeed's persistence threshold) are not gathered copies,
      so they take the path for plain parameters.
    - FSDP2: every unit is unsharded for the whole generation (see `fsdp2_unsharded`) and the fold
      is written into the all-gather buffers in place; reshard frees them without writing back.
    - plain or DDP parameters: each folded weight is a new tensor and the original is put back
      afterwards (exact; the originals are never written). The folded tensors are the one extra
      copy, alive for the generation only.
    Where the weights are not whole (ZeRO-3 with TRL's gather turned off) the adapter is used as it
    is, and one log line says so. `calls` counts merged generations, `in_place` the weights last
    merged in place, for tests and logs.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.in_place = 0
        self._warned = False

    def generate(self, model: PeftModel, generate, *args, **kwargs):
        kind = sharding_of(model)
        if kind == "zero3" and not _zero3_available(model):
            if not self._warned:
                log.warning("merged rollouts: ZeRO-3 weights are not gathered for generation "
                            "(grpo ds3_gather_for_generation is off); generating through the adapter, "
                            "which is several times slower for DoRA")
                self._warned = True
            return generate(*args, **kwargs)
        self.calls += 1
        stats: dict[str, int] = {}
        try:
            if kind == "fsdp2":
                with fsdp2_unsharded(model), _merged(model, discarded=True, stats=stats):
                    return generate(*args, **kwargs)
            with _merged(model, discarded=kind == "zero3", stats=stats):
                return generate(*args, **kwargs)
        finally:
            self.in_place = stats.get("in_place", 0)


def _zero3_available(model: torch.nn.Module) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return all(p.ds_status == ZeroParamStatus.AVAILABLE for p in model.parameters() if is_zero3(p))


def _adapted(model: torch.nn.Module) -> list[tuple[LoraLayer, str]]:
    """(layer, adapter) for every LoRA linear with an active adapter to fold."""
    found = []
    for m in model.modules():
        if isinstance(m, LoraLayer) and not m.disable_adapters:
            active = [a for a in m.active_adapters if a in m.lora_A]
            if len(active) > 1:
                raise ValueError("merged rollouts fold one active adapter per layer")
            found += [(m, a) for a in active]
    return found


@torch.no_grad()
def fold(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
         magnitude: torch.Tensor | None = None, fan_in_fan_out: bool = False) -> torch.Tensor:
    """A base weight with its LoRA (and DoRA) adapter merged, as PEFT's `Linear.merge` and
    `DoraLinearVariant.merge_*` compute it, in float32 and cast to the base's dtype.

    Written here rather than calling PEFT's merge because PEFT merges every layer of the model
    into new tensors at once (a second copy of the adapted weights) and reads weights that may be
    sharded; this computes one weight from whole tensors the caller already holds.
    """
    # (out, in) layout throughout, as nn.Linear stores it; fan_in_fan_out bases (Conv1D) are (in, out).
    # Built in place in one float32 buffer: (B @ A) * scaling + W is PEFT's W + delta.
    weight = (lora_b.float() @ lora_a.float()).mul_(scaling)
    weight += base.T if fan_in_fan_out else base
    if magnitude is not None:
        # DoRA: magnitude / ||W + scaling B A|| per output row, the norm a constant (PEFT detaches it).
        weight *= (magnitude.float() / torch.linalg.norm(weight, dim=1)).view(-1, 1)
    if fan_in_fan_out:
        weight = weight.T.contiguous()
    return weight.to(base.dtype)


def fold_layer(module: LoraLayer, adapter: str) -> torch.Tensor:
    """`fold` for a LoRA layer whose parameters are whole where they are (gathered or plain)."""
    return fold(module.get_base_layer().weight, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                module.scaling[adapter],
                module.lora_magnitude_vector[adapter].weight if module.use_dora.get(adapter) else None,
                module.fan_in_fan_out)


@contextmanager
def _merged(model: PeftModel, discarded: bool = False, stats: dict[str, int] | None = None) -> Iterator[PeftModel]:
    """The adapter folded into the base weights, and switched off, for the block.

    discarded: the base weights are gathered copies thrown away after the block (ZeRO-3 inside
    TRL's gather, FSDP2 unsharded), so folds are written into them in place and nothing is put
    back. Otherwise each folded weight is a new tensor and the originals are put back afterwards:
    exact, as they are never written, and needed under FSDP2 too, where a replaced parameter
    would stay allocated through every later reshard. ZeRO-3 persistent parameters are real
    storage, not copies, so they always take the second path. stats["in_place"]: the weights
    folded in place.
    """
    restore: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    in_place = 0
    with torch.no_grad():
        for module, adapter in _adapted(model):
            w = module.get_base_layer().weight
            if lora_bias := module.lora_bias.get(adapter, False):
                raise ValueError(f"merged rollouts do not fold lora_bias ({lora_bias})")
            folded = fold_layer(module, adapter)
            if discarded and not getattr(w, "ds_persist", False):
                w.data.copy_(folded)
                in_place += 1
            else:
                restore.append((w, w.data))
                w.data = folded
            del folded  # one layer's fold alive at a time on the in-place path
    if stats is not None:
        stats["in_place"] = in_place
    try:
        with model.disable_adapter():  # the plain forward, on the folded weights
            yield model
    finally:
        with torch.no_grad():
            for w, t in restore:
                w.data = t
