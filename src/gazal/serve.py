"""`gazal serve`: an OpenAI-compatible chat endpoint over a local transformers model.

Serves POST /v1/chat/completions (plain or streamed as server-sent events), GET /v1/models and
GET /health, bound to 127.0.0.1 unless told otherwise, so a trained model can be tried with any
OpenAI client and can act as the teacher for `gazal data synth`.

The model generates one request at a time; at most `Limits.max_queue` more wait for it and the rest
are refused with 429 and Retry-After. `max_tokens`, `n` and the prompt are checked against the
model's context and the server's `Limits` and refused with OpenAI's 400 error shape, never clamped.

Hand-written on purpose, on the standard library: `transformers serve` (5.23) answered 500 on
/v1/models for a local model folder here, and pulls in FastAPI, uvicorn, Starlette, rich and openai;
Gazal needs a few endpoints over a model it already loads its own way (Gazal model names, run
directories, base plus adapter). On GPUs, point clients at vLLM's server instead.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from jinja2 import TemplateError
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from gazal.errors import GazalError
from gazal.models import load_model, load_tokenizer, resolve_model

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512  # a request's completion budget when it names none (within the limits below)


@dataclass(frozen=True)
class Limits:
    """What one server accepts: `gazal serve --max-tokens/--max-n/--max-queue`."""

    max_tokens: int = 2048  # completion tokens per choice, on top of the model's context less the prompt
    max_n: int = 8  # choices per request
    max_queue: int = 8  # requests that may wait while one generates; 0 refuses whenever the model is busy

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_n < 1 or self.max_queue < 0:
            raise GazalError(f"serve: need --max-tokens >= 1, --max-n >= 1, --max-queue >= 0 (got {self})")


@dataclass(frozen=True)
class Sampling:
    """One request's decoding."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None


@dataclass
class Stats:
    """Counts of the model's generations (completion tokens actually generated), for logs and tests."""

    generations: int = 0
    tokens: int = 0
    cancelled: int = 0  # streamed generations stopped because their client went away
    cancelled_tokens: int = 0


@dataclass(frozen=True)
class Finished:
    """The end of one streamed completion."""

    reason: str  # "stop" or "length"
    tokens: int


