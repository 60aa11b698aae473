"""Recipes from YAML: find a shipped or local recipe, apply dotted overrides, validate it against
the schema (`gazal.config`), then check what the schema cannot see (files and folders, installed
packages, reward parameters, the batch arithmetic of this launch, and TRL's own dataclasses for the
`trl:` passthrough). Every refusal names the key, and the file and line where it is written.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gazal import pubmedqa
from gazal.config import TRACKER_PACKAGES, Recipe
from gazal.errors import GazalError, RecipeError

log = logging.getLogger(__name__)


def _where(key: tuple[str, ...], source: str, lines: dict[tuple[str, ...], int]) -> str:
    """file:line of the nearest written key: 'data.sft.0' written as a bare string sits on 'data.sft'."""
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            return f"{source}:{lines[key[:n]]}"
    return source


def shipped_recipes() -> dict[str, Path]:
    """Names of the recipes shipped inside the package, mapped to their files."""
    folder = resources.files("gazal") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_recipe_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped recipe such as 'demo'."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise GazalError(f"{name_or_path}: recipe file not found")
        return path
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise GazalError(
        f"{name_or_path}: no such recipe file, and not a shipped recipe (shipped: {', '.join(sorted(shipped))})"
    )


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each dotted key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (str(key.value),)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                lines[path + (str(i),)] = value.start_mark.line + 1
                walk(value, path + (str(i),))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one 'dotted.key=value' override; the value is parsed as YAML (1e-4, true, [a, b])."""
    if "=" not in override:
        raise GazalError(f"override {override!r}: expected dotted.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise GazalError(f"override {override!r}: value is not valid YAML ({exc})") from None
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise GazalError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise GazalError(f"override {override!r}: {'.'.join(parts[:-1])} is not a section")


def _describe(exc: ValidationError, source: str, lines: dict[tuple[str, ...], int]) -> str:
    out = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc)
        where = f"{source}:{lines[loc]}" if loc in lines else source
        if err["type"] == "extra_forbidden":
            model: Any = Recipe
            for part in loc[:-1]:
                field = model.model_fields.get(part) if isinstance(model, type) else None
                ann = field.annotation if field else None
                model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if model is None:
                    break
            hint = ""
            if model is not None:
                close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
                hint = f" (did you mean '{'.'.join(loc[:-1] + (close[0],))}'?)" if close else ""
            out.append(f"{where}: unknown key '{key}'{hint}")
        else:
            out.append(f"{where}: {key}: {err['msg']} (got {err.get('input')!r})")
    return "invalid recipe:\n  " + "\n  ".join(out)


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe, applying dotted overrides; raises GazalError naming the key."""
    path = resolve_recipe_path(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise GazalError(f"{where}: broken YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GazalError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    for override in overrides or []:
        apply_override(data, override)
        # An overridden key's problem is on the command line, not on its line in the file.
        key = tuple(override.split("=", 1)[0].strip().split("."))
        lines = {k: v for k, v in lines.items() if k[: len(key)] != key}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise GazalError(_describe(exc, str(path), lines)) from None
    except RecipeError as exc:  # a validator's cross-key check
        raise GazalError(f"{_where(exc.key, str(path), lines)}: {exc}") from None
    check(recipe, str(path), lines)
    return recipe


def check(recipe: Recipe, source: str = "recipe", lines: dict[tuple[str, ...], int] | None = None) -> None:
    """What the schema cannot see, refused naming the key: missing files and folders, tracker
    packages, reward parameters, the process count's batch arithmetic, and (`check_passthrough`)
    TRL's own dataclasses."""
    lines = lines or {}

    def where(*key: str) -> str:
        return _where(key, source, lines)

    paths = [(("data", "grpo"), recipe.data.grpo)]
    paths += [(("data", "sft", str(i)), src.path) for i, src in enumerate(recipe.data.sft)]
    for key, value in paths:
        if value.startswith("seed:"):
            continue
        if pubmedqa.is_pool(value):
            # Loaded here: a training row that is a test item is refused now, naming file, line and id.
            try:
                pubmedqa.load_pool(value, recipe)
            except GazalError as exc:
                raise GazalError(f"{where(*key)}: {'.'.join(key)}: {exc}") from None
            continue
        looks_local = value.endswith((".jsonl", ".json", ".parquet")) or value.startswith((".", "/", "~"))
        if looks_local and not Path(value).expanduser().is_file():
            raise GazalError(f"{where(*key)}: {'.'.join(key)}: file not found: {value}")
    for i, tracker in enumerate(recipe.logging.report_to):
        # Here, not when the trainer starts: transformers would fail only once training begins.
        modules, install = TRACKER_PACKAGES.get(tracker, ((), ""))
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            raise GazalError(f"{where('logging', 'report_to', str(i))}: logging.report_to: {tracker} is not "
                             f"installed; `{install}` (or `pip install 'gazal[trackers]'`), or drop it from the list")
    bdir = recipe.eval.benchmarks_dir
    if bdir is not None and not Path(bdir).expanduser().is_dir():
        raise GazalError(f"{where('eval', 'benchmarks_dir')}: eval.benchmarks_dir: directory not found: {bdir}")
    from gazal.rewards import resolve_reward  # late import: rewards imports the answer extractor

    for i, spec in enumerate(recipe.grpo.rewards):
        try:
            resolve_reward(spec.name, spec.params, max_completion_length=recipe.grpo.max_completion_length)
        except (GazalError, TypeError, ValueError) as exc:
            raise GazalError(f"{where('grpo', 'rewards', str(i))}: grpo.rewards.{i} ({spec.name}): {exc}") from None
    g = recipe.grpo
    if g.enabled and recipe.eval.enabled and recipe.eval.max_new_tokens < g.max_completion_length:
        # A warning, not a refusal: short evaluations are legitimate (smoke tests, direct answers).
        log.warning("%s: eval.max_new_tokens=%d is below grpo.max_completion_length=%d: evaluation cuts off "
                    "completions the trained model was paid to write (an unclosed <think> scores as no answer)",
                    where("eval", "max_new_tokens"), recipe.eval.max_new_tokens, g.max_completion_length)
    if g.importance_sampling_level == "sequence" and g.loss_type != "grpo":
        # Runnable, but not GSPO: TRL warns as well.
        log.warning("%s: grpo.importance_sampling_level=sequence with loss_type %s sums per-token terms, weighting "
                    "each sequence by its length; the GSPO paper's objective is loss_type grpo",
                    where("grpo", "importance_sampling_level"), g.loss_type)
    # TRL samples per_device_train_batch_size x processes x steps_per_generation completions at once,
    # whole groups only (a group may span processes). WORLD_SIZE is set under accelerate launch/torchrun.
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if g.per_device_train_batch_size * processes * (g.steps_per_generation or g.gradient_accumulation_steps) \
            % g.num_generations:
        raise GazalError(
            f"{where('grpo', 'num_generations')}: grpo.num_generations ({g.num_generations}) must divide "
            f"grpo.per_device_train_batch_size x processes ({processes}) x grpo.steps_per_generation "
            "(default: gradient_accumulation_steps)"
        )
    from gazal import sft_steps  # reads the SFT data when it is on this machine (nothing is downloaded)

    # Outside a launch this counts one process, the most steps a run can have: a warning then holds
    # for any launch; under accelerate launch it counts the launch's processes.
    for key, message in sft_steps.check_intervals(recipe, processes):
        log.warning("%s: %s", where(*key), message)
    check_launch()
    check_passthrough(recipe)


