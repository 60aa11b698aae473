"""The reasoning-quality judge: a real `gazal serve`, a fault server, the cache, the key and the floor."""

import inspect
import json
import logging
import re
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gazal.errors import GazalError
from gazal.judge import FAILURES, Judge, JudgeRequest, load_rubric, parse_reply
from gazal.models import TINY_QWEN3
from gazal.rewards import REWARDS, resolve_reward

OPTS = {"A": "Iron", "B": "Folate", "C": "Vitamin B12", "D": "Vitamin B1"}
QUESTION = "A vegan has macrocytic anaemia and neuropathy. Which deficiency is most likely?"
PROMPT = [{"role": "user", "content": QUESTION + "\n\n" + "\n".join(f"{k}. {v}" for k, v in OPTS.items())}]


def good(mark: int) -> list[dict]:
    """A well-formed completion; [[n]] tells the fault server which score to give."""
    return [{"role": "assistant", "content": (
        f"<think>\n1. Findings: macrocytic anaemia with neuropathy in a vegan [[{mark}]].\n"
        "2. Folate deficiency does not cause neuropathy; B12 deficiency does.\n</think>\nThe answer is C.")}]


def req(mark: int) -> JudgeRequest:
    return JudgeRequest(QUESTION, f"Neuropathy points to B12 [[{mark}]].", "The answer is C.")


