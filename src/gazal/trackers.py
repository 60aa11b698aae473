"""Experiment trackers (`logging.report_to`): TensorBoard, Weights & Biases, MLflow, Trackio.

transformers' integration callbacks (TrainingArguments.report_to) log every trainer metric of a
stage; this module adds what they do not know about:

- run identity: each stage is one tracker run named <run_name>-<stage>, and the stages of one Gazal
  run are grouped under run_name: TensorBoard runs are the folders sft, grpo and eval of `logs_dir`;
  W&B runs share the group run_name in the project; MLflow runs carry the tag gazal.run=run_name in
  the experiment named by the project; Trackio runs sit in the project. `--resume` continues the
  stage's own run (W&B and MLflow run ids are kept in runs.json in `logs_dir`); a fresh rerun of a
  stage starts a new one (its TensorBoard folder is emptied first).
- the resolved recipe as the run's config: TensorBoard text `gazal/recipe`, W&B and Trackio config
  key `gazal`, MLflow artifact gazal_recipe.json (next to the TrainingArguments the integrations log).
- evaluation results, in the run <run_name>-eval: eval/<benchmark>/accuracy, ci95_low, ci95_high,
  n, truncation_rate, mean_completion_tokens, and eval/<benchmark>/direct/... for the direct mode.

Only the main process talks to trackers. Which packages are installed is checked when the recipe is
validated (recipes.check), not here.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from gazal import rundir
from gazal.config import Recipe

log = logging.getLogger(__name__)


def enabled(recipe: Recipe) -> list[str]:
    """The recipe's trackers ([] for 'none')."""
    return [t for t in recipe.logging.report_to if t != "none"]


def logs_dir(recipe: Recipe, run_dir: Path) -> Path:
    """Where TensorBoard event files (one folder per stage), W&B's local files and runs.json go:
    <run dir>/logs, or <logging.logging_dir>/<run_name>, so that several runs can share one folder."""
    if recipe.logging.logging_dir:
        return Path(recipe.logging.logging_dir).expanduser() / run_name(recipe, run_dir)
    return Path(run_dir) / "logs"


def run_name(recipe: Recipe, run_dir: Path) -> str:
    """The Gazal run's name in the trackers: logging.run_name, else the run directory's name."""
    return recipe.logging.run_name or Path(run_dir).resolve().name


def project(recipe: Recipe) -> str:
    """W&B / Trackio project or MLflow experiment: logging.project, else the recipe's name."""
    return recipe.logging.project or recipe.name


def training_args(recipe: Recipe, out: Path) -> dict[str, Any]:
    """report_to, run_name and project of the TrainingArguments of the stage whose folder is `out`.

    transformers 5 has no TrainingArguments.logging_dir; the TensorBoard folder is set on its
    callback by `start`."""
    return {"report_to": enabled(recipe) or "none", "run_name": f"{run_name(recipe, out.parent)}-{out.name}",
            "project": project(recipe)}


def _recipe_markdown(recipe: Recipe) -> str:
    # Indented: TensorBoard renders text as markdown, and a code block keeps the YAML's indentation.
    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    return "\n".join("    " + line for line in text.splitlines())


def _ids(folder: Path) -> dict[str, dict[str, str]]:
    path = folder / "runs.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _remember(folder: Path, stage: str, tracker: str, run_id: str) -> None:
    ids = _ids(folder)
    ids.setdefault(stage, {})[tracker] = run_id
    rundir.write_json(folder / "runs.json", ids)


class RecipeConfig(TrainerCallback):
    """Adds the recipe to the runs that the TensorBoard and Trackio integrations open in their own
    on_train_begin (they log TrainingArguments and the model config, not the recipe). Callbacks
    added to a trainer come after its integration callbacks, so the writer and the run exist here."""

    def __init__(self, recipe: Recipe, tensorboard: TensorBoardCallback | None, trackio: bool):
        self.recipe, self.tensorboard, self.trackio = recipe, tensorboard, trackio

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.tensorboard is not None and self.tensorboard.tb_writer is not None:
            self.tensorboard.tb_writer.add_text("gazal/recipe", _recipe_markdown(self.recipe))
            self.tensorboard.tb_writer.flush()
        if self.trackio:
            import trackio

            trackio.config.update({"gazal": self.recipe.model_dump(mode="json")}, allow_val_change=True)


