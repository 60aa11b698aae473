"""`gazal data synth` against `gazal serve` and a faulty teacher: faults, kill and resume, and secrets
(`gazal serve` itself: tests/test_serve.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gazal import recipes, synth
from gazal.cli import main
from gazal.models import TINY_QWEN3

GOOD = ("CASE:\nA 30-year-old woman has fever and dysuria.\nA. Cystitis\nB. Pyelonephritis\n\n"
        "REASONING:\n1. Key findings: fever with dysuria.\n2. Conclusion: upper tract infection.\n\n"
        "ANSWER:\nThe answer is B.")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _synth_recipe(base_url: str, out: Path, **over):
    items = {"synth.base_url": base_url, "synth.model": "tiny", "synth.output_dir": str(out),
             "synth.specialties": "[cardiology, neurology]", "synth.care_settings": "[clinic]",
             "synth.patient_profiles": "[an adult]", "synth.complexities": "[simple]", "synth.max_tokens": 8,
             "synth.concurrency": 1, "synth.timeout_s": 30, **over}
    return [f"{k}={v}" for k, v in items.items()]


def test_seeds_are_deterministic_and_keys_unique():
    cfg = recipes.load_recipe("demo", ["synth.num_items=500"]).synth
    a, b = synth.seeds(cfg, 1), synth.seeds(cfg, 1)
    assert [s.key for s in a] == [s.key for s in b]
    assert len({s.key for s in a}) == 500
    assert [s.key for s in synth.seeds(cfg, 2)] != [s.key for s in a]


def test_parse_example():
    assert synth.parse_example(GOOD)["answer"] == "The answer is B."
    for bad in ("", "CASE:\nx\n\nANSWER:\ny", "CASE:\nx\nREASONING:\nno steps\nANSWER:\ny"):
        with pytest.raises(ValueError):
            synth.parse_example(bad)


def test_synth_against_gazal_serve_survives_a_kill(tmp_path):
    """A real `gazal serve` on the tiny model as teacher; synth killed mid-run, then resumed."""
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-SECRET-4242"}
    serve = subprocess.Popen([sys.executable, "-m", "gazal", "serve", "--model", TINY_QWEN3, "--name", "tiny",
                              "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        found = None
        while not found:  # a first start builds the tiny model, whose tokenizer training prints first
            line = serve.stdout.readline()
            assert line, "gazal serve exited before serving"
            found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        base_url = found.group(1)
        out = tmp_path / "synth"
        args = ["data", "synth", "--config", "demo", *_synth_recipe(base_url, out, **{"synth.num_items": 12})]
        # The tiny random model never writes a well-formed case, so every item ends as a recorded
        # failure after its attempts: the run is about bookkeeping, which is what a kill can break.
        proc = subprocess.Popen([sys.executable, "-m", "gazal", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and sum(r.get("final", False) for r in _rows(out / "failures.jsonl")) < 3:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = sum(r.get("final", False) for r in _rows(out / "failures.jsonl"))
        assert 3 <= first < 12 and not (out / "manifest.json").exists()
        assert main(args) == 0
    finally:
        serve.kill()
        serve.wait()
    finals = [r["key"] for r in _rows(out / "failures.jsonl") if r.get("final")]
    items = [r["key"] for r in _rows(out / "items.jsonl")]
    done = finals + items
    assert len(done) == len(set(done)) == 12  # no duplicates, nothing lost
    assert set(done) == {s.key for s in synth.seeds(recipes.load_recipe("demo", args[4:]).synth, 42)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["items"] + manifest["failed"] == 12 and manifest["tokens_this_run"]["completion"] > 0
    for path in out.iterdir():
        assert "SECRET-4242" not in path.read_text()


class Faulty(BaseHTTPRequestHandler):
    """A teacher that answers 429, 500, garbage, nothing, a malformed case, then well-formed cases."""

    script = ["429", "500", "garbage", "hang", "malformed"]
    calls: list[str] = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        step = Faulty.script[len(Faulty.calls)] if len(Faulty.calls) < len(Faulty.script) else "good"
        Faulty.calls.append(step)
        if step in ("429", "500"):
            self.send_response(int(step))
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "busy"}}')
            return
        if step == "hang":
            time.sleep(3)
            return
        content = {"good": GOOD, "malformed": "I cannot write that case."}.get(step)
        body = b"<html>oops" if step == "garbage" else json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_synth_retries_faults_records_malformed_and_accounts_cost(tmp_path, capsys):
    Faulty.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Faulty)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "synth"
        args = ["data", "synth", "--config", "demo",
                *_synth_recipe(f"http://127.0.0.1:{server.server_address[1]}/v1", out, **{
                    "synth.num_items": 2, "synth.timeout_s": 1, "synth.max_retries": 5,
                    "synth.malformed_retries": 3, "synth.price_per_1k_completion_tokens": 2.0})]
        assert main(args) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert Faulty.calls[:5] == Faulty.script  # every fault was met and got past
    items = _rows(out / "items.jsonl")
    assert len(items) == 2 and len({r["key"] for r in items}) == 2
    assert items[0]["case"].startswith("A 30-year-old") and items[0]["answer"] == "The answer is B."
    failures = _rows(out / "failures.jsonl")
    assert any("malformed" in f["error"] and not f["final"] for f in failures)
    assert all(not f["final"] for f in failures)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["items"] == 2 and manifest["failed"] == 0
    assert manifest["cost_this_run"] == pytest.approx(manifest["tokens_this_run"]["completion"] * 2.0 / 1000)
    # Items come out in Gazal's SFT shape: the SFT loader reads them as they are.
    from gazal.data import load_sft_rows

    assert len(load_sft_rows(str(out / "items.jsonl"))) == 2
