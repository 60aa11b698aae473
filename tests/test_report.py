import json

import yaml

from gazal import report


def _grpo_run(tmp_path, formats):
    run = tmp_path / "run"
    (run / "grpo").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "t", "model": {"name_or_path": "m"}}))
    (run / "grpo" / "summary.json").write_text(json.dumps({
        "questions": 8, "base_model": "m", "steps": len(formats), "seconds": 1.0, "train_loss": 0.0,
        "parameters": {"trainable_parameters": 1, "trainable_tensors": 1, "trainable_tensors_changed": 1,
                       "frozen_tensors": 1, "frozen_tensors_changed": 0}}))
    rows = [{"step": i + 1, "loss": 0.0, "rewards/format/mean": f} for i, f in enumerate(formats)]
    (run / "grpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "grpo" / "DONE").write_text("")
    return run


def test_report_shows_each_reward_early_and_late(tmp_path):
    # A rising but noisy reward: first and last alone (0.5, 0.5) would hide the trend.
    run = _grpo_run(tmp_path, [0.5, 0.0, 0.25, 0.75, 1.0, 0.5])
    text = report.main(run).read_text()
    assert "| rewards/format/mean | 0.5000 | 0.5000 | 0.2500 | 0.7500 |" in text


def test_report_of_a_single_step_has_no_halves(tmp_path):
    text = report.main(_grpo_run(tmp_path, [0.5])).read_text()
    assert "| rewards/format/mean | 0.5000 | 0.5000 | - | - |" in text


def test_recall_versus_reasoning_by_hand():
    from gazal.evaluate import recall_vs_reasoning

    direct = [{"id": i, "correct": c} for i, c in zip("abcde", [True, True, False, False, True])]
    # Item 'a' has two reasoning samples; 'e' has none (paired only where both exist).
    reasoning = [{"id": "a", "correct": True, "completion_tokens": 10, "truncated": False},
                 {"id": "a", "correct": False, "completion_tokens": 40, "truncated": False},
                 {"id": "b", "correct": False, "completion_tokens": 100, "truncated": True},
                 {"id": "c", "correct": True, "completion_tokens": 60, "truncated": False},
                 {"id": "d", "correct": False, "completion_tokens": 20, "truncated": False}]
    r = recall_vs_reasoning(reasoning, direct, max_new_tokens=100)
    assert (r["pairs"], r["both_right"], r["reasoning_broke"], r["reasoning_fixed"], r["both_wrong"]) == (5, 1, 2, 1, 1)
    assert r["reasoning_broke_rate"] == 0.4
    # Buckets of 100 tokens: 1-12, 13-25, 26-50, 51-100, truncated.
    assert [(x["tokens"], x["n"], x["accuracy"]) for x in r["by_length"]] == [
        ("1-12", 1, 1.0), ("13-25", 1, 0.0), ("26-50", 1, 0.0), ("51-100", 1, 1.0), ("truncated", 1, 0.0)]


def test_eval_with_both_modes_prints_and_reports_recall_versus_reasoning(tmp_path, benchmarks_dir, capsys):
    from gazal.cli import main

    run = tmp_path / "run"
    args = ["eval", "--config", "demo", "--run-dir", str(run), "model.name_or_path=gazal:tiny-qwen3",
            f"eval.benchmarks_dir={benchmarks_dir}", "eval.benchmarks=[pubmedqa]", "eval.limit=6",
            "eval.max_new_tokens=6", "eval.direct_max_new_tokens=3", "eval.modes=[reasoning, direct]"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| PubMedQA (PQA-L test) (reasoning) | 6 |" in out and "| PubMedQA (PQA-L test) (direct) | 6 |" in out
    assert "reasoning broke a right recall" in out
    res = json.loads((run / "eval" / "results.json").read_text())["benchmarks"]["pubmedqa"]
    assert res["selection"]["strategy"] == "stratified" and len(res["selection"]["ids"]) == 6
    assert res["direct"]["mean_completion_tokens"] <= 3 and res["recall_vs_reasoning"]["pairs"] == 6
    text = report.main(run).read_text()
    assert "## Recall versus reasoning" in text and "Reasoning accuracy by completion length" in text


def test_html_report_plots_each_logged_metric_and_marks_monitor_events(tmp_path):
    import re

    run = _grpo_run(tmp_path, [0.5, 0.0, 0.25, 0.75])
    (run / "grpo" / "events.jsonl").write_text(json.dumps(
        {"step": 3, "rule": "format_collapse", "action": "warn", "message": "format fell"}) + "\n")
    report.main(run)
    page = (run / "report.html").read_text()
    plots = re.findall(r'data-plot="([^"]+)"', page)
    # Only what was logged is drawn: the format reward's own panel, accuracy-vs-format (format only), loss.
    assert plots == ["grpo-reward--format", "grpo-accuracy-vs-format", "grpo-loss"]
    assert page.count("format_collapse (warn)") == len(plots)  # marked on every curve
    assert "not logged in this run: total reward" in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # self-contained: nothing fetched
    # A run with neither SFT nor evaluation (an older or partial run) still gets a page.
    assert "Not run (no metrics.jsonl)" in page and "Not run (or not finished)" in page


def test_html_report_of_a_run_made_before_it(tmp_path):
    # An older run: a recipe and finished evaluation results only, no samples, metrics or versions.
    run = tmp_path / "old"
    (run / "eval").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "old", "model": {"name_or_path": "m"}}))
    (run / "eval" / "results.json").write_text(json.dumps({"model": "m", "decoding": {}, "benchmarks": {
        "medqa": {"definition": "MedQA", "paper_accuracy": 0.871, "limit": None, "n": 4, "correct": 1, "accuracy": 0.25,
                  "ci95": [0.05, 0.7], "per_category": {}, "status_rates": {"ok": 0.75, "no_answer": 0.25, "hedge": 0.0, "not_an_option": 0.0},
                  "mean_completion_tokens": 10.0, "truncation_rate": 0.0}}}))
    (run / "eval" / "DONE").write_text("")
    report.main(run)
    page = (run / "report.html").read_text()
    assert 'data-plot="eval-accuracy"' in page and 'data-plot="eval-status"' in page
    assert "No rollout or evaluation samples" in page
