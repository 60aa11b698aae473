"""`gazal serve` through the real `openai` client on loopback: the contract, streaming, limits, queue, load."""

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import BadRequestError, NotFoundError, OpenAI, RateLimitError

from gazal.cli import main
from gazal.models import TINY_QWEN3
from gazal.serve import ChatModel, Limits, RequestError, make_server, parse_chat

ASK = [{"role": "user", "content": "Fever and dysuria in a 30-year-old woman: cystitis or pyelonephritis?"}]


@pytest.fixture(scope="module")
def model():
    return ChatModel(TINY_QWEN3)


def _start(model, limits):
    server = make_server(model, "tiny", port=0, limits=limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def servers(model):
    """The default limits (but room for long generations), and one with a queue of two."""
    started = {"main": _start(model, Limits(max_tokens=3000)), "small": _start(model, Limits(max_tokens=3000,
                                                                                              max_queue=2))}
    yield {key: f"http://127.0.0.1:{s.server_address[1]}" for key, s in started.items()}
    for s in started.values():
        s.shutdown()
        s.server_close()


def _client(root: str, timeout: float = 60) -> OpenAI:
    # max_retries=0: the client's own retries would hide the 429s and 400s under test.
    return OpenAI(base_url=root + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def _health(root: str) -> dict:
    with urllib.request.urlopen(root + "/health", timeout=10) as resp:
        return json.load(resp)


def test_serve_speaks_the_openai_contract(servers):
    client = _client(servers["main"])
    assert [m.id for m in client.models.list().data] == ["tiny"]
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Fever?"}],
                                          max_tokens=5, temperature=0, n=2)
    assert len(resp.choices) == 2 and resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in ("stop", "length") and 0 < resp.usage.completion_tokens <= 10
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    assert err.value.param == "messages"
    assert _health(servers["main"]) == {"status": "ok", "model": "tiny", "busy": False, "queue_depth": 0,
                                        "max_queue": 8}


def _streamed(client, **kwargs):
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, stream=True, **kwargs))
    text = {}
    for c in chunks:
        for choice in c.choices:
            text[choice.index] = text.get(choice.index, "") + (choice.delta.content or "")
    return chunks, text


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}])
def test_streaming_equals_the_plain_completion(servers, sampling):
    client = _client(servers["main"])
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, **sampling)
    chunks, text = _streamed(client, max_tokens=40, stream_options={"include_usage": True}, **sampling)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].finish_reason is None
    assert text == {0: plain.choices[0].message.content} and len(chunks) > 4  # token by token, not in one piece
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert plain.usage.completion_tokens == 40 and plain.usage.total_tokens == plain.usage.prompt_tokens + 40
    assert all(c.usage is None for c in chunks[:-1])
    _, without = _streamed(client, max_tokens=40, **sampling)  # no usage chunk unless asked
    assert without == text


def test_streaming_n_choices_carry_their_index(servers):
    client = _client(servers["main"])
    chunks, text = _streamed(client, max_tokens=12, n=2, temperature=0,
                             stream_options={"include_usage": True})
    assert set(text) == {0, 1} and text[0] == text[1]  # greedy: the same text under each index
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1]
    assert chunks[-1].usage.completion_tokens == 24
    _, sampled = _streamed(client, max_tokens=12, n=3, temperature=1.0, seed=1)
    assert set(sampled) == {0, 1, 2} and len(set(sampled.values())) == 3


def test_limits_are_refused_with_the_field_named(servers, model):
    client = _client(servers["main"])
    cases = [({"max_tokens": 10**7}, "max_tokens", "3000"),
             ({"max_completion_tokens": 3001}, "max_completion_tokens", "3000"),
             ({"max_tokens": 0}, "max_tokens", "at least 1"),
             ({"n": 9}, "n", "--max-n"),
             ({"n": 500, "stream": True}, "n", "--max-n"),
             ({"temperature": "hot"}, "temperature", "number")]
    for extra, param, words in cases:
        with pytest.raises(BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=ASK, **extra)
        assert err.value.param == param and words in err.value.message, extra
        assert err.value.type == "invalid_request_error" and err.value.code
    # The context (4,096 tokens for the tiny model) less the prompt caps max_tokens below --max-tokens.
    long = [{"role": "user", "content": "fever " * 1500}]
    prompt = model.encode(long).shape[1]
    assert 4096 - 3000 < prompt < 4096
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=4096 - prompt + 1)
    assert err.value.param == "max_tokens" and f"At most {4096 - prompt} " in err.value.message
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "fever " * 5000}],
                                       max_tokens=5)
    assert err.value.param == "messages" and err.value.code == "context_length_exceeded"


