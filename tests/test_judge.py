"""The reasoning-quality judge: a stand-in grader that reads the rubric, faults, a real `gazal serve`,
the cache, the key and the floor.

The stand-in grader (`stand_in`) does what a grader is asked to do, literally: it finds the
case, the reasoning and the final answer between the rubric's tags, reads the rubric's numbered
checklist, applies one deterministic check for each question it recognises there and scores the
mean. It knows no medicine (its "true" check only catches values the case does not state), but a
rubric that loses a question, placeholders left unfilled or a reply parser that breaks change its
verdicts, and the tests below fail.
"""

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
from gazal.judge import FAILURES, Judge, JudgeRequest, default_rubric_path, load_rubric, parse_reply
from gazal.models import TINY_QWEN3
from gazal.rewards import REWARDS, resolve_reward

# -- the stand-in grader ---------------------------------------------------------------------------

_SECTION = {name: re.compile(rf"<{name}>\n(.*?)\n</{name}>", re.DOTALL)
            for name in ("case", "reasoning", "final_answer")}
_ITEM = re.compile(r"^ {0,3}\d+\.\s+(.+?)(?=^ {0,3}\d+\.\s|\n\s*\n|\Z)", re.DOTALL | re.MULTILINE)
_OPTION = re.compile(r"^([A-J])\. (.+)$", re.MULTILINE)
_STOP = frozenset("""about also answer because before best between case cause causes clear conclusion could
considered diagnosis differential does each either every explain explains feature features finding findings
first from give gives given have here history into key less likely more most much must next only option
options other over point points process rather should shows since some such than that their them then there
therefore these they this those through under well what when where which while will with within without
would year years old""".split())
_REASON = re.compile(r"\b(because|since|given|as it|causes?|gives?|shows?|would|does not|do not|doesn't|without|"
                     r"lacks?|whereas|rather than|explains?|argues?|against|raises?|produces?|typically|usually|not)\b")
_VERDICT = frozenset("unlik likel less more ruled exclu here option answe candi consi".split())
_COMPARATOR = re.compile(r"(over|above|below|under|than|least|within|up to|about|roughly|around|approximately|"
                         r"[<>])\s*$")


def _stems(text: str) -> set[str]:
    """Content words cut to five letters (hypertensive meets hypertension); alphanumerics (B12) whole."""
    out = set()
    for w in re.findall(r"[a-z][a-z0-9]*", text.lower()):
        if any(ch.isdigit() for ch in w):
            out.add(w)
        elif len(w) >= 4 and w not in _STOP:
            out.add(w[:5])
    return out


def _units(text: str) -> list[str]:
    parts = re.split(r"\n+|(?<=[.?!])\s+|;\s*", text)
    return [re.sub(r"^\s*\d+\.\s*", "", p).strip() for p in parts if len(p.split()) >= 2]


def _naming(options: dict[str, str]) -> dict[str, set[str]]:
    """What names each option: its words that no other option has."""
    stems = {k: _stems(v) for k, v in options.items()}
    return {k: (s - set().union(*(o for j, o in stems.items() if j != k))) or s for k, s in stems.items()}


def discriminates(reasoning: str, question: str, options: dict, letter: str) -> float:
    """Share of the rival options named (by their words, not a letter) in a clause that gives a reason
    of its own: a reason word and two words beyond the options' and verdicts' ("unlikely here")."""
    naming = _naming(options)
    rivals = [k for k in options if k != letter]
    reasons: list[set[str]] = []
    for k in rivals:
        for unit in _units(reasoning):
            stems = _stems(unit)
            if not stems & naming[k] or not _REASON.search(unit.lower()):
                continue
            reason = {s for s in stems - naming[k] - naming.get(letter, set()) if s not in _VERDICT}
            if len(reason) >= 2 and not any(reason <= r for r in reasons):  # a reason pasted for each rival counts once
                reasons.append(reason)
                break
    return len(reasons) / len(rivals) if rivals else 0.0


