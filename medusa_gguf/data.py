"""Training data: texts and chats -> token sequences -> the base model's real hidden states in fp16 shards.

Sources: a Hugging Face dataset (`datasets`, wherever the hub or a local cache is reachable), local files
(.txt, .jsonl with `text`, .jsonl chat with `messages`), and self-distillation: the base model answers prompts
and the heads learn from its own answers (the Medusa paper's recipe). The generated corpus is cached.

Shards: safetensors files with `hidden` [N, n_embd] fp16 (h_t for each kept position t), `tokens` [N] int32
(the token at t), `future` [N, F] int32
(future[:, j] = token t+1+j, -1 past the end of the sequence; F = k_heads + 1, column 0 is the base model's own
next token) and `offsets` [S+1] int64 (rows of each sequence). A manifest, keyed by the model file's hash, the
token sequences and the settings, lets a re-run reuse them; any changed input rebuilds them.

Only the rows the heads will meet at run time are kept: in a chat, h_t from the last prompt token on (the heads
draft the model's answer, never the prompt or the chat template, whose boilerplate is trivially predictable and
would flatter the accuracies that the tree calibration reads). The prompt's positions are still decoded as context.
Plain texts keep every row.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .backend import Backend

log = logging.getLogger(__name__)

Message = dict[str, str]
SHARD_VERSION = 2


class DataError(ValueError):
    """Training data that cannot be read or reached; the message says what and what to do instead."""


@dataclass(frozen=True)
class Sample:
    """One training document: plain text, or a chat (list of role/content messages)."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def prompt(self) -> str:
        """The first user turn of a chat, or the opening of a text (a prompt for self-distillation)."""
        if self.messages:
            return next((c for r, c in self.messages if r == "user"), self.messages[0][1])
        return (self.text or "").strip().split("\n")[0][:300]


# -- reading -----------------------------------------------------------------------------------------------------


def read_file(path: Path) -> list[Sample]:
    """.txt: documents separated by blank lines. .jsonl: {"text": ...} or {"messages": [{role, content}, ...]}."""
    if not path.is_file():
        raise DataError(f"training file not found: {path}")
    if path.suffix == ".txt":
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
        return [Sample(text=d) for d in docs if d]
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
    samples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            samples.append(Sample(text=row["text"]))
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            try:
                msgs = tuple((m["role"], m["content"]) for m in row["messages"])
            except (TypeError, KeyError):
                raise DataError(f"{path}:{lineno}: each message needs 'role' and 'content'") from None
            samples.append(Sample(messages=msgs))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            samples.append(Sample(messages=(("user", row["prompt"]),)))
        else:
            raise DataError(f"{path}:{lineno}: expected a 'text' string, a 'messages' list or a 'prompt' string")
    return samples


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def read_hf_dataset(name: str, config: str | None, split: str, text_field: str = "text") -> list[Sample]:
    """A Hugging Face dataset from the local cache, or from the hub when it answers. Never hangs offline."""
    import datasets

    def load(offline: bool):
        if offline:
            os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        return datasets.load_dataset(name, config, split=split)

    try:
        ds = load(offline=os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable())
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()
        where = "it is not in the local cache and the Hugging Face Hub is unreachable" if offline else str(exc)
        raise DataError(
            f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {where}. "
            "Use local data instead: --train_files FILE.txt|FILE.jsonl, or --self_distill --prompts_file FILE"
        ) from None
    column = text_field if text_field in ds.column_names else None
    if column is None and "messages" in ds.column_names:
        return [Sample(messages=tuple((m["role"], m["content"]) for m in row["messages"])) for row in ds]
    if column is None:
        raise DataError(f"dataset {name!r} has no {text_field!r} or 'messages' column (has {ds.column_names})")
    return [Sample(text=t) for t in ds[column] if t and t.strip()]


# -- self-distillation -------------------------------------------------------------------------------------------


