"""Time to first token on a long chat prompt: `Backend.prefill` alone, and the first text piece out of `generate`.

    python scripts/ttft.py --prompt-tokens 1000 --threads 2 [--repeats 5] [--json ttft.json]

The prompt is one user message made of README.md's first paragraphs, as many as bring the chat-templated prompt
nearest --prompt-tokens (real text; the table gives its exact length). Decoding is plain (no heads), greedy.
Each measure runs once to warm up, then --repeats times; the table gives the median, min and max.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable

from medusa_gguf.backend import Backend
from medusa_gguf.decoding import SamplingParams, generate
from medusa_gguf.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def long_prompt(backend: Backend, n_tokens: int, source: Path = README) -> list[int]:
    """Tokens of a chat prompt whose user message is the first paragraphs of `source`, as near `n_tokens` as whole
    paragraphs allow."""
    paragraphs = [p.strip() for p in source.read_text().split("\n\n") if p.strip()]
    best: list[int] = []
    for n in range(1, len(paragraphs) + 1):
        text = "\n\n".join(paragraphs[:n])
        tokens = backend.tokenize(backend.apply_chat_template([{"role": "user", "content": text}]))
        if not best or abs(len(tokens) - n_tokens) < abs(len(best) - n_tokens):
            best = tokens
        if len(tokens) >= n_tokens:
            break
    return best


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def first_piece(backend: Backend, tokens: list[int]) -> str:
    """Run `generate` up to its first yielded text piece (the first emitted token), then close it."""
    gen = generate(backend, tokens, SamplingParams(max_tokens=16))
    try:
        return next(gen)
    finally:
        gen.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=1000, help="target prompt length in tokens (default 1000)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measure (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: N_THREADS or automatic)")
    ap.add_argument("--n-ctx", type=int, default=None, help="context window (default: N_CTX or 4096)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    settings = Settings.from_env(n_threads=args.threads, n_ctx=args.n_ctx)
    with Backend(settings) as backend:
        tokens = long_prompt(backend, args.prompt_tokens)
        measures = {
            "prefill": timed(lambda: backend.prefill(tokens), args.repeats, args.warmup),
            "first token (generate)": timed(lambda: first_piece(backend, tokens), args.repeats, args.warmup),
        }
        threads, model = backend.n_threads, backend.model_path.name

    print(f"{model}, prompt {len(tokens)} tokens, {threads} threads, n_batch {backend.n_batch}, "
          f"median of {args.repeats} after {args.warmup} warm-up\n")
    print("| measure | median (ms) | min (ms) | max (ms) | prompt tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, times in measures.items():
        med = statistics.median(times)
        print(f"| {name} | {med * 1e3:.1f} | {min(times) * 1e3:.1f} | {max(times) * 1e3:.1f} | {len(tokens) / med:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "model": model, "prompt_tokens": len(tokens), "threads": threads, "n_batch": backend.n_batch,
            "repeats": args.repeats, "warmup": args.warmup,
            "median_s": {k: statistics.median(v) for k, v in measures.items()}, "times_s": measures,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
