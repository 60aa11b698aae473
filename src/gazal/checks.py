"""Recipe checks that need the training libraries (TRL's dataclasses), run by `gazal validate` and
before every stage: a key TRL would refuse, or that Gazal already sets, stops here, not at the
first training step. Kept apart from `config` (the schema), which imports no training code."""

from __future__ import annotations

import logging
from pathlib import Path

from gazal.config import Recipe
from gazal.errors import GazalError
from gazal.models import OWN_MODEL_KWARGS

log = logging.getLogger(__name__)


def check_passthrough(recipe: Recipe) -> None:
    """`sft.trl`, `grpo.trl` and `model.kwargs` entries, and optional packages the recipe asks for;
    raises GazalError naming the key."""
    import importlib.util

    import torch

    wanted = [("sft.use_liger_kernel", recipe.sft.enabled and recipe.sft.use_liger_kernel, "liger_kernel"),
              ("grpo.use_vllm", recipe.grpo.enabled and recipe.grpo.use_vllm, "vllm"),
              ("eval.backend", recipe.eval.enabled and recipe.eval.backend == "vllm", "vllm")]
    for key, used, package in wanted:
        if used and importlib.util.find_spec(package) is None:
            message = f"{key}: needs the {package} package (pip install 'gazal[gpu]', on a CUDA machine)"
            if torch.cuda.is_available():
                raise GazalError(message)
            # Checking a GPU recipe on a laptop before launching it elsewhere is legitimate.
            log.warning("%s; not installed here (no GPU), so only the rest of the recipe is checked", message)
    for key in recipe.model.kwargs:
        if key in OWN_MODEL_KWARGS:
            raise GazalError(f"model.kwargs.{key}: set {OWN_MODEL_KWARGS[key]} instead")
    if recipe.sft.trl:
        from trl import SFTConfig

        from gazal import sft
        from gazal.training import check_trl_fields, own_fields

        managed = sft.config_kwargs(recipe, Path("checks"), validation=True)
        check_trl_fields(SFTConfig, "sft", own_fields("sft", managed), recipe.sft.trl)
    if recipe.grpo.trl:
        from trl import GRPOConfig

        from gazal import grpo
        from gazal.training import check_trl_fields, own_fields

        managed = grpo.config_kwargs(recipe, Path("checks"))
        check_trl_fields(GRPOConfig, "grpo", own_fields("grpo", managed), recipe.grpo.trl)