def true_values(reasoning: str, question: str, options: dict, letter: str) -> float:
    """Share of the numbers it asserts that the case states, or that are thresholds ("over 20 mmHg")."""
    body = re.sub(r"(?m)^\s*\d+\.\s", " ", reasoning)
    stated = set(re.findall(r"\d+(?:\.\d+)?", question))
    found = [(m.group(), body[max(0, m.start() - 16):m.start()])
             for m in re.finditer(r"(?<![\w.])\d+(?:\.\d+)?", body)]
    if not found:
        return 1.0
    grounded = sum(n in stated or bool(_COMPARATOR.search(before)) or before.endswith("-") for n, before in found)
    return grounded / len(found)


def supports(reasoning: str, question: str, options: dict, letter: str) -> float:
    """1 when the reasoning's last line names the final answer (by its words or "option X") and no rival."""
    lines = [u for u in reasoning.strip().splitlines() if u.strip()]
    if not lines or letter not in options:
        return 0.0
    naming, last = _naming(options), _stems(lines[-1])
    rivals = [k for k in options if k != letter and last & naming[k]]
    return float(bool(last & naming[letter] or re.search(rf"\boption {letter}\b", lines[-1])) and not rivals)


def _keywords(unit: str, question: str) -> bool:
    """A comma list of five or more short items, most of them words of the question: names, no claim."""
    parts = [p for p in unit.split(",") if p.strip()]
    short = sum(len(p.split()) <= 3 for p in parts)
    copied = sum(bool(_stems(p) & _stems(question)) for p in parts)
    return len(parts) >= 5 and short * 3 >= len(parts) * 2 and copied * 3 >= len(parts) * 2


def about_case(reasoning: str, question: str, options: dict, letter: str) -> float:
    """The share of its own words that are the question's (full at 0.12), less keyword lists, sentences
    that repeat one frame around different case words, and the question restated."""
    units = _units(reasoning)
    every_option = set().union(*map(_stems, options.values())) if options else set()
    own = _stems(reasoning) - every_option
    if not own or not units:
        return 0.0
    share = len(own & _stems(question)) / len(own)
    listed = sum(_keywords(u, question) for u in units)
    frames, templated = [], 0
    for u in units:
        frame = _stems(u) - _stems(question) - every_option
        templated += bool(frame) and frame in frames
        frames.append(frame)
    words, qwords = (re.findall(r"[a-z0-9]+", t.lower()) for t in (reasoning, question))
    grams = {tuple(words[i:i + 3]) for i in range(len(words) - 2)}
    if grams and len(grams & {tuple(qwords[i:i + 3]) for i in range(len(qwords) - 2)}) / len(grams) >= 0.5:
        return 0.0
    return min(1.0, max(0.0, share - 0.04) / 0.08) * (1 - listed / len(units)) * (1 - templated / len(units))


# What the lead question of a checklist item asks -> the stand-in's check for it.
CHECKS = {
    "discriminate": (re.compile(r"discriminat"), discriminates),
    "true": (re.compile(r"\btrue\b"), true_values),
    "supports": (re.compile(r"support"), supports),
    "this case": (re.compile(r"about this case"), about_case),
}


def asked(rubric: str) -> list[str]:
    """The checks a rubric's numbered questions ask, read from each item's lead question."""
    out = []
    for item in _ITEM.findall(rubric):
        lead = re.split(r"[?:]", item, maxsplit=1)[0].lower()
        out += [name for name, (pattern, _) in CHECKS.items() if pattern.search(lead) and name not in out][:1]
    return out


def stand_in(prompt: str) -> tuple[int, dict[str, float]]:
    """The stand-in's score for a rendered rubric, with the checks it applied; 5 when it asks nothing."""
    found = {name: p.search(prompt) for name, p in _SECTION.items()}
    rubric = prompt
    for m in found.values():
        if m:
            rubric = rubric.replace(m.group(0), "")  # the checklist is the rubric's, never the student's
    names = asked(rubric)
    if not names:
        return 5, {}
    case, reasoning, final = (found[n].group(1) if found[n] else "" for n in ("case", "reasoning", "final_answer"))
    first = _OPTION.search(case)
    question = case[: first.start()] if first else case
    letters = re.findall(r"\b([A-J])\b", final)
    got = {n: CHECKS[n][1](reasoning, question, dict(_OPTION.findall(case)), letters[-1] if letters else "")
           for n in names}
    return round(10 * sum(got.values()) / len(got)), got


