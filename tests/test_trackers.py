"""Trackers (`logging.report_to`): real TensorBoard event files from a tiny SFT + GRPO run and an
evaluation, read back; W&B in offline mode; a missing tracker package refused at validation."""

import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest

from gazal import trackers
from gazal.cli import main
from gazal.recipes import load_recipe

TINY = [
    "model.name_or_path=gazal:tiny-qwen3",
    "data.sft_limit=4",
    "data.grpo_limit=4",
    "sft.max_steps=2",
    "sft.max_length=1536",
    "sft.learning_rate=1e-2",
    "sft.warmup_steps=0",
    "grpo.max_steps=2",
    "grpo.max_completion_length=12",
    "grpo.learning_rate=1e-2",
    "grpo.rewards=[{name: accuracy}, {name: format}, {name: 'tiny_rewards:length', weight: 1.0}]",
    "grpo.skip_reward_audit=true",
]


def _events(folder: Path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'gazal[dev]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc, tag: str) -> str:
    return b"".join(e.tensor_proto.string_val[0] for e in acc.Tensors(tag)).decode()


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install 'gazal[dev]')")
    run = tmp_path_factory.mktemp("trackers") / "tb"
    common = ["--config", "demo", "--run-dir", str(run), *TINY, "logging.report_to=[tensorboard]"]
    assert main(["sft", *common]) == 0
    assert main(["grpo", *common]) == 0
    return run