class Grader(BaseHTTPRequestHandler):
    """Behaviour by the first path segment: good, slow, 500, garbage (not JSON), prose (not a score)."""

    seen: list[dict] = []
    in_flight = 0
    max_in_flight = 0
    lock = threading.Lock()

    def _reply(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        route = self.path.strip("/").split("/")[0]
        cls = Grader
        with cls.lock:
            cls.seen.append({"route": route, "auth": self.headers.get("Authorization"), "body": body})
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            prompt = body["messages"][0]["content"]
            if route == "slow":
                time.sleep(1.0)
            if route == "500":
                return self._reply(500, b'{"error": {"message": "boom", "type": "server_error"}}')
            if route == "garbage":
                return self._reply(200, b"<html>oops", "text/html")
            time.sleep(0.15)  # long enough for concurrent requests to overlap
            mark = re.search(r"\[\[(\d+)\]\]", prompt)
            content = "The reasoning is sound, 8/10." if route == "prose" else json.dumps(
                {"score": int(mark.group(1)) if mark else 5})
            self._reply(200, json.dumps({
                "id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)
        finally:
            with cls.lock:
                cls.in_flight -= 1

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Grader)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    Grader.seen, Grader.in_flight, Grader.max_in_flight = [], 0, 0
    monkeypatch.delenv("GAZAL_JUDGE_API_KEY", raising=False)


def make(server, route="good", **kw) -> Judge:
    return Judge(f"{server}/{route}/v1", "grader", **{"max_retries": 0, "timeout_s": 5, **kw})


def test_parse_reply_is_strict():
    assert parse_reply('{"score": 7}') == 0.7
    assert parse_reply('  {"score": 10, "why": "uses the findings"}\n') == 1.0
    assert parse_reply('```json\n{"score": 0}\n```') == 0.0
    assert parse_reply('<think>weighing it</think>\n{"score": 4.5}') == 0.45
    for bad in (None, "", "7", "Score: 7", '{"score": 11}', '{"score": -1}', '{"score": true}', '{"score": "7"}',
                '{"score": NaN}', '{"grade": 7}', '[7]', 'The score is {"score": 7}', '{"score": 7} because'):
        assert parse_reply(bad) is None, bad


def test_rubric_default_and_validation(tmp_path):
    assert set(load_rubric().get_identifiers()) == {"question", "reasoning", "answer"}
    (tmp_path / "bad.md").write_text("Grade $reasoning for $patient.")
    (tmp_path / "blind.md").write_text("Grade $answer.")
    (tmp_path / "mine.md").write_text('Case: $question\nReasoning: $reasoning\nReply {"score": N}.')
    for path in (tmp_path / "bad.md", tmp_path / "blind.md", tmp_path / "missing.md"):
        with pytest.raises(GazalError):
            Judge("http://127.0.0.1:1/v1", "m", rubric=path)
    assert Judge("http://127.0.0.1:1/v1", "m", rubric=tmp_path / "mine.md").render(req(3)).startswith(
        f"Case: {QUESTION}\nReasoning: Neuropathy")
    with pytest.raises(ValueError):
        Judge("http://127.0.0.1:1/v1", "m", concurrency=0)


def test_no_api_key_parameter_and_no_request_at_construction(server):
    assert "api_key" not in inspect.signature(Judge).parameters
    assert "api_key" not in inspect.signature(REWARDS["judge"]).parameters
    with pytest.raises(TypeError):
        resolve_reward("judge", {"base_url": f"{server}/good/v1", "model": "grader", "api_key": "sk-x"})
    fn = resolve_reward("judge", {"base_url": f"{server}/good/v1", "model": "grader"})
    assert fn.__name__ == "judge" and Grader.seen == []


def test_scores_in_order_and_concurrently(server):
    judge = make(server, concurrency=4)
    assert judge.grade([req(m) for m in (0, 3, 7, 10)]) == [0.0, 0.3, 0.7, 1.0]
    assert len(Grader.seen) == 4 and Grader.max_in_flight > 1
    body = Grader.seen[0]["body"]
    assert body["model"] == "grader" and body["temperature"] == 0 and QUESTION in body["messages"][0]["content"]
    # Repeats are served from the cache; duplicates in a batch are asked once.
    assert judge.grade([req(3), req(3), req(8), req(8)]) == [0.3, 0.3, 0.8, 0.8]
    assert len(Grader.seen) == 5
    assert judge.last_batch == {"cache_hits": 2, "requests": 1, "duplicates": 1, "graded": 1}


@pytest.mark.parametrize("route,kind", [("slow", "timeout"), ("500", "http_error"), ("garbage", "malformed"),
                                        ("prose", "malformed"), ("closed", "connection_error")])
def test_faults_give_none_and_count_never_raise(server, route, kind):
    base = "http://127.0.0.1:1" if route == "closed" else server
    judge = make(base, route, timeout_s=0.3 if route == "slow" else 5)
    assert judge.grade([req(1), req(2)]) == [None, None]
    assert judge.counts[kind] == 2 and sum(judge.counts[k] for k in FAILURES) == 2
    # A reply that ends by itself in the wrong format is the grader's verdict and is cached; a body
    # that is not a chat completion, and transport failures, are asked again.
    assert judge.grade([req(1)]) == [None]
    cached = route == "prose"
    assert judge.counts["requests"] == 2 + (not cached) and judge.counts["cache_hits"] == cached
    if route != "closed":
        assert len(Grader.seen) == 2 + (not cached)


def test_api_key_comes_from_the_named_env_var(server, monkeypatch, caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="gazal.judge"):
        judge = make(server, cache_path=tmp_path / "c.jsonl")
        judge.grade([req(1)])
        judge.grade([req(2)])
    assert Grader.seen[-1]["auth"] == "Bearer EMPTY"
    assert sum("GAZAL_JUDGE_API_KEY is not set" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setenv("GAZAL_JUDGE_API_KEY", "sk-judge-SECRET-77")
    make(server).grade([req(3)])
    assert Grader.seen[-1]["auth"] == "Bearer sk-judge-SECRET-77"
    monkeypatch.setenv("MY_GRADER_KEY", "sk-other-88")
    make(server, api_key_env="MY_GRADER_KEY").grade([req(4)])
    assert Grader.seen[-1]["auth"] == "Bearer sk-other-88"
    assert "SECRET" not in repr(judge) and "SECRET" not in (tmp_path / "c.jsonl").read_text()


def test_disk_cache_survives_a_new_judge(server, tmp_path):
    path = tmp_path / "cache" / "judge.jsonl"
    assert make(server, cache_path=path).grade([req(6), req(9)]) == [0.6, 0.9]
    assert len(Grader.seen) == 2 and len(path.read_text().splitlines()) == 2
    with path.open("a") as fh:
        fh.write('{"key": "torn')  # a kill mid-write
    again = make(server, cache_path=path)
    assert again.grade([req(9), req(6)]) == [0.9, 0.6]
    assert len(Grader.seen) == 2 and again.counts["cache_hits"] == 2
    assert again.grade([req(5)]) == [0.5]  # appended after the torn line, on a line of its own
    assert make(server, cache_path=path).grade([req(5)]) == [0.5] and len(Grader.seen) == 3
    other = tmp_path / "other.md"
    other.write_text('Grade $reasoning. Reply {"score": N}.')
    assert make(server, cache_path=path, rubric=other).grade([req(5)]) == [0.5]  # another rubric is another key
    assert len(Grader.seen) == 4


def test_reward_floors_ill_formed_without_a_request_and_logs(server):
    fn = resolve_reward("judge", {"base_url": f"{server}/good/v1", "model": "grader", "max_retries": 0})
    echo = [{"role": "assistant", "content": f"<think>{QUESTION}</think>\nThe answer is C."}]
    completions = [good(7), "The answer is C", echo, [{"role": "assistant", "content": "<think>a</think><think>b"
                                                       "</think>The answer is C."}], good(2)]
    logged = {}
    got = fn(completions=completions, prompts=[PROMPT] * 5, options=[OPTS] * 5,
             log_metric=lambda k, v: logged.__setitem__(k, v))
    assert got == [0.7, 0.0, 0.0, 0.0, 0.2]
    assert len(Grader.seen) == 2 and logged == {"gazal/judge_failures": 0.0, "gazal/judge_cache_hits": 0.0}
    assert fn(completions=completions, prompts=[PROMPT] * 5, options=[OPTS] * 5,
              log_metric=lambda k, v: logged.__setitem__(k, v)) == got
    assert len(Grader.seen) == 2 and logged["gazal/judge_cache_hits"] == 2.0
    # The grader sees the prompt, the reasoning and the answer, not the tags.
    content = Grader.seen[0]["body"]["messages"][0]["content"]
    assert QUESTION in content and "<think>" not in content and "The answer is C." in content
    failing = resolve_reward("judge", {"base_url": f"{server}/500/v1", "model": "grader", "max_retries": 0})
    got = failing(completions=[good(7), "bare"], prompts=[PROMPT] * 2, options=[OPTS] * 2,
                  log_metric=lambda k, v: logged.__setitem__(k, v))
    assert got == [None, 0.0] and logged["gazal/judge_failures"] == 1.0


class Proxy(BaseHTTPRequestHandler):
    """Forwards to `gazal serve` and counts what passes."""

    target = ""
    calls = 0
    last = b""

    def do_POST(self):
        Proxy.calls += 1
        data = Proxy.last = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        request = urllib.request.Request(Proxy.target + self.path, data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            body, status = resp.read(), resp.status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_against_a_real_gazal_serve(tmp_path):
    """The tiny random model writes gibberish: every grade is malformed, None, counted, and nothing crashes."""
    serve = subprocess.Popen([sys.executable, "-m", "gazal", "serve", "--model", TINY_QWEN3, "--name", "tiny",
                              "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        found = None
        while not found:  # the first start builds the tiny model, whose tokenizer training prints first
            line = serve.stdout.readline()
            assert line, "gazal serve exited before serving"
            found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        Proxy.target, Proxy.calls = found.group(1), 0
        fn = resolve_reward("judge", {"base_url": f"http://127.0.0.1:{proxy.server_address[1]}/v1", "model": "tiny",
                                      "max_tokens": 8, "timeout_s": 60, "max_retries": 0,
                                      "cache_path": str(tmp_path / "judge.jsonl")})
        logged = {}
        got = fn(completions=[good(1), good(2), "bare"], prompts=[PROMPT] * 3, options=[OPTS] * 3,
                 log_metric=lambda k, v: logged.__setitem__(k, v))
        assert got == [None, None, 0.0] and Proxy.calls == 2
        assert fn.judge.counts["malformed"] == 2 and logged == {"gazal/judge_failures": 2.0,
                                                                 "gazal/judge_cache_hits": 0.0}
        body = json.loads(Proxy.last)
        assert body["model"] == "tiny" and QUESTION in body["messages"][0]["content"]
        # Its replies stop at max_tokens (finish_reason "length"): not a verdict, so not cached, and the
        # same inputs are asked again (a grader given more room may answer); nothing is written.
        again = fn(completions=[good(1), good(2), "bare"], prompts=[PROMPT] * 3, options=[OPTS] * 3,
                   log_metric=lambda k, v: logged.__setitem__(k, v))
        assert again == got and Proxy.calls == 4 and logged["gazal/judge_cache_hits"] == 0.0
        assert fn.judge.counts["malformed"] == 4 and not (tmp_path / "judge.jsonl").exists()
    finally:
        serve.kill()
        serve.wait()
        proxy.shutdown()
        proxy.server_close()
