"""Physician review: export a stratified package, import verdicts (CSV or the form's JSON), validate
them, count agreement, and curate a data file with the drop list."""

import csv
import json
from pathlib import Path

import pytest

from gazal import review
from gazal.cli import main

SEED_SFT = Path(review.__file__).parent / "seed" / "sft.jsonl"


def _fill(path: Path, verdicts: dict[str, str], edit: dict[str, str] | None = None) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["verdict"] = verdicts.get(r["id"], "")
        r["comment"] = "checked"
        r.update((edit or {}).get(r["id"], {}))
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


@pytest.fixture
def data_package(tmp_path):
    data = tmp_path / "cases.jsonl"
    data.write_text("".join(SEED_SFT.read_text().splitlines(keepends=True)[:12]))
    pkg = tmp_path / "pkg"
    assert main(["review", "export", str(data), "--out", str(pkg), "-n", "8", "--seed", "3"]) == 0
    return data, pkg


def test_data_file_round_trip_and_curate_drops_what_the_reviewer_rejected(data_package, tmp_path):
    data, pkg = data_package
    ids = [r["id"] for r in csv.DictReader((pkg / "review.csv").open())]
    assert len(ids) == 8 == len(set(ids)) and (pkg / "review.html").is_file()
    # Every category of the file is in the sample (stratified), in a seeded order.
    cats = {json.loads(x)["category"] for x in data.read_text().splitlines()}
    assert {r["category"] for r in csv.DictReader((pkg / "review.csv").open())} == cats
    verdicts = {ids[0]: "incorrect", ids[1]: "unsafe", ids[2]: "incorrect", **{i: "correct" for i in ids[3:]}}
    _fill(pkg / "review.csv", verdicts)
    assert main(["review", "import", str(pkg), str(pkg / "review.csv")]) == 0
    result = json.loads((pkg / "review.json").read_text())
    assert result["verdicts"] == {"correct": 5, "incorrect": 2, "unsafe": 1}
    assert result["drop"] == [ids[0], ids[1], ids[2]] and result["unsafe_ids"] == [ids[1]]
    assert result["agreement_rate"] is None  # a data file has no automatic grading
    out = tmp_path / "curated.jsonl"
    assert main(["data", "curate", str(data), "--out", str(out), "--drop-list", str(pkg / "review.json")]) == 0
    kept = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["dropped"]["review_rejected"] == 3 and not set(kept) & {ids[0], ids[1], ids[2]}
    assert len(kept) == 12 - 3 - sum(n for k, n in report["dropped"].items() if k != "review_rejected")


def test_the_forms_json_is_accepted(data_package):
    _, pkg = data_package
    ids = [r["id"] for r in json.loads((pkg / "manifest.json").read_text())["rows"]]
    saved = pkg / "verdicts.json"
    saved.write_text(json.dumps({i: {"verdict": "unsafe" if n == 0 else "correct", "comment": ""}
                                 for n, i in enumerate(ids)}))
    assert main(["review", "import", str(pkg), str(saved)]) == 0
    assert json.loads((pkg / "review.json").read_text())["verdicts"] == {"correct": 7, "incorrect": 0, "unsafe": 1}


@pytest.mark.parametrize("change,message", [
    ("unknown", "field 'id': 'sft-9999' is not a case of this package"),
    ("missing", "field 'verdict' is empty for"),
    ("bad", "field 'verdict': 'maybe' is not one of correct, incorrect, unsafe"),
    ("edited", "field 'question' of"),
])
def test_bad_verdicts_are_refused_naming_the_row(data_package, capsys, change, message):
    _, pkg = data_package
    ids = [r["id"] for r in csv.DictReader((pkg / "review.csv").open())]
    verdicts = {i: "correct" for i in ids}
    edit = {}
    if change == "missing":
        verdicts[ids[2]] = ""
    elif change == "bad":
        verdicts[ids[2]] = "maybe"
    elif change == "edited":
        edit = {ids[2]: {"question": "A different case."}}
    elif change == "unknown":
        edit = {ids[2]: {"id": "sft-9999"}}
    _fill(pkg / "review.csv", verdicts, edit)
    assert main(["review", "import", str(pkg), str(pkg / "review.csv")]) == 2
    err = capsys.readouterr().err
    assert message in err and "review.csv: row 3 (line " in err  # the third case
    assert not (pkg / "review.json").exists()


def test_stratified_sample_draws_every_stratum_before_repeating_one():
    rows = [{"id": str(i), "category": "a" if i < 6 else "b", "auto_correct": i % 3 == 0} for i in range(12)]
    chosen = review.stratified(rows, 4, seed=1)
    assert {(r["category"], r["auto_correct"]) for r in chosen} == {("a", True), ("a", False), ("b", True), ("b", False)}
    assert [r["id"] for r in review.stratified(rows, 4, seed=1)] == [r["id"] for r in chosen]
    assert len(review.stratified(rows, 50, seed=1)) == 12


def test_a_drop_list_that_is_not_a_data_review_is_refused(tmp_path, capsys):
    bad = tmp_path / "review.json"
    bad.write_text('{"drop": null}')
    assert main(["data", "curate", str(SEED_SFT), "--out", str(tmp_path / "o.jsonl"), "--drop-list", str(bad)]) == 2
    assert "field 'drop' missing" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()
    bad.write_text("{broken")
    assert main(["data", "curate", str(SEED_SFT), "--out", str(tmp_path / "o.jsonl"), "--drop-list", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