# -- a vignette, its honest reasoning, and reasoning that fails one question each --------------------

OPTS = {"A": "Iron", "B": "Folate", "C": "Vitamin B12", "D": "Thiamine"}
QUESTION = ("A 34-year-old vegan woman has fatigue and numbness in both feet. Her haemoglobin is 9.1 g/dL with a mean "
            "cell volume of 112 fL, and vibration sense is lost at the ankles. Which deficiency is most likely?")
CASE = QUESTION + "\n\n" + "\n".join(f"{k}. {v}" for k, v in OPTS.items())
PROMPT = [{"role": "user", "content": CASE}]
FINDINGS = ("Findings: a vegan woman with macrocytic anaemia (haemoglobin 9.1 g/dL, mean cell volume 112 fL) and "
            "numb feet with lost vibration sense.")
WHY = ("A vegan diet lacks vitamin B12, found only in animal foods, and B12 deficiency causes megaloblastic anaemia "
       "and a neuropathy of the dorsal columns.")
RIVALS = ["Folate deficiency also gives a macrocytic anaemia but does not damage the nerves.",
          "Iron deficiency gives a microcytic anaemia, not a macrocytic one.",
          "Thiamine deficiency causes a neuropathy but no anaemia."]
END = "Conclusion: vitamin B12 deficiency explains the anaemia and the neuropathy together."


def steps(*lines: str) -> str:
    return "\n".join(f"{i}. {x}" for i, x in enumerate(lines, 1))


HONEST = steps(FINDINGS, WHY, *RIVALS, END)
# Each passes every question of the shipped rubric but one.
FAILS_ONE = {
    "discriminate": steps(FINDINGS, WHY, END),  # never says why not the rivals
    "true": steps(FINDINGS.replace("112 fL", "72 fL"), WHY, *RIVALS, END),  # a misquoted value
    "supports": steps(FINDINGS, WHY, *RIVALS, END.replace("vitamin B12", "folate")),  # ends at another option
    "this case": steps("Iron gives small red cells, which does not match the picture.",  # knowledge, no findings
                       "Folate does not cause nerve damage.", "Thiamine causes nerve damage without blood changes.",
                       "Conclusion: vitamin B12 explains everything."),
}


def req(rivals: int, reasoning: str | None = None) -> JudgeRequest:
    """The vignette with reasoning that gives reasons against `rivals` of the three rival options."""
    return JudgeRequest(CASE, reasoning or steps(FINDINGS, WHY, *RIVALS[:rivals], END), "The answer is C.")


def good(rivals: int) -> list[dict]:
    """A well-formed completion of the vignette that reasons against `rivals` rival options."""
    return [{"role": "assistant", "content": f"<think>\n{req(rivals).reasoning}\n</think>\nThe answer is C."}]


DISCRIMINATE_ONLY = ('<case>\n$question\n</case>\n\n<reasoning>\n$reasoning\n</reasoning>\n\n'
                     '<final_answer>\n$answer\n</final_answer>\n\n'
                     '1. Does the reasoning discriminate between the options?\n\nReply {"score": N}.\n')
SCORE = {0: 0.0, 1: 0.3, 2: 0.7, 3: 1.0}  # the stand-in's grade of req(n) under DISCRIMINATE_ONLY


def without(rubric: str, check: str) -> str:
    """The rubric with the checklist item that asks `check` cut out."""
    items = [m for m in re.finditer(r"(?ms)^\d+\. (.*?)(?=^\d+\. |^\s*$)", rubric)
             if asked(m.group(0)) == [check]]
    assert len(items) == 1, f"the rubric asks {check!r} {len(items)} times"
    return rubric.replace(items[0].group(0), "")


