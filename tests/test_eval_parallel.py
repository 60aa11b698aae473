"""Data-parallel evaluation: two CPU processes under torchrun evaluate their shares of the fixed
batches, the main process merges; the result equals one process's item for item, and a run
killed mid-way resumes (with the same two processes) to the same rows, none lost or repeated."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gazal.cli import main
from gazal.errors import GazalError
from gazal.models import TINY_QWEN3, resolve_model

ARGS = ["model.name_or_path=gazal:tiny-qwen3", "eval.benchmarks=[medqa, pubmedqa]", "eval.limit=24",
        "eval.batch_size=2", "eval.max_new_tokens=16", "eval.modes=[reasoning, direct]", "eval.direct_max_new_tokens=4",
        # One fixed batch per call, so a kill lands between batches (packing is tested on its own below).
        "eval.generation_batch_size=null"]
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


def test_vllm_replicas_get_their_own_gpus_and_shares(tmp_path, benchmarks_dir, monkeypatch):
    """`eval.vllm_data_parallel_size` starts one `python -m gazal.evaluate` per replica, each with its
    own tensor-parallel GPUs and share; a replica writes only its own batches. (No GPU here: the
    subprocesses are recorded, and one replica's entry point runs with the transformers backend.)"""
    from gazal import evaluate, rundir
    from gazal.recipes import load_recipe

    started = []

    class Proc:
        def __init__(self, cmd, env=None, **_):
            started.append((cmd, env))

        def wait(self):
            return 0

    with monkeypatch.context() as m:  # only here: other code (platform) runs subprocesses too
        m.setattr(evaluate.subprocess, "Popen", Proc)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
        recipe = load_recipe("demo", ["eval.backend=vllm", "eval.vllm_data_parallel_size=4",
                                      "eval.vllm_tensor_parallel_size=2"])
        evaluate._replicas(recipe, tmp_path, tmp_path / "eval")
        assert [(env[evaluate.SHARD_ENV], env["CUDA_VISIBLE_DEVICES"]) for _, env in started] == [
            ("0/4", "0,1"), ("1/4", "2,3"), ("2/4", "4,5"), ("3/4", "6,7")]
        assert all(cmd[1:] == ["-m", "gazal.evaluate", str(tmp_path), str(tmp_path / "eval")] for cmd, _ in started)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
        with pytest.raises(GazalError, match="needs 8 GPUs"):
            evaluate._replicas(recipe, tmp_path, tmp_path / "eval")

    # One replica's entry point: share 1 of 2 writes the odd batches only, to parts/1.jsonl.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    run = tmp_path / "run"
    recipe = load_recipe("demo", ["model.name_or_path=gazal:tiny-qwen3", f"eval.benchmarks_dir={benchmarks_dir}",
                                  "eval.benchmarks=[pubmedqa]", "eval.limit=8", "eval.batch_size=2",
                                  "eval.max_new_tokens=4", "eval.modes=[reasoning]"])
    rundir.prepare(run, recipe)
    out = rundir.start_stage(run, "eval", recipe)
    (out / "model.txt").write_text(resolve_model(TINY_QWEN3) + "\n")
    monkeypatch.setenv(evaluate.SHARD_ENV, "1/2")
    evaluate._replica_main(str(run), str(out))
    items = evaluate.benchmark_items(recipe)["pubmedqa"]
    odd = {it.id for b, batch in enumerate(evaluate.batches(items, recipe, "reasoning")) if b % 2 for it in batch}
    rows = [json.loads(x) for x in (out / "pubmedqa" / "parts" / "1.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == odd and len(rows) == 4
    assert not (out / "pubmedqa" / "parts" / "0.jsonl").exists()


def test_greedy_batches_of_every_benchmark_share_generate_calls_and_score_the_same(tmp_path, benchmarks_dir,
                                                                                   monkeypatch):
    from gazal.generation import TransformersGenerator

    calls = []
    real = TransformersGenerator.generate
    monkeypatch.setattr(TransformersGenerator, "generate",
                        lambda self, conv, decoding=None, seed=0: calls.append(len(conv)) or real(self, conv, decoding, seed))
    args = ["eval.limit=6", "eval.max_new_tokens=8", "eval.direct_max_new_tokens=4"]
    assert main([*_cmd(tmp_path / "one", benchmarks_dir), *args, "eval.generation_batch_size=null"]) == 0
    unpacked, calls[:] = list(calls), []
    assert main([*_cmd(tmp_path / "packed", benchmarks_dir), *args, "eval.generation_batch_size=5"]) == 0
    # 6 items a benchmark in batches of 2: 3 + 3 batches a mode; reasoning packed in calls of at most 5
    # sequences, consecutive batches whatever their benchmark: 2+2, 2+2 (medqa's last, pubmedqa's first),
    # 2+2; direct answers (prompt-bound) one batch a call.
    assert unpacked == [2] * 12 and calls == [4] * 3 + [2] * 6
    for name in NAMES:
        for mode in ("", "direct"):
            one, packed = _samples(tmp_path / "one", name, mode), _samples(tmp_path / "packed", name, mode)
            assert [r["id"] for r in one] == [r["id"] for r in packed] and len(one) == 6
            assert [r["completion"] for r in one] == [r["completion"] for r in packed]
    # Sampled decoding keeps one seeded call per fixed batch.
    calls[:] = []
    assert main([*_cmd(tmp_path / "sampled", benchmarks_dir), *args, "eval.generation_batch_size=5",
                 "eval.temperature=0.7", "eval.modes=[reasoning]"]) == 0
    assert calls == [2] * 6


def test_a_generation_batch_below_one_fixed_batch_is_refused(capsys):
    assert main(["validate", "--config", "demo", "eval.batch_size=8", "eval.generation_batch_size=4"]) == 2
    assert "eval.generation_batch_size=4 is below one fixed batch" in capsys.readouterr().err
