"""Hidden-state extraction speed next to llama.cpp's raw batched prefill, same model, same process.

    .venv/bin/python scripts/extraction_speed.py [--tokens 4096] [--threads 2]
"""
import argparse
import random
import time

from medusa_gguf.backend import Backend
from medusa_gguf.settings import Settings

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tokens", type=int, default=4096, help="tokens per measurement")
parser.add_argument("--threads", type=int, default=None)
args = parser.parse_args()
rng = random.Random(0)
with Backend(Settings.from_env(n_threads=args.threads)) as backend:
    seqs = [[rng.randrange(backend.n_vocab) for _ in range(256)] for _ in range(args.tokens // 256)]
    flat = [t for s in seqs for t in s]
    raw = backend.raw_prefill_tokens_per_s(flat)
    t0 = time.perf_counter()
    backend.extract_hidden(seqs)
    ours = len(flat) / (time.perf_counter() - t0)
    raw2 = backend.raw_prefill_tokens_per_s(flat)
print(f"| raw llama.cpp prefill (512-token chunks, last logits only) | {(raw + raw2) / 2:.0f} tokens/s |")
print(f"| hidden-state extraction (63-token exact calls, all hidden states) | {ours:.0f} tokens/s |")
print(f"| ratio | {ours / ((raw + raw2) / 2):.2f} |")
