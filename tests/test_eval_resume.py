"""A really killed evaluation (SIGKILL mid-run) resumes to the numbers of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

from gazal.cli import main

ARGS = ["model.name_or_path=gazal:tiny-qwen3", "eval.benchmarks=[medqa, pubmedqa]", "eval.limit=40",
        "eval.batch_size=2", "eval.max_new_tokens=24"]


def _eval_cmd(run_dir, benchmarks_dir):
    return ["eval", "--config", "demo", "--run-dir", str(run_dir), f"eval.benchmarks_dir={benchmarks_dir}", *ARGS]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, benchmarks_dir):
    killed = tmp_path / "killed"
    # Rows land in the process's part file as each batch completes; samples.jsonl is the merge.
    samples = killed / "eval" / "medqa" / "parts" / "0.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "gazal", *_eval_cmd(killed, benchmarks_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 600  # generous: a loaded machine starts the subprocess slowly
    while time.time() < deadline and proc.poll() is None:
        if samples.is_file() and len(samples.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "evaluation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(samples.read_text().splitlines())
    assert 4 <= done_before < 40 and not (killed / "eval" / "DONE").exists()

    assert main(_eval_cmd(killed, benchmarks_dir)) == 0
    fresh = tmp_path / "fresh"
    assert main(_eval_cmd(fresh, benchmarks_dir)) == 0

    a = json.loads((killed / "eval" / "results.json").read_text())["benchmarks"]
    b = json.loads((fresh / "eval" / "results.json").read_text())["benchmarks"]
    assert a == b
    assert not list((killed / "eval" / "medqa" / "parts").glob("*.jsonl"))  # merged, then removed
    for name in ("medqa", "pubmedqa"):
        rows_a = {r["id"]: r for r in map(json.loads, (killed / "eval" / name / "samples.jsonl").read_text().splitlines())}
        rows_b = {r["id"]: r for r in map(json.loads, (fresh / "eval" / name / "samples.jsonl").read_text().splitlines())}
        assert rows_a == rows_b and len(rows_a) == 40