def self_distill(backend: Backend, prompts: Sequence[str], cache: Path, *, max_new_tokens: int = 256,
                 streams: int = 16, max_prompt_tokens: int = 512) -> list[Sample]:
    """Chats of (prompt, the base model's greedy answer). Answers are cached in `cache` (JSONL) and reused.

    `streams` prompts are answered per decode call, in a context of independent sequences (about 1.7x the
    tokens/s of one at a time on the CPU). Prompts over `max_prompt_tokens` are skipped with a warning.
    """
    done: dict[str, str] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            done[row["prompt"]] = row["answer"]
    todo = list(dict.fromkeys(p for p in prompts if p not in done))
    if todo:
        from dataclasses import replace as _replace

        cells = streams * (max_new_tokens + max_prompt_tokens)
        gen = Backend(_replace(backend.settings, n_ctx=cells), streams=streams)
        cache.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(todo), desc="self-distillation", unit="prompt")
        n_tokens, t0, skipped = 0, time.perf_counter(), 0
        with open(cache, "a", encoding="utf-8") as fh:  # appended as it goes: a killed run keeps its answers
            for start in range(0, len(todo), streams):
                group = todo[start : start + streams]
                toks = [gen.tokenize(gen.render([{"role": "user", "content": p}])) for p in group]
                keep = [i for i, t in enumerate(toks) if len(t) <= max_prompt_tokens]
                skipped += len(group) - len(keep)
                answers = gen.greedy_batch([toks[i] for i in keep], max_new_tokens)
                for i, answer in zip(keep, answers):
                    done[group[i]] = gen.detokenize(answer)
                    fh.write(json.dumps({"prompt": group[i], "answer": done[group[i]]}) + "\n")
                    n_tokens += len(answer)
                fh.flush()
                bar.update(len(group))
                bar.set_postfix(tokens_per_s=f"{n_tokens / (time.perf_counter() - t0):.0f}")
        bar.close()
        gen.close()
        if skipped:
            log.warning("skipped %d prompts longer than %d tokens", skipped, max_prompt_tokens)
    return [Sample(messages=(("user", p), ("assistant", done[p]))) for p in prompts if done.get(p)]


# -- tokens ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSeq:
    """One training sequence; rows (positions t) before `first_row` are context only: no loss, no accuracy."""

    tokens: list[int]
    first_row: int = 0


