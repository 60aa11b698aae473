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