class Grader(BaseHTTPRequestHandler):
    """Behaviour by the first path segment: good (the stand-in), slow, 500, garbage (not JSON), prose."""

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
            if route == "prose":
                content = "The reasoning is sound, 8/10."
            else:  # a reasoning grader's reply: its checks in a think block, then the verdict
                score, checks = stand_in(prompt)
                content = f"<think>{json.dumps(checks)}</think>\n" + json.dumps({"score": score})
            self._reply(200, json.dumps({
                "id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()),
                          "total_tokens": len(prompt.split()) + len(content.split())}}).encode())
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


@pytest.fixture()
def discriminate_only(tmp_path):
    path = tmp_path / "discriminate.md"
    path.write_text(DISCRIMINATE_ONLY)
    return path


def make(server, route="good", **kw) -> Judge:
    return Judge(f"{server}/{route}/v1", "grader", **{"max_retries": 0, "timeout_s": 5, **kw})


# -- the rubric, through the stand-in ---------------------------------------------------------------

def test_the_shipped_rubric_asks_four_questions():
    assert asked(default_rubric_path().read_text()) == ["discriminate", "true", "supports", "this case"]


@pytest.mark.parametrize("check", list(FAILS_ONE))
def test_each_question_of_the_shipped_rubric_counts(server, tmp_path, check):
    """Reasoning that fails one question is graded below honest reasoning; with that question cut from
    the rubric it is not: the grade follows the rubric, and the rubric needs every question."""
    final = "The answer is C."
    pair = [JudgeRequest(CASE, HONEST, final), JudgeRequest(CASE, FAILS_ONE[check], final)]
    honest, failing = make(server).grade(pair)
    assert honest == 1.0 and failing < honest
    cut = tmp_path / "cut.md"
    cut.write_text(without(default_rubric_path().read_text(), check))
    assert asked(cut.read_text()) == [c for c in CHECKS if c != check]
    assert make(server, rubric=cut).grade(pair) == [1.0, 1.0]


def test_a_rubric_that_asks_nothing_gets_flat_verdicts(server, tmp_path):
    path = tmp_path / "empty.md"
    path.write_text('Grade this reasoning.\n\n<reasoning>\n$reasoning\n</reasoning>\n\nReply {"score": N}.\n')
    requests = [req(3), *(JudgeRequest(CASE, r, "The answer is C.") for r in FAILS_ONE.values())]
    assert make(server, rubric=path).grade(requests) == [0.5] * 5
    assert len(set(make(server).grade(requests))) > 1  # the shipped rubric tells them apart


def test_a_rubric_that_hides_the_case_tells_nothing_apart(server, tmp_path):
    """Shown no case, the stand-in knows no options, no answer, no findings: every check fails."""
    path = tmp_path / "no-case.md"
    path.write_text(default_rubric_path().read_text().replace("<case>\n$question\n</case>", "<case>\n\n</case>"))
    assert make(server, rubric=path).grade([req(3), req(0)]) == [0.0, 0.0]
    assert make(server).grade([req(3), req(0)]) == [1.0, 0.8]


# -- parsing, validation, requests --------------------------------------------------------------------

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
        f"Case: {CASE}\nReasoning: 1. Findings: a vegan")
    rendered = Judge("http://127.0.0.1:1/v1", "m").render(req(3))
    assert f"<case>\n{CASE}\n</case>" in rendered and "<final_answer>\nThe answer is C.\n</final_answer>" in rendered
    with pytest.raises(ValueError):
        Judge("http://127.0.0.1:1/v1", "m", concurrency=0)


def test_no_api_key_parameter_and_no_request_at_construction(server):
    assert "api_key" not in inspect.signature(Judge).parameters
    assert "api_key" not in inspect.signature(REWARDS["judge"]).parameters
    with pytest.raises(TypeError):
        resolve_reward("judge", {"base_url": f"{server}/good/v1", "model": "grader", "api_key": "sk-x"})
    fn = resolve_reward("judge", {"base_url": f"{server}/good/v1", "model": "grader"})
    assert fn.__name__ == "judge" and Grader.seen == []