def tokenize_samples(backend: Backend, samples: Iterable[Sample], max_seq_len: int, *,
                     train_on_prompt: bool = False) -> list[TokenSeq]:
    """Token sequences of at most max_seq_len: chats through the model's template, long texts in chunks.

    A chat's rows start at the last token before its first assistant reply (whose hidden state drafts the reply),
    unless `train_on_prompt`."""
    seqs: list[TokenSeq] = []
    for s in samples:
        first = 0
        if s.messages:
            messages = [{"role": r, "content": c} for r, c in s.messages]
            toks = backend.tokenize(backend.render(messages, add_generation_prompt=False))
            reply = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
            if reply and not train_on_prompt:  # an opening assistant turn has no prompt: every row counts
                prompt = backend.tokenize(backend.render(messages[:reply], add_generation_prompt=True))
                first = max(0, _common_prefix(prompt, toks) - 1)
        else:
            toks = backend.tokenize(s.text or "")
        for start in range(0, len(toks), max_seq_len):
            chunk = toks[start : start + max_seq_len]
            first_row = max(0, first - start)
            if len(chunk) - first_row >= 3:  # need h_t and a token two steps ahead
                seqs.append(TokenSeq(chunk, first_row))
    return seqs


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def split_sequences(seqs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/validation split by whole sequences; validation gets at least one."""
    order = list(range(len(seqs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(seqs) * val_fraction)) if len(seqs) > 1 else 0
    return [seqs[i] for i in order[n_val:]], [seqs[i] for i in order[:n_val]]


# -- hidden-state shards -----------------------------------------------------------------------------------------


@dataclass
class Manifest:
    key: str
    n_embd: int
    n_future: int
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    sequences: int = 0
    version: int = SHARD_VERSION

    def paths(self, folder: Path) -> list[Path]:
        return [folder / s for s in self.shards]


def cache_key(model_sha256: str, seqs: Sequence[Sequence[int]], n_future: int,
              first_rows: Sequence[int] | None = None) -> str:
    digest = hashlib.sha256(f"{SHARD_VERSION}|{model_sha256}|{n_future}".encode())
    for s in seqs:
        digest.update(np.asarray(s, dtype=np.int32).tobytes() + b"|")
    if first_rows is not None and any(first_rows):  # all rows kept: the same key as before rows could be skipped
        digest.update(b"first_rows|" + np.asarray(first_rows, dtype=np.int64).tobytes())
    return digest.hexdigest()[:20]


def future_tokens(seq: Sequence[int], n_future: int) -> np.ndarray:
    """[len(seq), n_future] int32: row t holds tokens t+1 .. t+n_future, -1 past the end."""
    arr = np.full((len(seq), n_future), -1, dtype=np.int32)
    s = np.asarray(seq, dtype=np.int32)
    for j in range(n_future):
        arr[: max(0, len(s) - 1 - j), j] = s[1 + j :]
    return arr


def build_shards(
    backend: Backend, seqs: Sequence[Sequence[int]], folder: Path, *, model_sha256: str, n_future: int,
    shard_rows: int = 32768, desc: str = "hidden states", first_rows: Sequence[int] | None = None,
) -> Manifest:
    """Extract h_t for every position of every sequence and write fp16 shards; reuse them if the key matches.

    Memory stays bounded by one shard whatever the dataset size. Rows before the sequence's entry in `first_rows`
    (context only, see `TokenSeq`) and rows whose token t+2 does not exist (no target for head 1) are dropped.
    """
    from safetensors.numpy import save_file

    if first_rows is not None and len(first_rows) != len(seqs):
        raise ValueError(f"first_rows has {len(first_rows)} entries for {len(seqs)} sequences")
    key = cache_key(model_sha256, seqs, n_future, first_rows)
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        old = Manifest(**json.loads(manifest_path.read_text()))
        if old.key == key and all(p.is_file() for p in old.paths(folder)):
            log.info("reusing %d cached hidden-state rows in %s", old.rows, folder)
            return old
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("shard-*.safetensors"):
        stale.unlink()
    manifest = Manifest(key=key, n_embd=backend.n_embd, n_future=n_future)
    buf_h: list[np.ndarray] = []
    buf_t: list[np.ndarray] = []
    buf_f: list[np.ndarray] = []
    lengths: list[int] = []

    def flush() -> None:
        if not buf_h:
            return
        name = f"shard-{len(manifest.shards):05d}.safetensors"
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tmp = folder / f".{name}.tmp"
        arrays = {"hidden": np.concatenate(buf_h), "tokens": np.concatenate(buf_t), "future": np.concatenate(buf_f)}
        save_file({**arrays, "offsets": offsets}, str(tmp))
        os.replace(tmp, folder / name)
        manifest.shards.append(name)
        manifest.rows += int(offsets[-1])
        manifest.sequences += len(lengths)
        buf_h.clear(), buf_t.clear(), buf_f.clear(), lengths.clear()

    total = sum(len(s) for s in seqs)
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True)
    group: list[tuple[Sequence[int], int]] = []  # (sequence, its first kept row)
    group_tokens = 0
    for i, item in enumerate(zip(seqs, first_rows if first_rows is not None else [0] * len(seqs))):
        group.append(item)
        group_tokens += len(item[0])
        if group_tokens < 4096 and i + 1 < len(seqs):
            continue
        for (s, first), h in zip(group, backend.extract_hidden([s for s, _ in group])):
            fut = future_tokens(s, n_future)
            keep = (fut[:, 1] >= 0) & (np.arange(len(s)) >= first)
            buf_h.append(h[keep].astype(np.float16))
            buf_t.append(np.asarray(s, dtype=np.int32)[keep])
            buf_f.append(fut[keep])
            lengths.append(int(keep.sum()))
        bar.update(group_tokens)
        group, group_tokens = [], 0
        if sum(lengths) >= shard_rows:
            flush()
    flush()
    bar.close()
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(asdict(manifest), indent=1))
    os.replace(tmp, manifest_path)
    return manifest


def read_shard(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def iter_rows(paths: Sequence[Path]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(hidden fp16 [n, D], future int32 [n, F]) shard by shard."""
    for p in paths:
        shard = read_shard(p)
        yield shard["hidden"], shard["future"]


def token_counts(paths: Sequence[Path], n_vocab: int, n_future: int) -> np.ndarray:
    """How often each token is a head target (columns 1..n_future-1) across the shards: [n_vocab]."""
    counts = np.zeros(n_vocab, dtype=np.int64)
    for _, fut in iter_rows(paths):
        t = fut[:, 1:n_future].ravel()
        counts += np.bincount(t[t >= 0], minlength=n_vocab)
    return counts
