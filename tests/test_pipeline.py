"""The whole recipe on the tiny Qwen3 model: every stage, its files, and what training changed."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gazal import models
from gazal.cli import main

TINY = [
    "model.name_or_path=gazal:tiny-qwen3",
    "data.sft_limit=8",
    "data.grpo_limit=8",
    "sft.max_steps=3",
    "sft.max_length=1536",
    "sft.learning_rate=1e-2",
    "grpo.max_steps=2",
    "grpo.max_completion_length=12",
    "grpo.learning_rate=1e-2",
    # A random model never earns accuracy/format credit; a length reward gives the group a spread.
    "grpo.rewards=[{name: accuracy}, {name: format}, {name: 'tiny_rewards:length', weight: 1.0}]",
    # That length reward is gameable on purpose (the audit says so); this run overrides the audit.
    "grpo.skip_reward_audit=true",
    "eval.limit=3",
    "eval.max_new_tokens=8",
    "eval.batch_size=3",
    # The stage report card: every stage's model on the same items.
    "eval.stages=[base, sft, grpo]",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, benchmarks_dir):
    out = tmp_path_factory.mktemp("run") / "tiny"
    args = ["run", "--config", "demo", "--run-dir", str(out), f"eval.benchmarks_dir={benchmarks_dir}", *TINY]
    assert main(args) == 0
    return out


def test_run_dir_files(run_dir: Path):
    for rel in ["recipe.yaml", "manifest.json", "report.md", "eval/results.json",
                "eval/medqa/samples.jsonl", "eval/mmlu_pro/samples.jsonl", "eval/pubmedqa/samples.jsonl"]:
        assert (run_dir / rel).is_file(), rel
    for stage in ("sft", "grpo"):
        for rel in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json",
                    "merged/model.safetensors", "metrics.jsonl", "summary.json", "recipe.yaml", "DONE"]:
            assert (run_dir / stage / rel).is_file(), f"{stage}/{rel}"
    assert not (run_dir / "versions.json").exists()  # the manifest holds the versions now


def test_manifest_follows_the_model_from_stage_to_stage(run_dir: Path):
    from gazal.manifest import weights_digest

    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["packages"]["trl"] and m["packages"]["peft"] and m["packages"]["transformers"]
    stages = m["stages"]
    assert list(stages) == ["sft", "grpo", "eval"] and all(s["finished"] for s in stages.values())
    # Each stage starts from the model the one before it wrote, and says so by content.
    assert stages["sft"]["base_model"]["name"] == "gazal:tiny-qwen3"
    assert stages["grpo"]["base_model"]["sha256"] == weights_digest(run_dir / "sft" / "merged")["sha256"]
    assert stages["eval"]["base_model"]["sha256"] == weights_digest(run_dir / "grpo" / "merged")["sha256"]
    assert set(stages["eval"]["models"]) == {"base", "sft", "grpo"}
    assert [d["source"] for d in stages["sft"]["data"]] == ["seed:sft"]
    assert [d["source"] for d in stages["grpo"]["data"]] == ["seed:grpo"]
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    for name, bench in stages["eval"]["benchmarks"].items():
        assert bench["ids"] == res["benchmarks"][name]["selection"]["ids"] and len(bench["sha256"]) == 64


def test_adapters_changed_and_base_did_not(run_dir: Path):
    for stage in ("sft", "grpo"):
        params = json.loads((run_dir / stage / "summary.json").read_text())["parameters"]
        assert params["trainable_tensors_changed"] == params["trainable_tensors"] > 0, stage
        assert params["frozen_tensors_changed"] == 0, stage
        cfg = json.loads((run_dir / stage / "adapter" / "adapter_config.json").read_text())
        assert cfg["use_dora"] and cfg["use_rslora"]
        # Independent check on the saved adapter: LoRA B starts at zero, so non-zero B means training moved it.
        weights = load_file(run_dir / stage / "adapter" / "adapter_model.safetensors")
        lora_b = [t for k, t in weights.items() if "lora_B" in k]
        magnitudes = [t for k, t in weights.items() if "magnitude" in k]
        assert lora_b and magnitudes
        assert all(t.abs().sum() > 0 for t in lora_b), stage
    # The base model on disk is untouched, and the merged SFT model differs from it.
    base = load_file(Path(models.resolve_model(models.TINY_QWEN3)) / "model.safetensors")
    merged = load_file(run_dir / "sft" / "merged" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], merged[key])


def test_metrics_and_rewards_logged(run_dir: Path):
    sft_rows = [json.loads(l) for l in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in sft_rows)
    grpo_rows = [json.loads(l) for l in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    for name in ("accuracy", "format", "length"):
        assert any(f"rewards/{name}/mean" in r for r in grpo_rows), name


def test_eval_results_and_report(run_dir: Path):
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    assert res["model"].endswith("grpo/merged")
    for name in ("medqa", "mmlu_pro", "pubmedqa"):
        b = res["benchmarks"][name]
        assert b["n"] == 3 and 0 <= b["accuracy"] <= 1 and b["ci95"][0] <= b["accuracy"] <= b["ci95"][1]
        assert set(b["status_rates"]) == {"ok", "no_answer", "hedge", "not_an_option"}
        lines = (run_dir / "eval" / name / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 3 and all({"id", "prediction", "status", "correct"} <= json.loads(l).keys() for l in lines)
    report = (run_dir / "report.md").read_text()
    assert "MedQA" in report and "87.1" in report and "GRPO" in report


def test_stage_card_pairs_every_stage_on_the_same_items(run_dir: Path):
    from gazal.compare import compare_runs

    res = json.loads((run_dir / "eval" / "results.json").read_text())
    c = res["card"]
    assert c["stages"] == ["base", "sft", "grpo"] and c["comparison_pairs"] == [["base", "sft"], ["sft", "grpo"],
                                                                                ["base", "grpo"]]
    folders = {"base": run_dir / "eval" / "stages" / "base", "sft": run_dir / "eval" / "stages" / "sft",
               "grpo": run_dir / "eval"}
    assert c["models"]["base"] == models.resolve_model(models.TINY_QWEN3)
    assert c["models"]["sft"].endswith("sft/merged") and c["models"]["grpo"].endswith("grpo/merged")
    for stage, folder in folders.items():
        stage_res = json.loads((folder / "results.json").read_text())
        assert stage_res["model"] == c["models"][stage]
        for name in ("medqa", "mmlu_pro", "pubmedqa"):
            # The same item ids in every stage, in both modes.
            for mode in ("", "direct"):
                ids = [json.loads(l)["id"] for l in (folder / name / mode / "samples.jsonl").read_text().splitlines()]
                assert ids == res["benchmarks"][name]["selection"]["ids"]
            cell = c["benchmarks"][name]["stages"][stage]
            assert cell["accuracy"] == stage_res["benchmarks"][name]["accuracy"]
            assert cell["direct"]["accuracy"] == stage_res["benchmarks"][name]["direct"]["accuracy"]
            assert 0 <= cell["answered_rate"] <= 1 and 0 <= cell["format_rate"] <= 1
    # Each paired comparison is exactly what `gazal compare` gives for the same two stages.
    for a, b in c["comparison_pairs"]:
        for mode in ("reasoning", "direct"):
            direct = compare_runs(folders[a], folders[b], mode=mode)["benchmarks"]
            for name, bench in c["benchmarks"].items():
                entry = next(p for p in bench["comparisons"] if (p["a"], p["b"], p["mode"]) == (a, b, mode))
                assert {k: v for k, v in entry.items() if k not in ("a", "b", "mode")} == direct[name]
    report = (run_dir / "report.md").read_text()
    assert report.index("## Stage report card") < report.index("## SFT")
    assert "| base → sft | reasoning |" in report and "always answering the commonest label" in report


def test_rerun_skips_finished_stages_and_stages_run_alone(run_dir: Path, capsys):
    assert main(["run", "--config", "demo", "--run-dir", str(run_dir), *TINY[:1]]) == 0
    out = capsys.readouterr().out
    assert out.count("already finished") == 3
    assert main(["report", "--run-dir", str(run_dir)]) == 0


def test_killed_evaluation_resumes_to_the_same_numbers(run_dir: Path, benchmarks_dir):
    before = json.loads((run_dir / "eval" / "results.json").read_text())
    samples = run_dir / "eval" / "medqa" / "samples.jsonl"
    first = samples.read_text().splitlines()[0]
    # What a kill mid-batch leaves: one finished item, half a line, no DONE marker.
    samples.write_text(first + "\n" + '{"id": "medqa_us_te')
    (run_dir / "eval" / "DONE").unlink()
    assert main(["eval", "--config", "demo", "--run-dir", str(run_dir), f"eval.benchmarks_dir={benchmarks_dir}", *TINY]) == 0
    after = json.loads((run_dir / "eval" / "results.json").read_text())
    assert after["benchmarks"] == before["benchmarks"]
    assert len(samples.read_text().splitlines()) == 3  # the torn line was redone, not duplicated


def test_grpo_refuses_a_gameable_reward(tmp_path, capsys):
    args = ["grpo", "--config", "demo", "--run-dir", str(tmp_path / "r"), "model.name_or_path=gazal:tiny-qwen3",
            "grpo.rewards=[{name: accuracy}]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "reward audit" in err and "bare_answer" in err and "skip_reward_audit" in err
    assert not (tmp_path / "r" / "grpo" / "DONE").exists()


def test_stages_leave_no_model_behind(run_dir: Path):
    # `gazal run` keeps every stage in one process: what SFT and GRPO held must be gone before the
    # next stage loads its own model.
    import gc

    from peft import PeftModel
    from transformers import PreTrainedModel, Trainer

    gc.collect()
    alive = [type(o).__name__ for o in gc.get_objects()
             if isinstance(o, (PeftModel, PreTrainedModel, Trainer, torch.optim.Optimizer))]
    assert alive == []


def test_each_stage_reports_its_own_peak_memory():
    from gazal import rundir

    assert rundir.reset_peak_memory()  # Linux: VmHWM restarts from the current resident set
    block = bytearray(300 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
    high = rundir.peak_rss_mb()
    del block
    assert rundir.reset_peak_memory()
    assert rundir.peak_rss_mb() < high - 250


def _browser_missing() -> str | None:
    import importlib.util

    from browser import chromium

    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    if chromium() is None:
        return "no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)"
    return None


def test_report_html_in_headless_chromium(run_dir: Path):
    why = _browser_missing()
    if why:
        pytest.skip(why)
    from browser import check_report

    # A comparison saved in the run (here the run against itself) gets its own table.
    assert main(["compare", str(run_dir), str(run_dir), "--json", str(run_dir / "compare-self.json")]) == 0
    assert main(["report", "--run-dir", str(run_dir)]) == 0
    found = check_report(run_dir, filter_source="medqa")
    print("report screenshot:", found["screenshot"])
    assert found["console_errors"] == []
    assert found["sections"] == ["card", "sft", "grpo", "eval", "samples"]
    # The card's benchmarks first, then the saved comparison.
    assert found["headings"] == ["MedQA (USMLE, 4 options, test)", "MMLU-Pro medical", "PubMedQA (PQA-L test)",
                                 "Comparison: compare-self.json"]
    names = {p["plot"] for p in found["plots"]}
    assert {"sft-loss", "sft-learning-rate", "grpo-total-reward", "grpo-accuracy-vs-format", "grpo-entropy",
            "grpo-grad-norm", "grpo-groups-with-zero-reward-spread", "grpo-completion-length--tokens-",
            "eval-accuracy", "eval-status", "card-accuracy"} <= names
    assert {"grpo-reward--accuracy", "grpo-reward--format", "grpo-reward--length"} <= names  # one per component
    # Every plot is drawn, with its data series in it.
    assert all(p["width"] > 100 and p["height"] > 100 and p["data_paths"] > 0 for p in found["plots"]), found["plots"]
    # The sample table holds GRPO rollouts and every benchmark's items, and the filter narrows it.
    assert found["sources"] == ["grpo", "medqa", "mmlu_pro", "pubmedqa"]
    samples = sum(1 for _ in (run_dir / "eval" / "medqa").glob("**/samples.jsonl"))
    f = found["filtered"]
    assert f["all_match"] and 0 < f["visible"] < found["rows"] and f["count_text"] == f"{f['visible']} of {found['rows']} rows"
    assert f["visible"] == 3 * samples  # 3 items in each medqa mode
    assert Path(found["screenshot"]).stat().st_size > 10_000


def test_review_round_trip_on_the_tiny_run(run_dir: Path, tmp_path):
    import csv

    pkg = tmp_path / "pkg"
    assert main(["review", "export", str(run_dir), "--out", str(pkg), "-n", "6", "--seed", "0"]) == 0
    with (pkg / "review.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["source"] for r in rows} == {"eval:medqa", "eval:mmlu_pro", "eval:pubmedqa"}
    assert all(r["question"] and r["gold"] and r["auto_correct"] in ("true", "false") for r in rows)
    for i, r in enumerate(rows):
        r["verdict"] = ("correct", "incorrect", "unsafe")[i % 3]
    with (pkg / "review.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main(["review", "import", str(pkg), str(pkg / "review.csv")]) == 0
    result = json.loads((pkg / "review.json").read_text())
    # By hand, from the CSV: the reviewer agrees with the grading where 'correct' meets a right answer,
    # or 'incorrect'/'unsafe' a wrong one.
    agree = sum((r["verdict"] == "correct") == (r["auto_correct"] == "true") for r in rows)
    assert result["verdicts"] == {"correct": 2, "incorrect": 2, "unsafe": 2}
    assert result["reviewer_agrees_with_grading"] == agree and result["agreement_rate"] == agree / 6
    assert result["graded_cases"] == 6 and result["drop"] is None
    right_correct = sum(r["auto_correct"] == "true" and r["verdict"] == "correct" for r in rows)
    assert result["grading_vs_reviewer"]["auto_right_reviewer_correct"] == right_correct
    # GRPO rollouts too: each sample matched to its question and graded by the shared extractor.
    assert main(["review", "export", str(run_dir), "--source", "grpo", "--out", str(tmp_path / "g"), "-n", "4"]) == 0
    with (tmp_path / "g" / "review.csv").open(newline="") as fh:
        grpo = list(csv.DictReader(fh))
    assert len(grpo) == 4 and all(r["question"] and f"\n{r['gold']}. " in "\n" + r["options"] for r in grpo)


def test_killed_stage_card_evaluation_resumes_to_identical_results(run_dir: Path, benchmarks_dir, tmp_path):
    """SIGKILL while the second stage's model is being evaluated: the first stage's rows are kept, the
    second's finished batches too, and the resumed card equals an uninterrupted one."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    args = [f"eval.benchmarks_dir={benchmarks_dir}", *TINY, "eval.benchmarks=[medqa]", "eval.limit=16",
            "eval.batch_size=2", "eval.generation_batch_size=null", "eval.max_new_tokens=16", "eval.modes=[reasoning]",
            "eval.stages=[base, sft]"]
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    for copy in (killed, fresh):
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval"))
    part = killed / "eval" / "medqa" / "parts" / "0.jsonl"  # the last stage (sft) is evaluated into eval/
    proc = subprocess.Popen([sys.executable, "-m", "gazal", "eval", "--config", "demo", "--run-dir", str(killed), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # The recipe's test reward (tiny_rewards) lives beside this file.
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                              os.environ.get("PYTHONPATH", "")])})
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if part.is_file() and len(part.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "evaluation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "eval" / "stages" / "base" / "results.json").is_file()
    assert 2 <= len(part.read_text().splitlines()) < 16 and not (killed / "eval" / "DONE").exists()
    assert main(["eval", "--config", "demo", "--run-dir", str(killed), *args]) == 0
    assert main(["eval", "--config", "demo", "--run-dir", str(fresh), *args]) == 0
    a = json.loads((killed / "eval" / "results.json").read_text())
    b = json.loads((fresh / "eval" / "results.json").read_text())
    assert a["benchmarks"] == b["benchmarks"]
    assert json.dumps(a["card"]["benchmarks"]) == json.dumps(b["card"]["benchmarks"])
    for stage in ("stages/base/", ""):
        rows_a = (killed / "eval" / f"{stage}medqa" / "samples.jsonl").read_text()
        assert rows_a == (fresh / "eval" / f"{stage}medqa" / "samples.jsonl").read_text() and rows_a.count("\n") == 16
