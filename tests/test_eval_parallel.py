"""Data-parallel evaluation: two CPU processes under torchrun evaluate their shares of the fixed
batches, the main process merges; the result equals one process's item for item, and a run
killed mid-way resumes (with the same two processes) to the same rows, none lost or repeated."""

import json
import os
import signal
import subprocess
import sys
import time

from gazal.cli import main
from gazal.models import TINY_QWEN3, resolve_model

ARGS = ["model.name_or_path=gazal:tiny-qwen3", "eval.benchmarks=[medqa, pubmedqa]", "eval.limit=24",
        "eval.batch_size=2", "eval.max_new_tokens=16", "eval.modes=[reasoning, direct]", "eval.direct_max_new_tokens=4"]
NAMES = ("medqa", "pubmedqa")


def _cmd(run_dir, benchmarks_dir):
    return ["eval", "--config", "demo", "--run-dir", str(run_dir), f"eval.benchmarks_dir={benchmarks_dir}", *ARGS]


def _torchrun(run_dir, benchmarks_dir) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             "-m", "gazal", *_cmd(run_dir, benchmarks_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _samples(run_dir, name, mode=""):
    path = run_dir / "eval" / name / mode / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_equal_one_and_resume_after_a_kill(tmp_path, benchmarks_dir):
    resolve_model(TINY_QWEN3)  # built once here, not raced by two ranks
    single = tmp_path / "single"
    assert main(_cmd(single, benchmarks_dir)) == 0

    started = time.time()
    proc = _torchrun(tmp_path / "parallel", benchmarks_dir)
    out, _ = proc.communicate(timeout=600)
    parallel_s = time.time() - started
    assert proc.returncode == 0, out[-4000:]
    print(f"two-process evaluation: {parallel_s:.1f} s")

    # Killed once both processes have written rows: the whole process group, as a scheduler would.
    killed = tmp_path / "killed"
    proc = _torchrun(killed, benchmarks_dir)
    parts = killed / "eval" / "medqa" / "parts"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if all((parts / f"{r}.jsonl").is_file() and len((parts / f"{r}.jsonl").read_text().splitlines()) >= 2
               for r in (0, 1)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "evaluation finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "eval" / "DONE").exists()
    before = sum(len((parts / f"{r}.jsonl").read_text().splitlines()) for r in (0, 1))
    assert 4 <= before < 24
    proc = _torchrun(killed, benchmarks_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "resuming" in out

    for run in (tmp_path / "parallel", killed):
        a = json.loads((single / "eval" / "results.json").read_text())
        b = json.loads((run / "eval" / "results.json").read_text())
        assert b["processes"] == 2 and a["processes"] == 1
        assert a["benchmarks"] == b["benchmarks"]
        for name in NAMES:
            for mode in ("", "direct"):
                rows = _samples(run, name, mode)
                assert rows == _samples(single, name, mode)  # item for item, in item order
                assert len(rows) == len({r["id"] for r in rows}) == 24  # none lost, none repeated
            assert not list((run / "eval" / name / "parts").glob("*.jsonl"))