class RequestError(Exception):
    """A request refused with OpenAI's error body: {"error": {message, type, param, code}}."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Cancelled(StoppingCriteria):
    # generate() polls its stopping criteria after every token; none of transformers' own watches an
    # outside flag, which is what stopping for a client that went away needs.
    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatModel:
    """A causal LM and its tokenizer; callers hold `lock` around `complete` and `stream` (one at a time)."""

    def __init__(self, name_or_path: str, adapter: str | None = None, dtype: str = "float32"):
        path = resolve_model(name_or_path)
        try:
            self.tokenizer = load_tokenizer(path)
            model = load_model(path, dtype if torch.cuda.is_available() else "float32")
        except (OSError, ValueError) as exc:
            raise GazalError(f"--model {name_or_path}: not a loadable model folder or reachable hub id ({exc})") from None
        if adapter:
            from peft import PeftModel

            try:
                # Merged once at start: DoRA through PEFT generates several times slower than merged weights.
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
            except (OSError, ValueError) as exc:
                raise GazalError(f"--adapter {adapter}: not a loadable PEFT adapter ({exc})") from None
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.lock = threading.Lock()
        self.stats = Stats()
        self.context_length: int = self.model.config.get_text_config().max_position_embeddings
        eos = self.model.generation_config.eos_token_id
        # Generation stops at any of these (the tokenizer's and the generation config's), so that a plain
        # and a streamed completion end at the same token.
        self.stop_ids = sorted({self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                *(eos if isinstance(eos, list) else [eos])} - {None})

    def encode(self, messages: list[dict]) -> torch.Tensor:
        """The chat prompt's token ids, shape (1, prompt tokens)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer([text], return_tensors="pt", add_special_tokens=False)["input_ids"]

    def _generate_args(self, ids: torch.Tensor, s: Sampling, sequences: int) -> dict[str, Any]:
        sampling = s.temperature > 0
        ids = ids.to(self.model.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": s.max_tokens,
                "do_sample": sampling, "temperature": s.temperature if sampling else None,
                "top_p": s.top_p if sampling else None, "top_k": None, "num_return_sequences": sequences,
                "eos_token_id": self.stop_ids, "pad_token_id": self.tokenizer.pad_token_id}

    def _ending(self, row: list[int]) -> tuple[list[int], str]:
        end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
        return (row, "length") if end is None else (row[:end], "stop")

    @torch.inference_mode()
    def complete(self, ids: torch.Tensor, s: Sampling) -> tuple[list[tuple[str, str]], int]:
        """`s.n` completions as (text, finish_reason), and their completion tokens."""
        sampling = s.temperature > 0
        if s.seed is not None:
            torch.manual_seed(s.seed)
        out = self.model.generate(**self._generate_args(ids, s, s.n if sampling else 1))
        rows = [self._ending(row) for row in out[:, ids.shape[1]:].tolist()]
        self.stats.generations += 1
        self.stats.tokens += sum(len(kept) for kept, _ in rows)
        if not sampling:
            rows = rows * s.n  # greedy decoding gives every choice the same text, as OpenAI's API does
        choices = [(self.tokenizer.decode(kept, skip_special_tokens=True), reason) for kept, reason in rows]
        return choices, sum(len(kept) for kept, _ in rows)

    def stream(self, ids: torch.Tensor, s: Sampling) -> Iterator[str | Finished]:
        """One completion's text as it is generated (a word or line at a time), then its `Finished`.

        Closing the iterator early (the client went away) stops the generation within a token.
        """
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        result: dict[str, Any] = {}

        def generate() -> None:
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(**self._generate_args(ids, s, 1), streamer=streamer,
                                                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
            except Exception as exc:  # raised again in the reader's thread, below
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=generate, name="gazal-serve-generate", daemon=True)
        thread.start()
        read_all = False
        try:
            for text in streamer:
                if text:  # the streamer yields "" while a word is incomplete
                    yield text
            read_all = True
        finally:
            if not read_all:
                cancel.set()
            thread.join()  # the model is free again only once generate() has returned
            if "out" in result:
                kept, reason = self._ending(result["out"][0, ids.shape[1]:].tolist())
                self.stats.generations += 1
                self.stats.tokens += len(kept)
                if not read_all:
                    self.stats.cancelled += 1
                    self.stats.cancelled_tokens += len(kept)
                    log.info("stream closed by its client: generation stopped after %d of %d tokens",
                             len(kept), s.max_tokens)
        if "error" in result:
            raise result["error"]
        yield Finished(reason, len(kept))


class RequestQueue:
    """One request at a time on `lock`, at most `max_waiting` more waiting for it; the rest get 429."""

    def __init__(self, lock: threading.Lock, max_waiting: int):
        self.lock, self.max_waiting = lock, max_waiting
        self._count = threading.Lock()
        self.admitted = 0  # the running request and those waiting
        self.running = False
        self._seconds = 1.0  # a moving mean of a request's time on the model, for Retry-After

    @property
    def waiting(self) -> int:
        """Requests admitted and waiting for the model."""
        return max(self.admitted - self.running, 0)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold the model for one request, or raise a 429 `RequestError` when the queue is full."""
        with self._count:
            if self.admitted > self.max_waiting:
                retry = max(1, math.ceil(self._seconds * (self.waiting + 1)))
                raise RequestError(HTTPStatus.TOO_MANY_REQUESTS,
                                   f"the server is busy: {self.waiting} requests already wait for the model "
                                   f"(--max-queue {self.max_waiting}); retry after {retry} s",
                                   code="rate_limit_exceeded", kind="rate_limit_error",
                                   headers={"Retry-After": str(retry)})
            self.admitted += 1
        try:
            with self.lock:
                self.running, start = True, time.monotonic()
                try:
                    yield
                finally:
                    self.running = False
                    self._seconds = 0.7 * self._seconds + 0.3 * (time.monotonic() - start)
        finally:
            with self._count:
                self.admitted -= 1


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request."""

    ids: torch.Tensor
    sampling: Sampling
    stream: bool
    include_usage: bool


