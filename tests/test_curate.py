"""`gazal data curate` and the shipped seed data: validation, duplicates, decontamination."""

import collections
import json
from pathlib import Path

import pytest

from gazal.cli import main
from gazal.data import load_grpo_items, load_sft_rows, seed_path


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(case: str, reasoning: str = "1. Findings point one way. 2. Alternatives are less likely. 3. Conclusion.",
         answer: str = "The answer is A.") -> dict:
    return {"case": case, "reasoning": reasoning, "answer": answer}


def _curate(tmp_path, rows, *extra, benchmarks=None):
    src = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["data", "curate", str(src), "--out", str(out), *extra]
    if benchmarks:
        args += ["--benchmarks", str(benchmarks)]
    code = main(args)
    kept = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else None
    report = json.loads(out.with_suffix(".report.json").read_text()) if out.is_file() else None
    return code, kept, report


def test_planted_benchmark_questions_are_caught_verbatim_and_lightly_edited(tmp_path, benchmarks_dir):
    medqa = [json.loads(line) for line in (benchmarks_dir / "medqa_test.jsonl").read_text().splitlines()[:3]]
    pubmed = json.loads((benchmarks_dir / "pubmedqa_test.jsonl").read_text().splitlines()[7])
    verbatim = {"question": medqa[0]["question"], "options": medqa[0]["options"], "answer": medqa[0]["answer"]}
    words = medqa[1]["question"].split()
    for i in range(0, len(words), 12):  # about one word in twelve changed
        words[i] = "person" if words[i].lower() == "patient" else "patient"
    edited = _sft(" ".join(words))
    hidden = _sft("Consider this study. " + pubmed["question"] + " " + pubmed["context"][:600])
    clean = [json.loads(line) for line in seed_path("seed:sft").read_text().splitlines()[:20]]
    code, kept, report = _curate(tmp_path, [verbatim, *clean[:10], edited, hidden, *clean[10:]],
                                 benchmarks=benchmarks_dir)
    assert code == 0 and report["dropped"]["contaminated"] == 3 and len(kept) == 20
    details = [e["detail"] for e in report["examples"]["contaminated"]]
    assert "medqa_test.jsonl:1 " in details[0] and "medqa_test.jsonl:2 " in details[1] and "pubmedqa" in details[2]


@pytest.mark.parametrize("name", ["seed:sft", "seed:grpo"])
def test_shipped_seed_data_has_zero_benchmark_hits(tmp_path, benchmarks_dir, name):
    rows = [json.loads(line) for line in seed_path(name).read_text().splitlines()]
    code, kept, report = _curate(tmp_path, rows, benchmarks=benchmarks_dir)
    assert code == 0 and report["dropped"]["contaminated"] == 0, report["examples"]
    assert len(kept) == len(rows), report["dropped"]  # and nothing else to drop either


def test_schema_length_and_duplicates_are_dropped_with_reasons(tmp_path):
    base = ("A 54-year-old man with hypertension and type 2 diabetes has had crushing central chest pain radiating "
            "to the left arm for forty minutes, with sweating and nausea. Blood pressure is 150/90 mmHg and pulse 104 "
            "per minute. The ECG shows ST-segment elevation in leads V1 to V4. What is the most likely diagnosis?")
    rows = [
        _sft(base),
        _sft(base),  # exact duplicate
        _sft(base.replace("forty", "fifty")),  # near duplicate
        {"case": "x", "answer": "y"},  # schema: no reasoning
        {"question": "Which drug?", "options": {"A": "a", "B": "b"}, "answer": "C"},  # schema: answer not an option
        _sft("A short one.", reasoning="Too short."),
        _sft("An unrelated case of a child with a barking cough and stridor at night after a cold."),
    ]
    code, kept, report = _curate(tmp_path, rows)
    assert code == 0 and len(kept) == 2
    assert report["dropped"] == {"schema": 2, "review_rejected": 0, "too_short": 1, "too_long": 0, "exact_duplicate": 1,
                                 "near_duplicate": 1, "contaminated": 0, "judge_rejected": 0}
    assert "reasoning" in report["examples"]["schema"][0]["detail"]
    assert "not one of the options" in report["examples"]["schema"][1]["detail"]
    md = (tmp_path / "out.report.md").read_text()
    assert "| near_duplicate | 1 |" in md and "decontamination was not checked" in md


def test_malformed_line_exits_2_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(_sft("case one")) + "\n{broken\n")
    out = tmp_path / "out.jsonl"
    assert main(["data", "curate", str(src), "--out", str(out)]) == 2
    assert "in.jsonl:2" in capsys.readouterr().err and not out.exists()


def test_seed_sets_are_big_balanced_and_well_formed():
    sft = load_sft_rows("seed:sft")
    raw = [json.loads(line) for line in seed_path("seed:sft").read_text().splitlines()]
    assert len(sft) >= 240
    counts = collections.Counter(r["category"] for r in raw)
    assert set(counts) == {"diagnostic", "uncertainty", "treatment", "prognosis"} and min(counts.values()) >= 60
    assert all(r["reasoning"].lstrip().startswith("1.") for r in raw)  # structured clinical steps
    items = load_grpo_items("seed:grpo")
    assert len(items) >= 200 and len({it.id for it in items}) == len(items)
    assert all(len(it.options) in (4, 5) and it.answer in it.options and it.category for it in items)
    letters = collections.Counter(it.answer for it in items)
    assert max(letters[x] for x in "ABCD") < 2 * min(letters[x] for x in "ABCD")  # no letter bias to learn


def test_judge_endpoint_drops_rows_it_calls_incorrect(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Judge(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            verdict = "INCORRECT." if "Stated answer: The answer is D" in body["messages"][0]["content"] else "CORRECT"
            out = json.dumps({"id": "j", "object": "chat.completion", "created": 0, "model": "judge", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": verdict}, "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = [json.loads(line) for line in seed_path("seed:sft").read_text().splitlines()[:3]]
    rows[1] = {**rows[1], "answer": "The answer is D."}  # a wrong key planted in one row
    try:
        code, kept, report = _curate(tmp_path, rows, f"curate.judge_base_url=http://127.0.0.1:{server.server_address[1]}/v1")
    finally:
        server.shutdown()
    assert code == 0 and report["dropped"]["judge_rejected"] == 1 and len(kept) == 2 and report["judge"]