FSDP1_REFUSED = ("FSDP1 is not supported: Gazal's merged rollouts, change check and checkpoints read "
                 "FSDP2 DTensor shards; under FSDP1 the adapter merge would run on flattened shards. "
                 "Set fsdp_config.fsdp_version: 2 (as src/gazal/accelerate/fsdp.yaml does)")


def check_launch(env: dict[str, str] | None = None) -> None:
    """Refuse a launcher setup Gazal cannot run correctly: FSDP other than FSDP2.

    accelerate launch exports ACCELERATE_USE_FSDP and FSDP_VERSION (1 when the config omits it).
    """
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and env.get("FSDP_VERSION", "1") != "2":
        raise GazalError(f"FSDP_VERSION={env.get('FSDP_VERSION', '1')} (from accelerate launch): {FSDP1_REFUSED}")


def check_accelerate_config(path: Path) -> None:
    """An accelerate config file Gazal would be launched with, checked before any launch."""
    if not path.is_file():
        raise GazalError(f"--accelerate-config: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise GazalError(f"{path}: broken YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise GazalError(f"{path}: an accelerate config must be a mapping")
    if data.get("distributed_type") == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        version = fsdp.get("fsdp_version", 1)
        lines = _key_lines(text)
        if version != 2:
            key = ("fsdp_config", "fsdp_version") if ("fsdp_config", "fsdp_version") in lines else ("distributed_type",)
            raise GazalError(f"{_where(key, str(path), lines)}: {'.'.join(key)}: fsdp_version {version}: "
                             f"{FSDP1_REFUSED}")
        if fsdp.get("fsdp_state_dict_type") != "FULL_STATE_DICT":
            key = ("fsdp_config", "fsdp_state_dict_type")
            raise GazalError(f"{_where(key, str(path), lines)}: fsdp_config.fsdp_state_dict_type: "
                             f"{fsdp.get('fsdp_state_dict_type')}: Gazal saves the adapter gathered whole "
                             "(only the trainable tensors); set FULL_STATE_DICT")


def check_passthrough(recipe: Recipe) -> None:
    """`sft.trl`, `grpo.trl` and `model.kwargs` entries, and optional packages the recipe asks for;
    raises GazalError naming the key."""
    from gazal.models import OWN_MODEL_KWARGS

    wanted = [("sft.use_liger_kernel", recipe.sft.enabled and recipe.sft.use_liger_kernel, "liger_kernel"),
              ("grpo.use_vllm", recipe.grpo.enabled and recipe.grpo.use_vllm, "vllm"),
              ("eval.backend", recipe.eval.enabled and recipe.eval.backend == "vllm", "vllm")]
    for key, used, package in wanted:
        if used and importlib.util.find_spec(package) is None:
            message = f"{key}: needs the {package} package (pip install 'gazal[gpu]', on a CUDA machine)"
            import torch

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
