"""An LLM judge for reasoning quality, behind any OpenAI-compatible chat endpoint.

A `Judge` renders a rubric (a `string.Template` with $question, $reasoning and $answer; default the
bundled templates/judge/reasoning.md) for each completion, sends the requests concurrently (a thread
pool over the sync openai client: TRL calls reward functions from the training thread) and reads a
strict reply.

Reply format: exactly one JSON object with a numeric "score" from 0 to 10, e.g. `{"score": 7}`,
optionally wrapped in one ```json code fence and optionally preceded by one <think>...</think>
block (reasoning graders); other keys are ignored. Anything else (prose, a bare number, a score out
of range, a boolean, NaN) is malformed. The score is mapped to [0, 1] as score / 10.

Failures never raise and never pay a silent 0: a timeout, an HTTP error status, a connection error
(each after the openai client's own retries) or a malformed reply gives None for that completion
(in GRPO it then takes its group's mean for this component, so a failure is neutral) and
increments `Judge.counts[kind]`, kind one of FAILURES. Verdicts are cached by
sha256(model, decoding settings, rubric text, rendered request) in memory and, with `cache_path`,
appended to a JSONL file that is read back at start, so a resumed run does not pay twice. A reply
that ended by itself but breaks the format is a verdict too (cached as None: the grader would say
the same again); a reply cut at max_tokens, a body that is not a chat completion, timeouts and
HTTP and connection errors are asked again next time. `Judge.usage` sums the prompt and completion
tokens the server reports in its replies (what grading cost; nothing for a server that reports none).

The API key is read from the environment variable named by `api_key_env` when the client is first
needed, and is never stored by the Judge or written anywhere; a missing variable means no key (fine
for a local server). Constructing a Judge makes no network call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import string
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gazal.errors import GazalError

log = logging.getLogger(__name__)

PLACEHOLDERS = ("question", "reasoning", "answer")
FAILURES = ("timeout", "http_error", "connection_error", "malformed")
DEFAULT_API_KEY_ENV = "GAZAL_JUDGE_API_KEY"


@dataclass(frozen=True)
class JudgeRequest:
    """What the grader sees of one completion."""

    question: str
    reasoning: str
    answer: str


def default_rubric_path() -> Path:
    return Path(str(resources.files("gazal") / "templates" / "judge" / "reasoning.md"))


def load_rubric(path: str | Path | None = None) -> string.Template:
    """The rubric template; it may use only $question, $reasoning and $answer, and must use $reasoning."""
    path = Path(path).expanduser() if path else default_rubric_path()
    if not path.is_file():
        raise GazalError(f"judge rubric not found: {path}")
    template = string.Template(path.read_text(encoding="utf-8"))
    if not template.is_valid():
        raise GazalError(f"judge rubric {path}: a '$' that is not a placeholder (write $$ for a literal $)")
    names = set(template.get_identifiers())
    if unknown := names - set(PLACEHOLDERS):
        raise GazalError(f"judge rubric {path}: unknown placeholder(s) {sorted(unknown)} (known: {list(PLACEHOLDERS)})")
    if "reasoning" not in names:
        raise GazalError(f"judge rubric {path}: it never shows the grader $reasoning")
    return template


_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def parse_reply(text: object) -> float | None:
    """The score of a grader reply mapped to [0, 1], or None when the reply is malformed."""
    if not isinstance(text, str):
        return None
    body = _THINK.sub("", text, count=1).strip()
    if fenced := _FENCE.match(body):
        body = fenced.group(1).strip()
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    score = obj.get("score") if isinstance(obj, dict) else None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return None
    return score / 10 if 0 <= score <= 10 else None


class Judge:
    """Grades reasoning through an OpenAI-compatible chat endpoint; see the module docstring."""

    def __init__(self, base_url: str, model: str, rubric: str | Path | None = None, timeout_s: float = 60.0,
                 concurrency: int = 8, max_retries: int = 2, cache_path: str | Path | None = None,
                 api_key_env: str = DEFAULT_API_KEY_ENV, max_tokens: int = 512, temperature: float = 0.0):
        if not base_url or not model:
            raise ValueError("judge needs base_url and model")
        if timeout_s <= 0 or concurrency < 1 or max_retries < 0 or max_tokens < 1 or temperature < 0:
            raise ValueError("judge needs timeout_s > 0, concurrency >= 1, max_retries >= 0, max_tokens >= 1, "
                             "temperature >= 0")
        if not api_key_env or not isinstance(api_key_env, str):
            raise ValueError("api_key_env must name an environment variable")
        self.base_url, self.model = base_url, model
        self.template = load_rubric(rubric)
        self.timeout_s, self.concurrency, self.max_retries = float(timeout_s), int(concurrency), int(max_retries)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.api_key_env = api_key_env
        self.cache_path = Path(cache_path).expanduser() if cache_path else None
        self.counts: Counter = Counter()  # requests, graded, cache_hits, duplicates and FAILURES, all calls
        self.last_batch: Counter = Counter()  # the same for the latest grade() call
        self.usage: Counter = Counter()  # prompt_tokens and completion_tokens the server reported, all calls
        self._cache: dict[str, float | None] = {}  # None: the grader's reply was malformed
        self._lock = threading.Lock()
        self._client = None
        if self.cache_path and self.cache_path.is_file():
            self._load_cache()

    def __repr__(self) -> str:
        return f"Judge(base_url={self.base_url!r}, model={self.model!r})"

    # -- cache ------------------------------------------------------------------------------------

    def _load_cache(self) -> None:
        skipped = 0
        for line in self.cache_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                self._cache[str(row["key"])] = None if row["score"] is None else float(row["score"])
            except (ValueError, KeyError, TypeError):
                skipped += 1  # a line torn by a kill, or not ours
        log.info("judge: %d cached grades from %s%s", len(self._cache), self.cache_path,
                 f" ({skipped} unreadable lines skipped)" if skipped else "")

    def _store(self, key: str, score: float | None) -> None:
        with self._lock:
            self._cache[key] = score
            if self.cache_path is None:
                return
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            row = json.dumps({"key": key, "score": score}).encode() + b"\n"
            with self.cache_path.open("ab+") as fh:
                end = fh.seek(0, os.SEEK_END)
                if end and (fh.seek(end - 1), fh.read(1))[1] != b"\n":
                    row = b"\n" + row  # a line torn by a kill stays unreadable and alone
                fh.write(row)

    def render(self, request: JudgeRequest) -> str:
        return self.template.substitute(question=request.question, reasoning=request.reasoning,
                                        answer=request.answer)

    def key(self, rendered: str) -> str:
        h = hashlib.sha256()
        for part in (self.model, f"{self.temperature}/{self.max_tokens}", self.template.template, rendered):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    # -- requests ---------------------------------------------------------------------------------

    def client(self):
        with self._lock:  # the pool's first requests arrive together: one client for all
            return self._make_client()

    def _make_client(self):
        if self._client is None:
            from openai import OpenAI

            key = os.environ.get(self.api_key_env)
            if not key:
                log.info("judge: $%s is not set; sending no API key (fine for a local server)", self.api_key_env)
            # The client insists on a string; a local server ignores it.
            self._client = OpenAI(base_url=self.base_url, api_key=key or "EMPTY", timeout=self.timeout_s,
                                  max_retries=self.max_retries)
        return self._client

    def _ask(self, prompt: str) -> tuple[float | None, str, dict[str, int]]:
        """One grade, or None with the kind of failure, and the tokens the server reported; never raises."""
        import openai

        try:
            resp = self.client().chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}],
                temperature=self.temperature, max_tokens=self.max_tokens)
            choice = resp.choices[0] if resp.choices else None
            text = choice.message.content if choice else None
            tokens = ({"prompt_tokens": int(resp.usage.prompt_tokens or 0),
                       "completion_tokens": int(resp.usage.completion_tokens or 0)} if resp.usage else {})
        except openai.APITimeoutError:
            return None, "timeout", {}
        except openai.APIStatusError:
            return None, "http_error", {}
        except openai.APIConnectionError:
            return None, "connection_error", {}
        except Exception:  # a 200 whose body is not a chat completion (not cached: it may be ours)
            return None, "malformed_body", {}
        score = parse_reply(text)
        if score is not None:
            return score, "graded", tokens
        # A reply that ended by itself and breaks the format is the grader's verdict (cached); one
        # cut at max_tokens is not (a thinking grader may simply need more room).
        return None, "malformed" if choice.finish_reason == "stop" else "malformed_cut", tokens

    def grade(self, requests: Sequence[JudgeRequest]) -> list[float | None]:
        """A score in [0, 1] per request, None where grading failed; identical requests are asked once."""
        rendered = [self.render(r) for r in requests]
        keys = [self.key(p) for p in rendered]
        batch: Counter = Counter()
        todo: dict[str, str] = {}
        for k, p in zip(keys, rendered):
            if k in self._cache:
                batch["cache_hits"] += 1
            elif k in todo:
                batch["duplicates"] += 1
            else:
                todo[k] = p
        results: dict[str, float | None] = {}
        if todo:
            batch["requests"] += len(todo)
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)), thread_name_prefix="judge") as pool:
                for k, (score, kind, tokens) in zip(todo, pool.map(self._ask, todo.values())):
                    self.usage.update(tokens)
                    if kind.startswith("malformed_"):
                        kind, cache = "malformed", False
                    else:
                        cache = kind in ("graded", "malformed")
                    batch[kind] += 1
                    results[k] = score
                    if cache:
                        self._store(k, score)
        failed = {kind: batch[kind] for kind in FAILURES if batch[kind]}
        if failed:
            log.warning("judge: %d of %d requests failed (%s); those completions are skipped", sum(failed.values()),
                        batch["requests"], ", ".join(f"{k} {v}" for k, v in failed.items()))
        self.last_batch = batch
        self.counts.update(batch)
        return [self._cache[k] if k in self._cache else results.get(k) for k in keys]
