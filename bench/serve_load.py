"""`gazal serve` under a real OpenAI client: time to first token, tokens per second, and a small load test.

    python bench/serve_load.py                                   # starts `gazal serve` on the demo model
    python bench/serve_load.py --url http://127.0.0.1:8000/v1    # an already running server

Streams `--tokens` new tokens `--repeats` times (greedy, usage included) and prints the time to the
first content and the tokens per second; then `--clients` threads send `--requests` plain requests
each and it prints the wall time and per-request latency. Figures, not a test.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

PROMPT = ("A 55-year-old man has had crushing chest pain for an hour. Explain, step by step, the differential "
          "diagnosis and the first tests to order.")


def streamed(client: OpenAI, model: str, tokens: int) -> tuple[float, float, int]:
    """Seconds to the first content, seconds in all, completion tokens."""
    start, first = time.perf_counter(), None
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        usage = chunk.usage or usage
    return first, time.perf_counter() - start, usage.completion_tokens


def load(base_url: str, model: str, clients: int, requests: int, tokens: int) -> None:
    def one_client(k: int) -> list[tuple[float, int]]:
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
        out = []
        for j in range(requests):
            start = time.perf_counter()
            resp = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Patient {k}-{j}: {PROMPT}"}],
                max_tokens=tokens, temperature=0.7, seed=j)
            out.append((time.perf_counter() - start, resp.usage.completion_tokens))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    latencies = [s for s, _ in results]
    generated = sum(t for _, t in results)
    print(f"load: {clients} clients x {requests} requests (max_tokens {tokens}): {len(results)}/{clients * requests} "
          f"answered in {wall:.1f} s; latency median {statistics.median(latencies):.1f} s, max {max(latencies):.1f} s; "
          f"{generated} completion tokens, {generated / wall:.1f} tokens/s overall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gazal:smollm2-135m-instruct", help="what `gazal serve --model` loads")
    parser.add_argument("--url", default=None, help="an already running server's /v1 URL (then --model is unused)")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--load-tokens", type=int, default=64)
    args = parser.parse_args()

    server = None
    base_url = args.url
    if base_url is None:
        server = subprocess.Popen([sys.executable, "-m", "gazal", "serve", "--model", args.model, "--name", "bench",
                                   "--port", "0"], stdout=subprocess.PIPE, text=True)
        found = None
        while not found:  # a first start converts the model and may print before serving
            line = server.stdout.readline()
            if not line:
                sys.exit("gazal serve exited before serving")
            found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        base_url = found.group(1)
    try:
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)  # warm-up
        runs = [streamed(client, model, args.tokens) for _ in range(args.repeats)]
        for first, total, tokens in runs:
            print(f"stream: first content {first:.3f} s, {tokens} tokens in {total:.2f} s = {tokens / total:.1f} "
                  f"tokens/s ({(tokens - 1) / (total - first):.1f} after the first content)")
        ttft = [r[0] for r in runs]
        rate = [r[2] / r[1] for r in runs]
        print(f"stream x{args.repeats}: time to first content {min(ttft):.3f}-{max(ttft):.3f} s, "
              f"{min(rate):.1f}-{max(rate):.1f} tokens/s")
        load(base_url, model, args.clients, args.requests, args.load_tokens)
    finally:
        if server is not None:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
