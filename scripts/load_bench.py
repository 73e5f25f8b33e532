"""Load benchmark for a running medusa-gguf server: throughput, latency and time to first token under concurrency.

    python main.py --parallel 2 &
    python scripts/load_bench.py http://127.0.0.1:8000 --concurrency 1,4,16 --max-tokens 64 --json load.json

At each concurrency level, that many clients send streaming chat completions back to back (greedy by default,
prompts taken in turn from a fixed list), each client `--requests` times. Reported per level: completion tokens
per second over the level's wall time, request latency and time to first token (p50/p95), failed requests (a 503
from a full queue counts as failed), and how many greedy answers differ from the same prompt's answer at the first
level (one client: the output alone). Standard library only, so it runs from any Python 3.11; it works against any
OpenAI-compatible server (llama-server too).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

PROMPTS = (
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "List five uses of a paperclip.",
    "What is the capital of France, and why is it famous?",
    "Describe how a bicycle works.",
    "Give three tips for learning a new language.",
    "Summarize the water cycle.",
    "Why do cats purr?",
)


@dataclass
class Sample:
    ok: bool
    latency_s: float
    ttft_s: float | None
    completion_tokens: int
    error: str | None = None
    prompt: str = ""
    text: str = ""


@dataclass
class Level:
    concurrency: int
    requests: int
    failed: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    first_error: str | None
    outputs_changed: int | None = None  # greedy answers that differ from the same prompt's answer alone


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def served_model(url: str, api_key: str | None) -> str:
    req = urllib.request.Request(f"{url}/v1/models", headers=_headers(api_key))
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["data"][0]["id"]


def one_request(url: str, api_key: str | None, body: dict, timeout: float) -> Sample:
    """A streaming chat completion; the time to first token is the first chunk that carries text."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=data, headers=_headers(api_key))
    start = time.perf_counter()
    ttft, tokens, pieces = None, 0, []
    prompt = body["messages"][-1]["content"]
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return Sample(False, time.perf_counter() - start, ttft, tokens, event["error"]["message"])
                text = "".join(c.get("delta", {}).get("content") or "" for c in event["choices"])
                if ttft is None and text:
                    ttft = time.perf_counter() - start
                pieces.append(text)
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except urllib.error.HTTPError as exc:
        return Sample(False, time.perf_counter() - start, None, 0, f"HTTP {exc.code}: {exc.read()[:200]!r}")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        return Sample(False, time.perf_counter() - start, None, 0, repr(exc))
    return Sample(True, time.perf_counter() - start, ttft, tokens, prompt=prompt, text="".join(pieces))


def run_level(url: str, api_key: str | None, model: str, concurrency: int, args: argparse.Namespace,
              reference: dict[str, str]) -> Level:
    """One level; answers are compared with `reference` (prompt -> its answer alone) when it is given."""
    def client(c: int) -> list[Sample]:
        samples = []
        for r in range(args.requests):
            prompt = PROMPTS[(c * args.requests + r) % len(PROMPTS)]
            body = {
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True},
            }
            samples.append(one_request(url, api_key, body, args.timeout))
        return samples

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = [s for batch in pool.map(client, range(concurrency)) for s in batch]
    wall = time.perf_counter() - start
    ok = [s for s in samples if s.ok]
    tokens = sum(s.completion_tokens for s in ok)
    latencies = [s.latency_s for s in ok]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    errors = [s.error for s in samples if not s.ok]
    changed = sum(s.text != reference[s.prompt] for s in ok) if reference else None
    return Level(
        concurrency=concurrency, requests=len(samples), failed=len(errors), completion_tokens=tokens, wall_s=wall,
        tokens_per_s=tokens / wall, requests_per_s=len(ok) / wall,
        latency_p50_s=percentile(latencies, 50), latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(ttfts, 50), ttft_p95_s=percentile(ttfts, 95), first_error=errors[0] if errors else None,
        outputs_changed=changed,
    )


def markdown(levels: list[Level]) -> str:
    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    rows = [
        "| clients | requests | failed | tokens/s | requests/s | latency p50 (s) | latency p95 (s) "
        "| TTFT p50 (s) | TTFT p95 (s) | answers changed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        rows.append(
            f"| {lv.concurrency} | {lv.requests} | {lv.failed} | {lv.tokens_per_s:.1f} | {lv.requests_per_s:.2f} | "
            f"{s(lv.latency_p50_s)} | {s(lv.latency_p95_s)} | {s(lv.ttft_p50_s)} | {s(lv.ttft_p95_s)} | "
            f"{'-' if lv.outputs_changed is None else lv.outputs_changed} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a request counts as failed")
    p.add_argument("--api-key", default=os.environ.get("API_KEY"), help="bearer key [API_KEY]")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    url = args.url.rstrip("/")

    model = served_model(url, args.api_key)
    one_request(url, args.api_key, {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                    "stream": True}, args.timeout)  # warm-up
    reference: dict[str, str] = {}
    if args.temperature == 0:
        for prompt in PROMPTS:
            sample = one_request(url, args.api_key, {
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                "temperature": 0, "stream": True}, args.timeout)
            if not sample.ok:
                raise SystemExit(f"the reference request failed: {sample.error}")
            reference[prompt] = sample.text
    levels = []
    for c in (int(x) for x in args.concurrency.split(",")):
        levels.append(run_level(url, args.api_key, model, c, args, reference))
        print(f"{c} clients: {levels[-1].tokens_per_s:.1f} tokens/s, {levels[-1].failed} failed", file=sys.stderr)
    print(f"model {model} at {url}, max_tokens={args.max_tokens}, temperature={args.temperature}, "
          f"{args.requests} requests per client\n")
    print(markdown(levels))
    for lv in levels:
        if lv.first_error:
            print(f"\n{lv.concurrency} clients, first error: {lv.first_error}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"url": url, "model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                       "requests_per_client": args.requests, "levels": [asdict(lv) for lv in levels]}, fh, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
