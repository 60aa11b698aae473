"""`gazal score` and the metrics behind every accuracy Gazal reports."""

import json

import pytest

from gazal.cli import main
from gazal.scoring import metrics, wilson_interval

ROWS = [
    {"id": "q1", "completion": "<think>r</think>\nThe answer is B", "answer": "B", "options": {"A": "x", "B": "y"},
     "category": "step1"},
    {"id": "q2", "completion": "<think>r</think>\nThe answer is A or B", "answer": "A", "options": {"A": "x", "B": "y"},
     "category": "step2&3"},
    {"id": "q3", "completion": "<think>r</think>\nThe answer is no", "answer": "no", "labels": ["yes", "no", "maybe"]},
    {"id": "q4", "completion": "<think>r", "answer": "yes", "labels": ["yes", "no", "maybe"]},
]


def _write(tmp_path, rows=ROWS, raw=None):
    path = tmp_path / "preds.jsonl"
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_writes_each_line_with_prediction_status_correct(tmp_path, capsys):
    path = _write(tmp_path)
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(path), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prediction"], r["status"], r["correct"]) for r in rows] == [
        ("B", "ok", True), (None, "hedge", False), ("no", "ok", True), (None, "no_answer", False)]
    assert rows[0]["category"] == "step1"  # the input line is kept whole
    printed = capsys.readouterr().out
    assert "accuracy 50.0%" in printed and "hedge 25.0%" in printed


@pytest.mark.parametrize("raw,expected", [
    (json.dumps(ROWS[0]) + "\n{broken\n", "preds.jsonl:2: malformed JSON"),
    (json.dumps({k: v for k, v in ROWS[0].items() if k != "completion"}) + "\n", "preds.jsonl:1: missing field 'completion'"),
    (json.dumps({**ROWS[0], "answer": "C"}) + "\n", "preds.jsonl:1: field 'answer' is 'C', not one of A, B"),
    (json.dumps({**ROWS[2], "answer": "perhaps"}) + "\n", "preds.jsonl:1: field 'answer'"),
    (json.dumps({k: v for k, v in ROWS[0].items() if k != "options"}) + "\n", "preds.jsonl:1: needs field 'options'"),
])
def test_bad_prediction_lines_exit_2_and_write_nothing(tmp_path, capsys, raw, expected):
    path = _write(tmp_path, raw=raw)
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(path), "--out", str(out)]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert 0.49 < lo < 0.50 and 0.94 < hi < 0.95
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_metrics_mean_over_samples_and_per_category():
    rows = [{"id": "a", "correct": True, "status": "ok", "category": "x", "completion_tokens": 10, "truncated": False},
            {"id": "a", "correct": False, "status": "hedge", "category": "x", "completion_tokens": 20, "truncated": True},
            {"id": "b", "correct": True, "status": "ok", "category": "y", "completion_tokens": 30, "truncated": False},
            {"id": "b", "correct": True, "status": "ok", "category": "y", "completion_tokens": 40, "truncated": False}]
    m = metrics(rows)
    assert m["n"] == 2 and m["samples_per_item"] == 2 and m["accuracy"] == 0.75
    assert m["per_category"] == {"x": {"n": 1, "accuracy": 0.5, "ci95": [0.5, 0.5]},
                                 "y": {"n": 1, "accuracy": 1.0, "ci95": [1.0, 1.0]}}
    assert m["status_rates"]["hedge"] == 0.25 and m["truncation_rate"] == 0.25 and m["mean_completion_tokens"] == 25


def test_per_category_wilson_interval_by_hand():
    rows = [{"id": str(i), "correct": i < 3, "status": "ok", "category": "x"} for i in range(4)]
    rows += [{"id": "y0", "correct": False, "status": "ok", "category": "y"}]
    cat = metrics(rows)["per_category"]
    # Wilson, p = 3/4, n = 4, z = 1.96: centre (0.75 + z^2/8) / (1 + z^2/4), half-width
    # z sqrt(0.75 * 0.25 / 4 + z^2 / 64) / (1 + z^2/4).
    assert cat["x"]["ci95"] == pytest.approx([0.3006, 0.9544], abs=1e-4)
    assert cat["y"]["ci95"][0] == 0.0 and cat["y"]["ci95"][1] == pytest.approx(0.7935, abs=1e-4)
