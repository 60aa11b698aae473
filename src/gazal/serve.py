"""`gazal serve`: an OpenAI-compatible chat endpoint over a local transformers model.

Serves POST /v1/chat/completions and GET /v1/models, bound to 127.0.0.1 unless told otherwise, so a
trained model can be tried with any OpenAI client and can act as the teacher for `gazal data synth`.

Hand-written on purpose, on the standard library: `transformers serve` (5.23) answered 500 on
/v1/models for a local model folder here, and pulls in FastAPI, uvicorn, Starlette, rich and openai;
Gazal needs two endpoints over a model it already loads its own way (Gazal model names, run
directories, base plus adapter). On GPUs, point clients at vLLM's server instead.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from gazal.errors import GazalError
from gazal.models import load_model, load_tokenizer, resolve_model

log = logging.getLogger(__name__)


class ChatModel:
    """A causal LM and its tokenizer, generating one request at a time (CPU or one GPU)."""

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
        self.stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}

    @torch.inference_mode()
    def chat(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float, n: int,
             seed: int | None) -> tuple[list[tuple[str, str]], int, int]:
        """n completions as (text, finish_reason), plus prompt and completion token counts."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False).to(self.model.device)
        sampling = temperature > 0
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=sampling,
                                      temperature=temperature if sampling else None,
                                      top_p=top_p if sampling else None, top_k=None,
                                      num_return_sequences=n if sampling else 1,
                                      pad_token_id=self.tokenizer.pad_token_id)
        if not sampling:
            out = out.repeat(n, 1)  # greedy decoding gives every choice the same text, as OpenAI's API does
        choices, used = [], 0
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            ids = row if end is None else row[:end]
            used += len(ids)
            choices.append((self.tokenizer.decode(ids, skip_special_tokens=False), "length" if end is None else "stop"))
        return choices, enc["input_ids"].shape[1], used


def _error(status: HTTPStatus, message: str, kind: str = "invalid_request_error") -> tuple[HTTPStatus, dict]:
    return status, {"error": {"message": message, "type": kind}}


def handle_chat(model: ChatModel, name: str, body: Any) -> tuple[HTTPStatus, dict]:
    """The OpenAI chat-completions contract, non-streaming."""
    if not isinstance(body, dict):
        return _error(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
    if body.get("model") not in (None, name):
        return _error(HTTPStatus.NOT_FOUND, f"model {body.get('model')!r} is not served here (serving {name!r})",
                      "model_not_found")
    if body.get("stream"):
        return _error(HTTPStatus.BAD_REQUEST, "stream=true is not supported by gazal serve")
    messages = body.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)):
        return _error(HTTPStatus.BAD_REQUEST, "messages must be a non-empty list of {role, content} objects")
    try:
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 512)
        temperature = float(body.get("temperature", 1.0))
        top_p = float(body.get("top_p", 1.0))
        n = int(body.get("n", 1))
        seed = body.get("seed")
        seed = None if seed is None else int(seed)
    except (TypeError, ValueError) as exc:
        return _error(HTTPStatus.BAD_REQUEST, f"bad sampling parameter: {exc}")
    if max_tokens < 1 or n < 1 or temperature < 0 or not 0 < top_p <= 1:
        return _error(HTTPStatus.BAD_REQUEST, "need max_tokens >= 1, n >= 1, temperature >= 0, 0 < top_p <= 1")
    choices, prompt_tokens, completion_tokens = model.chat(messages, max_tokens, temperature, top_p, n, seed)
    return HTTPStatus.OK, {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                    for i, (text, reason) in enumerate(choices)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def make_server(model: ChatModel, name: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for `model` under the OpenAI paths; port 0 picks a free port."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: HTTPStatus, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(HTTPStatus.OK, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "gazal"}]})
            else:
                self._send(*_error(HTTPStatus.NOT_FOUND, f"no route {self.path}", "not_found"))

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(*_error(HTTPStatus.NOT_FOUND, f"no route {self.path}", "not_found"))
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
            except (ValueError, json.JSONDecodeError):
                self._send(*_error(HTTPStatus.BAD_REQUEST, "the request body is not JSON"))
                return
            try:
                self._send(*handle_chat(model, name, body))
            except Exception as exc:  # a generation failure must not kill the server
                log.exception("chat completion failed")
                self._send(*_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}", "server_error"))

        def log_message(self, fmt: str, *args) -> None:  # route access logs through logging, not stderr
            log.info("%s %s", self.address_string(), fmt % args)

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise GazalError(f"serve: cannot listen on {host}:{port} ({exc.strerror})") from None
