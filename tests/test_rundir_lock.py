"""One writer per run directory: a second writer is refused at once, readers are not, and a killed
writer's lock file never blocks the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gazal import recipes, rundir
from gazal.cli import main
from gazal.errors import GazalError

# Takes the lock as `gazal` does, says so, and holds it until killed.
HOLD = """
import sys, time
from pathlib import Path
from gazal import rundir
rundir.lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def held(tmp_path):
    """A run directory whose lock another process holds; yields (run directory, that process)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("command", ["eval", "sft", "run"])
def test_second_writer_is_refused_naming_the_holder(held, command, capsys):
    run, proc = held
    start = time.monotonic()
    assert main([command, "--config", "demo", "--run-dir", str(run)]) == 2
    assert time.monotonic() - start < 10  # refused before any model or data loads
    err = capsys.readouterr().err
    assert str(run) in err and f"pid {proc.pid}" in err and "-c" in err and "since" in err
    assert not (run / "recipe.yaml").exists()  # nothing written into the holder's directory


def test_readers_are_not_refused(held, capsys):
    run, _ = held
    rundir.dump_recipe(recipes.load_recipe("demo"), run / "recipe.yaml")  # as the holder's prepare would
    assert main(["report", "--run-dir", str(run)]) == 0
    assert (run / "report.md").is_file()


def test_other_ranks_neither_lock_nor_refuse(held, monkeypatch):
    run, _ = held
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rundir.lock(run)  # rank 1 under torchrun: the main process holds the lock for the launch


def test_a_killed_writer_leaves_no_stale_lock(held):
    run, proc = held
    with pytest.raises(GazalError, match=f"pid {proc.pid}"):
        rundir.lock(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert str(proc.pid) in (run / rundir.LOCK_FILE).read_text()  # the dead holder's file is still there
    start = time.monotonic()
    rundir.lock(run)
    try:
        assert time.monotonic() - start < 1
        assert f'"pid": {os.getpid()}' in (run / rundir.LOCK_FILE).read_text()
        rundir.lock(run)  # again in the same process: already held, not refused
    finally:
        rundir.unlock(run)


def test_lock_creates_the_directory_and_unlock_frees_it(tmp_path: Path):
    run = tmp_path / "new" / "run"
    rundir.lock(run)
    rundir.unlock(run)
    assert (run / rundir.LOCK_FILE).is_file()
    proc = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", ""), str(run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "locked", proc.stderr[-2000:]