def start(trainer, recipe: Recipe, run_dir: Path, stage: str, resumed: bool) -> Callable[[], None]:
    """Open this stage's tracker runs before `trainer.train()`; returns what closes them after it.

    W&B and MLflow runs are opened here, where Gazal can name, group and resume them; the
    integrations find the active run and log into it instead of opening their own."""
    chosen = enabled(recipe)
    if not chosen or not trainer.is_world_process_zero():
        return lambda: None
    folder = logs_dir(recipe, run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{run_name(recipe, run_dir)}-{stage}"
    config = {"gazal": recipe.model_dump(mode="json"), "gazal_stage": stage}
    previous = _ids(folder).get(stage, {}) if resumed else {}
    closers: list[Callable[[], Any]] = []
    tensorboard = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)), None)
    if tensorboard is not None:
        if not resumed:
            shutil.rmtree(folder / stage, ignore_errors=True)
        tensorboard.logging_dir = str(folder / stage)  # what TENSORBOARD_LOGGING_DIR would set
    if "wandb" in chosen:
        import wandb

        run = wandb.init(project=project(recipe), name=name, group=run_name(recipe, run_dir), job_type=stage,
                         dir=str(folder), config=config, id=previous.get("wandb"),
                         resume="allow" if previous.get("wandb") else None)
        _remember(folder, stage, "wandb", run.id)
        closers.append(wandb.finish)
    if "mlflow" in chosen:
        import mlflow

        mlflow.set_experiment(project(recipe))
        if previous.get("mlflow"):
            run = mlflow.start_run(run_id=previous["mlflow"])
        else:
            run = mlflow.start_run(run_name=name, tags={"gazal.run": run_name(recipe, run_dir), "gazal.stage": stage})
        mlflow.log_dict(config["gazal"], "gazal_recipe.json")
        _remember(folder, stage, "mlflow", run.info.run_id)
        closers.append(mlflow.end_run)
    trainer.add_callback(RecipeConfig(recipe, tensorboard, "trackio" in chosen))

    def finish() -> None:
        for close in closers:
            close()

    return finish


def eval_metrics(results: dict) -> dict[str, float]:
    """Scalars of eval/results.json: eval/<benchmark>[/direct]/<metric>."""
    out: dict[str, float] = {}
    for name, entry in results.get("benchmarks", {}).items():
        if "skipped" in entry:
            continue
        modes = [(entry.get("mode", "reasoning"), entry)]
        if "direct" in entry:
            modes.append(("direct", entry["direct"]))
        for mode, m in modes:
            prefix = f"eval/{name}" if mode == "reasoning" else f"eval/{name}/{mode}"
            values = {"accuracy": m.get("accuracy"), "n": m.get("n"),
                      "truncation_rate": m.get("truncation_rate"),
                      "mean_completion_tokens": m.get("mean_completion_tokens")}
            if m.get("ci95"):
                values["ci95_low"], values["ci95_high"] = m["ci95"]
            out.update({f"{prefix}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))})
    # The stage report card: each stage's figures, and each paired comparison's difference and p-value.
    card = results.get("card") or {}
    for name, bench in card.get("benchmarks", {}).items():
        for stage, c in bench["stages"].items():
            values = {"accuracy": c["accuracy"], "ci95_low": c["ci95"][0], "ci95_high": c["ci95"][1],
                      "answered_rate": c["answered_rate"], "format_rate": c["format_rate"],
                      "mean_completion_tokens": c["mean_completion_tokens"]}
            if c.get("direct"):
                values["direct_accuracy"] = c["direct"]["accuracy"]
            out.update({f"eval/stage/{stage}/{name}/{k}": float(v) for k, v in values.items()
                        if isinstance(v, (int, float))})
        for p in bench["comparisons"]:
            prefix = f"eval/compare/{p['a']}_to_{p['b']}/{name}" + ("" if p["mode"] == "reasoning" else "/direct")
            out.update({f"{prefix}/difference": float(p["difference"]), f"{prefix}/p_value": float(p["p_value"]),
                        f"{prefix}/ci95_low": float(p["ci95"][0]), f"{prefix}/ci95_high": float(p["ci95"][1])})
    return out


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboardX alone, as transformers' callback allows
        from tensorboardX import SummaryWriter
    return SummaryWriter(log_dir=str(folder))


def log_eval(recipe: Recipe, run_dir: Path, results: dict) -> None:
    """Log evaluation results to the recipe's trackers, in the run <run_name>-eval (main process)."""
    chosen = enabled(recipe)
    if not chosen or not rundir.is_main_process():
        return
    metrics = eval_metrics(results)
    folder = logs_dir(recipe, run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    group = run_name(recipe, run_dir)
    config = {"gazal": recipe.model_dump(mode="json"), "gazal_stage": "eval", "gazal_model": results.get("model")}
    if "tensorboard" in chosen:
        shutil.rmtree(folder / "eval", ignore_errors=True)
        writer = _summary_writer(folder / "eval")
        for key, value in metrics.items():
            writer.add_scalar(key, value, 0)
        writer.add_text("gazal/recipe", _recipe_markdown(recipe))
        writer.close()
    if "wandb" in chosen:
        import wandb

        run = wandb.init(project=project(recipe), name=f"{group}-eval", group=group, job_type="eval",
                         dir=str(folder), config=config)
        run.log(metrics)
        run.summary.update(metrics)
        _remember(folder, "eval", "wandb", run.id)
        run.finish()
    if "mlflow" in chosen:
        import mlflow

        mlflow.set_experiment(project(recipe))
        with mlflow.start_run(run_name=f"{group}-eval", tags={"gazal.run": group, "gazal.stage": "eval"}) as run:
            mlflow.log_dict(config["gazal"], "gazal_recipe.json")
            # MLflow metric names allow letters, digits and _-./ and spaces only.
            mlflow.log_metrics({re.sub(r"[^0-9A-Za-z_\-./ ]", "_", k): v for k, v in metrics.items()})
            _remember(folder, "eval", "mlflow", run.info.run_id)
    if "trackio" in chosen:
        import trackio

        trackio.init(project=project(recipe), name=f"{group}-eval", config=config)
        trackio.log(metrics)
        trackio.finish()
    log.info("eval: %d results logged to %s", len(metrics), ", ".join(chosen))
