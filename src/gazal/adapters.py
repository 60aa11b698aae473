"""PEFT adapters: the recipe's DoRA/rsLoRA settings, a check of what training changed, and saving."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer

from gazal.config import LoraSettings

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
    """Remembers trainable tensors exactly and frozen tensors by checksum, to prove what changed.

    Checksums (float64 sum and sum of squares) keep this cheap for large frozen bases.
    """

    def __init__(self, model: torch.nn.Module):
        self.trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.frozen = {n: self._checksum(p) for n, p in model.named_parameters() if not p.requires_grad}

    @staticmethod
    def _checksum(p: torch.Tensor) -> tuple[float, float]:
        x = p.detach().to(torch.float64)
        return float(x.sum()), float((x * x).sum())

    def compare(self, model: torch.nn.Module) -> dict[str, int]:
        """Counts of trainable tensors that changed and frozen tensors that changed (should be 0)."""
        params = dict(model.named_parameters())
        changed = sum(not torch.equal(params[n].detach(), before) for n, before in self.trainable.items())
        frozen_changed = sum(self._checksum(params[n]) != before for n, before in self.frozen.items())
        return {
            "trainable_tensors": len(self.trainable),
            "trainable_tensors_changed": changed,
            "trainable_parameters": sum(t.numel() for t in self.trainable.values()),
            "frozen_tensors": len(self.frozen),
            "frozen_tensors_changed": frozen_changed,
        }


def upcast_dora_magnitudes(model: torch.nn.Module) -> int:
    """Keep DoRA magnitude vectors in float32 whatever the model's dtype; returns how many were cast.

    A magnitude is ~1 per feature while its updates are ~lr * grad: in bfloat16 (8 bits of mantissa)
    they round away and the vector silently stops learning (TRL #7268). PEFT autocasts adapters to
    float32 by default, but TRL turns that off under ZeRO-3 and casts adapters for quantised bases,
    so the guarantee is enforced here after the trainer has built the model. Under ZeRO-3 the
    optimizer keeps float32 master weights, which protects the updates the same way.
    """
    cast = 0
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    if cast:
        log.info("kept %d DoRA magnitude vectors in float32", cast)
    return cast


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


def save_adapter_and_merged(model, tokenizer, folder: Path, summary: dict | None = None) -> None:
    """Save the adapter to folder/adapter and the merged model to folder/merged, each with a model card."""
    model.save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(folder / "merged")
    tokenizer.save_pretrained(folder / "merged")
    if summary is not None:
        (folder / "adapter" / "README.md").write_text(model_card(summary, adapter=True), encoding="utf-8")
        (folder / "merged" / "README.md").write_text(model_card(summary, adapter=False), encoding="utf-8")
    log.info("saved adapter and merged model under %s", folder)


@contextmanager
def merged_adapter(model: PeftModel) -> Iterator[PeftModel]:
    """Run the block with the adapter merged into the base weights (plain-model speed).

    On exit the adapter is unmerged and the base weights are restored from an exact copy, so
    merge/unmerge round-off never accumulates in frozen weights however many times this runs.
    Costs one copy of the adapted weights while inside.
    """
    bases = [m.base_layer.weight for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [w.detach().clone() for w in bases]
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for w, original in zip(bases, saved):
                w.copy_(original)