def _number(body: dict, field: str, kind: type, default: Any) -> Any:
    value = body.get(field)
    if value is None:
        return default
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (kind is float or float(value).is_integer()))
    if not ok:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{field} must be {'an integer' if kind is int else 'a number'}, "
                           f"not {value!r}", param=field, code="invalid_type")
    return kind(value)


def _invalid(field: str, message: str) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, message, param=field, code="invalid_value")


def parse_chat(model: ChatModel, name: str, limits: Limits, body: Any) -> ChatRequest:
    """Check a chat-completions body against the OpenAI contract, the model's context and `limits`."""
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
    if body.get("model") not in (None, name):
        raise RequestError(HTTPStatus.NOT_FOUND, f"model {body.get('model')!r} is not served here (serving {name!r})",
                           param="model", code="model_not_found")
    messages = body.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)):
        raise _invalid("messages", "messages must be a non-empty list of {role, content} objects")
    n = _number(body, "n", int, 1)
    if not 1 <= n <= limits.max_n:
        raise _invalid("n", f"n must be between 1 and {limits.max_n} (--max-n), not {n}")
    temperature = _number(body, "temperature", float, 1.0)
    if temperature < 0:
        raise _invalid("temperature", f"temperature must be >= 0, not {temperature}")
    top_p = _number(body, "top_p", float, 1.0)
    if not 0 < top_p <= 1:
        raise _invalid("top_p", f"top_p must be in (0, 1], not {top_p}")
    seed = _number(body, "seed", int, None)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _invalid("stream_options", "stream_options must be an object such as {\"include_usage\": true}")

    try:
        ids = model.encode(messages)
    except TemplateError as exc:  # e.g. a role or an order of turns the model's chat template refuses
        raise _invalid("messages", f"the model's chat template refused the messages: {exc}") from None
    prompt, context = ids.shape[1], model.context_length
    if prompt >= context:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the prompt is {prompt} tokens: the model's context is {context} "
                           "tokens, which leaves no room for a completion; shorten the messages",
                           param="messages", code="context_length_exceeded")
    room = context - prompt
    cap = min(limits.max_tokens, room)
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _number(body, field, int, None)
    if asked is not None and asked < 1:
        raise _invalid(field, f"{field} must be at least 1, not {asked}")
    if asked is not None and asked > cap:
        why = (f"this server's --max-tokens is {limits.max_tokens}" if cap == limits.max_tokens else
               f"the model's context is {context} tokens and the prompt takes {prompt}")
        raise _invalid(field, f"{field} is too large: {asked}. At most {cap} completion tokens for this request "
                              f"({why})")
    sampling = Sampling(asked or min(DEFAULT_MAX_TOKENS, cap), temperature, top_p, n, seed)
    return ChatRequest(ids, sampling, bool(body.get("stream")), bool(options.get("include_usage")))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def complete_chat(model: ChatModel, name: str, req: ChatRequest) -> dict:
    """A `chat.completion` body; the caller holds the model."""
    choices, used = model.complete(req.ids, req.sampling)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                    for i, (text, reason) in enumerate(choices)],
        "usage": _usage(req.ids.shape[1], used),
    }


