"""`gazal validate` reads the recipe's data files with the loaders' checks (issue 26)."""

import json

import pytest

from gazal.cli import main

SFT = {"case": "A 60-year-old with chest pain.", "reasoning": "1. Findings: ...", "answer": "The answer is B."}
GRPO = {"question": "Which drug?", "options": {"A": "Aspirin", "B": "Heparin"}, "answer": "B"}


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("key,rows,expected", [
    ("data.sft", [SFT, "{broken"], ":2: malformed JSON"),
    ("data.sft", [SFT, SFT, {k: v for k, v in SFT.items() if k != "answer"}], ":3: missing field 'answer'"),
    ("data.sft", [{**SFT, "reasoning": "  "}], ":1: field 'reasoning' is empty"),
    ("data.grpo", [GRPO, {**GRPO, "answer": "C"}], ":2: field 'answer' is 'C', not one of the options A, B"),
    ("data.grpo", [{**GRPO, "answer": ""}], ":1: field 'answer' is empty"),
])
def test_validate_refuses_a_bad_row_naming_file_line_and_field(tmp_path, capsys, key, rows, expected):
    path = _write(tmp_path / "bad.jsonl", rows)
    assert main(["validate", "--config", "demo", f"{key}={path}"]) == 2
    err = capsys.readouterr().err
    assert f"{key}" in err and f"{path}{expected}" in err and "valid recipe" not in err


def test_validate_reports_what_it_read_and_what_it_could_not(tmp_path, capsys):
    sft = _write(tmp_path / "sft.jsonl", [SFT] * 3)
    assert main(["validate", "--config", "demo", f"data.sft={sft}"]) == 0
    out = capsys.readouterr().out
    assert f"data.sft.0: {sft}: 3 rows checked" in out and "data.grpo: seed:grpo: 220 rows checked" in out
    # A hub source is not downloaded: validation says so instead of passing it silently.
    assert main(["validate", "--config", "demo", "data.sft=someone/some-dataset"]) == 0
    assert "data.sft.0: someone/some-dataset: not checked (a hub dataset" in capsys.readouterr().out


def test_a_disabled_stage_data_is_not_read(tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", ["{broken"])
    assert main(["validate", "--config", "demo", f"data.grpo={bad}", "grpo.enabled=false"]) == 0