def test_sft_and_grpo_write_tensorboard_scalars_and_the_recipe(tb_run):
    sft = _events(tb_run / "logs" / "sft")
    assert "train/loss" in sft.Tags()["scalars"]
    grpo = _events(tb_run / "logs" / "grpo")
    scalars = grpo.Tags()["scalars"]
    # transformers' TensorBoardCallback prefixes training logs with train/.
    assert "train/rewards/accuracy/mean" in scalars and "train/reward" in scalars
    assert [e.step for e in grpo.Scalars("train/rewards/accuracy/mean")] == [1, 2]
    # The same values as metrics.jsonl, which Gazal writes itself.
    rows = [json.loads(line) for line in (tb_run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["rewards/accuracy/mean"] for r in rows if "rewards/accuracy/mean" in r]
    assert [e.value for e in grpo.Scalars("train/rewards/accuracy/mean")] == pytest.approx(logged)
    for acc in (sft, grpo):
        recipe = _text(acc, "gazal/recipe/text_summary")
        assert "report_to:" in recipe and "tensorboard" in recipe and "gazal:tiny-qwen3" in recipe
        assert "run_name" in _text(acc, "args/text_summary")  # the TrainingArguments, by transformers
    args = json.loads(_text(grpo, "args/text_summary"))
    assert args["run_name"] == "tb-grpo" and args["report_to"] == ["tensorboard"]


def test_evaluation_results_go_to_tensorboard(tb_run, benchmarks_dir):
    assert main(["eval", "--config", "demo", "--run-dir", str(tb_run), *TINY, "logging.report_to=[tensorboard]",
                 f"eval.benchmarks_dir={benchmarks_dir}", "eval.benchmarks=[medqa, pubmedqa]", "eval.limit=2",
                 "eval.max_new_tokens=6", "eval.batch_size=2", "eval.modes=[reasoning, direct]"]) == 0
    results = json.loads((tb_run / "eval" / "results.json").read_text())
    acc = _events(tb_run / "logs" / "eval")
    scalars = acc.Tags()["scalars"]
    for name in ("medqa", "pubmedqa"):
        assert acc.Scalars(f"eval/{name}/accuracy")[0].value == pytest.approx(results["benchmarks"][name]["accuracy"])
        assert {f"eval/{name}/ci95_low", f"eval/{name}/ci95_high", f"eval/{name}/n",
                f"eval/{name}/direct/accuracy"} <= set(scalars)
    assert "gazal:tiny-qwen3" in _text(acc, "gazal/recipe/text_summary")


def test_run_names_and_folders(tmp_path):
    run = tmp_path / "demo-1"
    recipe = load_recipe("demo")
    assert trackers.logs_dir(recipe, run) == run / "logs"
    assert trackers.training_args(recipe, run / "sft") == {"report_to": "none", "run_name": "demo-1-sft",
                                                            "project": "demo"}
    # A shared folder: one subfolder per run.
    recipe = load_recipe("demo", ["logging.run_name=exp1", f"logging.logging_dir={tmp_path / 'tb'}",
                                  "logging.project=p"])
    assert trackers.logs_dir(recipe, run) == tmp_path / "tb" / "exp1"
    assert trackers.training_args(recipe, run / "grpo") == {"report_to": "none", "run_name": "exp1-grpo",
                                                             "project": "p"}


def test_eval_metrics_names():
    results = {"benchmarks": {
        "medqa": {"mode": "reasoning", "accuracy": 0.5, "n": 4, "ci95": [0.1, 0.9], "truncation_rate": 0.0,
                  "direct": {"accuracy": 0.25, "n": 4, "ci95": [0.0, 0.7]}},
        "pubmedqa": {"skipped": "not found"}}}
    m = trackers.eval_metrics(results)
    assert m == {"eval/medqa/accuracy": 0.5, "eval/medqa/n": 4.0, "eval/medqa/truncation_rate": 0.0,
                 "eval/medqa/ci95_low": 0.1, "eval/medqa/ci95_high": 0.9, "eval/medqa/direct/accuracy": 0.25,
                 "eval/medqa/direct/n": 4.0, "eval/medqa/direct/ci95_low": 0.0, "eval/medqa/direct/ci95_high": 0.7}


def test_eval_metrics_tag_each_stage_of_the_card():
    cell = {"accuracy": 0.5, "ci95": [0.2, 0.8], "answered_rate": 1.0, "format_rate": 0.75,
            "mean_completion_tokens": 40.0, "direct": {"accuracy": 0.25}}
    pair = {"a": "base", "b": "sft", "difference": 0.25, "p_value": 0.5, "ci95": [-0.1, 0.6]}
    results = {"benchmarks": {}, "card": {"benchmarks": {"pubmedqa": {
        "stages": {"base": {**cell, "accuracy": 0.25}, "sft": cell},
        "comparisons": [{**pair, "mode": "reasoning"}, {**pair, "mode": "direct", "difference": 0.0}]}}}}
    m = trackers.eval_metrics(results)
    assert m["eval/stage/base/pubmedqa/accuracy"] == 0.25 and m["eval/stage/sft/pubmedqa/accuracy"] == 0.5
    assert m["eval/stage/sft/pubmedqa/format_rate"] == 0.75 and m["eval/stage/sft/pubmedqa/direct_accuracy"] == 0.25
    assert m["eval/compare/base_to_sft/pubmedqa/difference"] == 0.25
    assert m["eval/compare/base_to_sft/pubmedqa/p_value"] == 0.5
    assert m["eval/compare/base_to_sft/pubmedqa/direct/difference"] == 0.0


# ---------------------------------------------------------------------------------------------
# Weights & Biases, offline


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (.wandb): LevelDB-log framing of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768  # records never straddle a 32 KiB block header
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:  # block padding
            pos += left
            continue
        if pos + 7 + n > len(data):  # still being written
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _wandb_run(folder: Path, name: str) -> dict:
    """config, summary, group and name of the offline run called `name` under folder/wandb."""
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        # W&B's service process may still be writing the file when finish() has returned; its last
        # record is `exit`.
        deadline = time.monotonic() + 60
        records = _wandb_records(path)
        while not any(r.WhichOneof("record_type") == "exit" for r in records):
            assert time.monotonic() < deadline, f"{path}: no exit record after 60 s"
            time.sleep(0.5)
            records = _wandb_records(path)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        if run.display_name != name:
            continue
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        summary = {}
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "summary":
                summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
            elif kind == "history":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        return {"config": config, "summary": summary, "group": run.run_group, "project": run.project}
    raise AssertionError(f"no offline W&B run named {name} under {folder}")


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'gazal[dev]' or wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout and stderr alone
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    yield


def test_wandb_offline_run_has_the_recipe_metrics_and_eval_results(wandb_offline, tmp_path):
    run = tmp_path / "wb"
    common = ["--config", "demo", "--run-dir", str(run), *TINY, "sft.save_steps=1", "logging.report_to=[wandb]",
              "logging.project=gazal-test"]
    assert main(["sft", *common, "sft.max_steps=1"]) == 0
    sft = _wandb_run(run / "logs", "wb-sft")
    assert sft["group"] == "wb" and sft["project"] == "gazal-test"
    assert sft["config"]["gazal"]["logging"]["report_to"] == ["wandb"]  # the resolved recipe
    assert sft["config"]["gazal"]["model"]["name_or_path"] == "gazal:tiny-qwen3"
    assert sft["config"]["run_name"] == "wb-sft"  # TrainingArguments, logged by transformers
    assert "train/loss" in sft["summary"]
    run_id = json.loads((run / "logs" / "runs.json").read_text())["sft"]["wandb"]
    # --resume continues the same W&B run (offline: a second file with the same run id).
    assert main(["sft", *common, "sft.max_steps=2", "--resume"]) == 0
    assert json.loads((run / "logs" / "runs.json").read_text())["sft"]["wandb"] == run_id
    assert len(list((run / "logs").glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))) == 2

    # Evaluation results: a run of their own in the same group.
    recipe = load_recipe("demo", [*TINY, "logging.report_to=[wandb]", "logging.project=gazal-test"])
    trackers.log_eval(recipe, run, {"model": "m", "benchmarks": {"medqa": {"mode": "reasoning", "accuracy": 0.5,
                                                                          "n": 2, "ci95": [0.1, 0.9]}}})
    ev = _wandb_run(run / "logs", "wb-eval")
    assert ev["group"] == "wb" and ev["summary"]["eval/medqa/accuracy"] == 0.5
    assert ev["config"]["gazal"]["seed"] == recipe.seed and ev["config"]["gazal_stage"] == "eval"


# ---------------------------------------------------------------------------------------------
# Validation


def test_missing_tracker_package_exits_2_at_validation(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(["validate", "--config", "demo", "logging.report_to=[mlflow]"]) == 2
    err = capsys.readouterr().err
    assert "logging.report_to" in err and "mlflow is not installed" in err and "pip install mlflow" in err
    # Both TensorBoard packages missing: the same, naming the entry.
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    assert main(["validate", "--config", "demo", "logging.report_to=[none]"]) == 0
    assert main(["validate", "--config", "demo", "logging.report_to=[tensorboard]"]) == 2
    assert "logging.report_to: tensorboard is not installed" in capsys.readouterr().err


def test_none_with_a_tracker_is_refused(capsys):
    assert main(["validate", "--config", "demo", "logging.report_to=[none, tensorboard]"]) == 2
    assert "logging.report_to" in capsys.readouterr().err
    assert load_recipe("demo", ["logging.report_to=tensorboard"]).logging.report_to == ["tensorboard"]