def test_a_full_queue_is_refused_with_retry_after(servers):
    root = servers["small"]
    # Greedy: the tiny model then never writes its end token, so the holder runs until it is closed.
    holder = _client(root).chat.completions.create(model="tiny", messages=ASK, max_tokens=3000, temperature=0,
                                                   stream=True)
    next(iter(holder))  # the generation holds the model
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(_client(root).chat.completions.create, model="tiny", messages=ASK, max_tokens=3)
                   for _ in range(2)]
        deadline = time.time() + 20
        while _health(root)["queue_depth"] < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert _health(root) == {"status": "ok", "model": "tiny", "busy": True, "queue_depth": 2, "max_queue": 2}
        for stream in (False, True):
            with pytest.raises(RateLimitError) as err:
                _client(root).chat.completions.create(model="tiny", messages=ASK, max_tokens=3, stream=stream)
            assert int(err.value.response.headers["Retry-After"]) >= 1
            assert err.value.code == "rate_limit_exceeded" and "--max-queue 2" in err.value.message
        holder.close()
        assert all(f.result(timeout=30).choices[0].message.content is not None for f in waiting)
    assert _health(root)["queue_depth"] == 0


def test_a_client_leaving_mid_stream_frees_the_model(servers, model):
    client = _client(servers["main"])
    before = (model.stats.cancelled, model.stats.cancelled_tokens)
    stream = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3000, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks), next(chunks)
    stream.close()
    start = time.time()
    resp = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5)
    assert resp.usage.completion_tokens == 5 and time.time() - start < 5  # 3,000 tokens take ~6 s here
    assert model.stats.cancelled == before[0] + 1
    assert model.stats.cancelled_tokens - before[1] < 300  # stopped early, far short of max_tokens


def test_load_four_clients_five_requests_each(servers, model):
    root = servers["main"]
    before = model.stats.generations

    def client_run(k: int) -> list[str]:
        client, texts = _client(root), []
        for j in range(5):
            ask = [{"role": "user", "content": f"Case {k}-{j}: fever?"}]
            if (k + j) % 2:  # half streamed, half plain
                chunks = list(client.chat.completions.create(model="tiny", messages=ask, max_tokens=8,
                                                             temperature=1.0, seed=j, stream=True))
                assert chunks[-1].choices[0].finish_reason in ("stop", "length")
                texts.append("".join(c.choices[0].delta.content or "" for c in chunks))
            else:
                resp = client.chat.completions.create(model="tiny", messages=ask, max_tokens=8, temperature=1.0,
                                                      seed=j)
                texts.append(resp.choices[0].message.content)
        return texts

    with ThreadPoolExecutor(4) as pool:
        answered = list(pool.map(client_run, range(4)))
    assert [len(t) for t in answered] == [5, 5, 5, 5] and all(isinstance(t, str) for ts in answered for t in ts)
    assert model.stats.generations - before == 20


def test_serve_with_a_missing_model_exits_2(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "--model" in capsys.readouterr().err


def test_serve_binds_loopback_by_default_with_limits():
    from gazal.cli import _parser

    args = _parser().parse_args(["serve", "--model", "x"])
    assert args.host == "127.0.0.1"
    assert (args.max_tokens, args.max_n, args.max_queue) == (2048, 8, 8)


def test_messages_the_chat_template_refuses_are_a_400(model, monkeypatch):
    monkeypatch.setattr(model.tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RequestError) as err:
        parse_chat(model, "tiny", Limits(), {"messages": [{"role": "user", "content": "x"}]})
    assert err.value.status == 400 and err.value.body["error"]["param"] == "messages"
    assert "roles must alternate" in err.value.body["error"]["message"]