def stream_chat(model: ChatModel, name: str, req: ChatRequest) -> Iterator[dict]:
    """The `chat.completion.chunk` objects of a streamed completion; the caller holds the model.

    Each choice opens with a role delta and closes with a chunk carrying its finish_reason; with
    `include_usage`, every chunk has `usage: null` and a last one has the usage and no choices, as
    OpenAI's API does. Choices of a sampled n > 1 are generated one after the other (the streamer reads
    one sequence); greedy ones share a single generation, as their texts are equal.
    """
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": name}
    tail = {"usage": None} if req.include_usage else {}
    s = req.sampling

    def chunk(index: int, delta: dict, reason: str | None = None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}],
                **tail}

    for i in range(s.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    if s.seed is not None:
        torch.manual_seed(s.seed)
    groups = [list(range(s.n))] if s.temperature == 0 else [[i] for i in range(s.n)]
    used = 0
    for group in groups:
        with closing(model.stream(req.ids, s)) as pieces:
            for piece in pieces:
                for i in group:
                    if isinstance(piece, Finished):
                        used += piece.tokens
                        yield chunk(i, {}, piece.reason)
                    else:
                        yield chunk(i, {"content": piece})
    if req.include_usage:
        yield {**head, "choices": [], "usage": _usage(req.ids.shape[1], used)}


def make_server(model: ChatModel, name: str, host: str = "127.0.0.1", port: int = 8000,
                limits: Limits = Limits()) -> ThreadingHTTPServer:
    """An HTTP server for `model` under the OpenAI paths; port 0 picks a free port."""
    queue = RequestQueue(model.lock, limits.max_queue)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: HTTPStatus, payload: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _event(self, data: dict | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            self.wfile.write(f"data: {text}\n\n".encode())

        def do_GET(self) -> None:
            path = self.path.rstrip("/")
            if path == "/v1/models":
                self._send(HTTPStatus.OK, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "gazal"}]})
            elif path == "/health":
                self._send(HTTPStatus.OK, {"status": "ok", "model": name, "busy": queue.running,
                                           "queue_depth": queue.waiting, "max_queue": limits.max_queue})
            else:
                self._send(*_not_found(self.path))

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(*_not_found(self.path))
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
            except ValueError:
                self._send(HTTPStatus.BAD_REQUEST, RequestError(HTTPStatus.BAD_REQUEST, "the request body is not JSON").body)
                return
            try:
                req = parse_chat(model, name, limits, body)
                if req.stream:
                    self._stream(req)
                    return
                with queue.slot():
                    payload = complete_chat(model, name, req)
                self._send(HTTPStatus.OK, payload)
            except RequestError as exc:
                self._send(exc.status, exc.body, exc.headers)
            except Exception as exc:  # a generation failure must not kill the server
                log.exception("chat completion failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, _server_error(exc))

        def _stream(self, req: ChatRequest) -> None:
            with queue.slot():  # a full queue raises before any header is sent
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                self.close_connection = True  # no Content-Length: the end of the stream is the end of the body
                try:
                    # closing(): a failed write must close the generators now, which stops the generation
                    # and joins its thread before the model's lock is released.
                    with closing(stream_chat(model, name, req)) as chunks:
                        for chunk in chunks:
                            self._event(chunk)
                    self._event("[DONE]")
                except ConnectionError:
                    log.info("%s went away mid-stream", self.address_string())
                except Exception as exc:
                    log.exception("streamed chat completion failed")
                    try:
                        self._event(_server_error(exc))
                    except ConnectionError:
                        pass

        def log_message(self, fmt: str, *args: Any) -> None:  # route access logs through logging, not stderr
            log.info("%s %s", self.address_string(), fmt % args)

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise GazalError(f"serve: cannot listen on {host}:{port} ({exc.strerror})") from None


def _not_found(path: str) -> tuple[HTTPStatus, dict]:
    return HTTPStatus.NOT_FOUND, RequestError(HTTPStatus.NOT_FOUND, f"no route {path}", code="not_found").body


def _server_error(exc: Exception) -> dict:
    return RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}", kind="server_error").body