def test_scores_in_order_and_concurrently(server, discriminate_only):
    judge = make(server, concurrency=4, rubric=discriminate_only)
    assert judge.grade([req(n) for n in (0, 1, 2, 3)]) == [SCORE[n] for n in (0, 1, 2, 3)]
    assert len(Grader.seen) == 4 and Grader.max_in_flight > 1
    body = Grader.seen[0]["body"]
    assert body["model"] == "grader" and body["temperature"] == 0 and QUESTION in body["messages"][0]["content"]
    # The tokens the server reported are summed: what grading cost.
    assert judge.usage["prompt_tokens"] == sum(len(s["body"]["messages"][0]["content"].split()) for s in Grader.seen)
    assert judge.usage["completion_tokens"] > 0
    # Repeats are served from the cache; duplicates in a batch are asked once.
    assert judge.grade([req(1), req(1), req(2), req(2)]) == [0.3, 0.3, 0.7, 0.7]
    assert len(Grader.seen) == 4
    misquoted = req(0, FAILS_ONE["true"])  # all three rivals weighed: 1.0 for this rubric
    assert judge.grade([req(1), req(1), misquoted, misquoted]) == [0.3, 0.3, 1.0, 1.0]
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
    make(server, api_key_env="MY_GRADER_KEY").grade([req(0)])
    assert Grader.seen[-1]["auth"] == "Bearer sk-other-88"
    assert "SECRET" not in repr(judge) and "SECRET" not in (tmp_path / "c.jsonl").read_text()


def test_disk_cache_survives_a_new_judge(server, tmp_path, discriminate_only):
    path = tmp_path / "cache" / "judge.jsonl"
    assert make(server, cache_path=path, rubric=discriminate_only).grade([req(1), req(3)]) == [0.3, 1.0]
    assert len(Grader.seen) == 2 and len(path.read_text().splitlines()) == 2
    with path.open("a") as fh:
        fh.write('{"key": "torn')  # a kill mid-write
    again = make(server, cache_path=path, rubric=discriminate_only)
    assert again.grade([req(3), req(1)]) == [1.0, 0.3]
    assert len(Grader.seen) == 2 and again.counts["cache_hits"] == 2
    assert again.grade([req(2)]) == [0.7]  # appended after the torn line, on a line of its own
    assert make(server, cache_path=path, rubric=discriminate_only).grade([req(2)]) == [0.7] and len(Grader.seen) == 3
    assert make(server, cache_path=path).grade([req(2)]) == [0.9]  # another rubric is another key
    assert len(Grader.seen) == 4


def test_reward_floors_ill_formed_without_a_request_and_logs(server, discriminate_only):
    fn = resolve_reward("judge", {"base_url": f"{server}/good/v1", "model": "grader", "max_retries": 0,
                                  "rubric": str(discriminate_only)})
    echo = [{"role": "assistant", "content": f"<think>{CASE}</think>\nThe answer is C."}]
    completions = [good(3), "The answer is C", echo, [{"role": "assistant", "content": "<think>a</think><think>b"
                                                       "</think>The answer is C."}], good(1)]
    logged = {}
    got = fn(completions=completions, prompts=[PROMPT] * 5, options=[OPTS] * 5,
             log_metric=lambda k, v: logged.__setitem__(k, v))
    assert got == [1.0, 0.0, 0.0, 0.0, 0.3]
    assert len(Grader.seen) == 2 and logged == {"gazal/judge_failures": 0.0, "gazal/judge_cache_hits": 0.0}
    assert fn(completions=completions, prompts=[PROMPT] * 5, options=[OPTS] * 5,
              log_metric=lambda k, v: logged.__setitem__(k, v)) == got
    assert len(Grader.seen) == 2 and logged["gazal/judge_cache_hits"] == 2.0
    # The grader sees the prompt, the reasoning and the answer, not the tags.
    content = Grader.seen[0]["body"]["messages"][0]["content"]
    assert QUESTION in content and "<think>" not in content and "The answer is C." in content
    failing = resolve_reward("judge", {"base_url": f"{server}/500/v1", "model": "grader", "max_retries": 0})
    got = failing(completions=[good(3), "bare"], prompts=[PROMPT] * 2, options=[OPTS] * 2,
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
