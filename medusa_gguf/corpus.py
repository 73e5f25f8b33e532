"""The self-distilled corpus: the base model's greedy answers to prompts, kept in the repository as token ids.

    nice -n 19 python -m medusa_gguf.corpus grow --target-tokens 1000000 [--minutes 60] \
        [--prompts medusa_gguf/prompts/corpus_prompts.jsonl medusa_gguf/prompts/train.jsonl]
    python -m medusa_gguf.corpus info

Self-distillation is the slow part of making training data (hours for a million answer tokens on two CPU cores),
while hidden states can be re-extracted from token ids by one prefill pass (`data.build_shards`). So answers are
generated once, stored compressed, and grown in resumable chunks across sessions: nobody self-distills twice.

Layout, one folder per model file: data/corpus/<first 12 hex digits of the GGUF's SHA-256>/
- manifest.json: the model's file name and SHA-256, the chat format (a rendered prompt), the generation
  settings, the KV cache type, the end-of-turn tokens, the chunks (name, samples, prompt and answer tokens), and the ids of the
  prompts done or skipped (too long).
- chunk-00000.npz, ...: compressed arrays. `ids`, `sources` [S] str; `prompt_tokens`, `answer_tokens` int32 with
  `prompt_offsets`, `answer_offsets` int64 [S+1]; `finished` bool [S] (the answer ended with the end-of-generation
  token, which is not stored, rather than at the length cap); `meta`, a JSON string with the model hash, the
  generation settings and the KV type, so a chunk is self-describing.

Crash safety: a chunk goes to a temporary file that `os.replace` renames, then the manifest likewise. A run killed
inside a chunk loses that chunk's answers only (its temporary file is removed on the next open); one killed between
the chunk and the manifest leaves a chunk that the next open adopts, after checking its `meta`.

Exactness: answers come from `Backend.greedy_batch` in a context of independent streams whose calls hold at most
EXACT_BATCH (63) tokens, the calls that are batch-invariant on this build. With the bf16 KV cache (KV_TYPE=auto on a
CPU) the batched answers equal plain one-prompt-at-a-time decoding (`Backend.prefill` then `append`) token for token:
8 template prompts x 48 tokens and tests/test_corpus.py. With the f16 cache they did not (5 of 8 prompts differed
between two runs' contexts), so the manifest records the KV type and a store refuses answers made with another.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .backend import EXACT_BATCH, Backend
from .data import TokenSeq
from .models import file_sha256, resolve_model_path
from .settings import Settings

log = logging.getLogger(__name__)

CORPUS_VERSION = 1
ROOT = Path(__file__).resolve().parents[1] / "data" / "corpus"
PROMPTS = Path(__file__).parent / "prompts" / "corpus_prompts.jsonl"
FORMAT_PROBE = "{prompt}"  # rendered through the chat template: the manifest's record of the chat format


class CorpusError(ValueError):
    """A corpus folder that does not fit the model, the settings or its own manifest; the message says what to do."""


@dataclass(frozen=True)
class Prompt:
    id: str  # first 16 hex digits of the text's SHA-256 unless the file gives one
    text: str
    source: str


@dataclass(frozen=True)
class Generation:
    """How answers are made; a store holds answers of one setting only."""

    max_new_tokens: int = 256
    max_prompt_tokens: int = 512  # longer prompts are skipped (and remembered as skipped)
    n_batch: int = EXACT_BATCH  # tokens per decode call at most: answers independent of the batching
    decoding: str = "greedy"
    stop: str = "end-of-generation token (not stored) or max_new_tokens"


@dataclass
class Manifest:
    model_file: str
    model_sha256: str
    chat_format: str
    end_of_turn: list[int]  # tokens the chat template puts after a finished answer
    generation: dict
    kv_type: str  # the KV cache's element type: it decides near-ties (see Exactness above)
    chunks: list[dict] = field(default_factory=list)  # {"name", "samples", "prompt_tokens", "answer_tokens"}
    done: list[str] = field(default_factory=list)  # prompt ids, in the order they were answered
    skipped: list[str] = field(default_factory=list)  # prompt ids over max_prompt_tokens
    version: int = CORPUS_VERSION

    @property
    def answer_tokens(self) -> int:
        return sum(c["answer_tokens"] for c in self.chunks)


@dataclass(frozen=True)
class Record:
    """One stored sample."""

    id: str
    source: str
    prompt: np.ndarray  # [P] int32: the chat-formatted prompt, generation prompt included
    answer: np.ndarray  # [A] int32: the greedy answer, end-of-generation token excluded
    finished: bool  # stopped at end-of-generation (else at max_new_tokens)


@dataclass(frozen=True)
class GrowReport:
    folder: Path
    samples: int  # new this run
    answer_tokens: int  # new this run
    seconds: float  # generation time this run
    total_answer_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.answer_tokens / self.seconds if self.seconds else 0.0


def corpus_dir(root: Path, model_sha256: str) -> Path:
    return Path(root) / model_sha256[:12]


def read_prompts(path: Path) -> list[Prompt]:
    """JSONL rows with `prompt` and optionally `id`, `source` (or `category`, as in train.jsonl)."""
    prompts = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("prompt"), str):
            raise CorpusError(f"{path}:{lineno}: expected a 'prompt' string")
        pid = row.get("id") or hashlib.sha256(row["prompt"].encode()).hexdigest()[:16]
        source = row.get("source") or f"{Path(path).stem}:{row.get('category', '')}"
        prompts.append(Prompt(pid, row["prompt"], source))
    return prompts


# -- the store ---------------------------------------------------------------------------------------------------


class Store:
    """One corpus folder: its manifest and chunks. Open it with `Store.open`, which checks it fits the model."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = folder
        self.manifest = manifest

    @classmethod
    def open(cls, folder: Path, expected: Manifest) -> "Store":
        """The store in `folder`, created from `expected` (no chunks) if absent. Refuses a store of another model,
        chat format or generation setting; removes temporary files; adopts chunks the manifest lost."""
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            store = cls(folder, expected)
        else:
            store = cls(folder, read_manifest(folder))
            store.check(expected)
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink()
        store._adopt_orphans()
        store.save()
        return store

    def check(self, expected: Manifest) -> None:
        m = self.manifest
        if m.model_sha256 != expected.model_sha256:
            raise CorpusError(
                f"{self.folder} holds answers of model {m.model_file} (sha256 {m.model_sha256[:12]}…), not of "
                f"{expected.model_file} (sha256 {expected.model_sha256[:12]}…); its own folder is "
                f"{corpus_dir(self.folder.parent, expected.model_sha256)}"
            )
        for name in ("chat_format", "end_of_turn", "generation", "kv_type"):
            if getattr(m, name) != getattr(expected, name):
                raise CorpusError(
                    f"{self.folder} was grown with {name} {getattr(m, name)!r}, not {getattr(expected, name)!r}; "
                    "grow it with the same settings, or give another --root for the new ones"
                )

    def meta(self) -> str:
        m = self.manifest
        return json.dumps({"model_sha256": m.model_sha256, "generation": m.generation, "kv_type": m.kv_type},
                          sort_keys=True)

    def _adopt_orphans(self) -> None:
        listed = {c["name"] for c in self.manifest.chunks}
        for path in sorted(self.folder.glob("chunk-*.npz")):
            if path.name in listed:
                continue
            with np.load(path) as z:
                if str(z["meta"]) != self.meta():
                    raise CorpusError(f"{path} is not in the manifest and was made with other settings: {z['meta']}")
                ids = [str(i) for i in z["ids"]]
                entry = {"name": path.name, "samples": len(ids), "prompt_tokens": int(z["prompt_offsets"][-1]),
                         "answer_tokens": int(z["answer_offsets"][-1])}
            log.warning("adopting %s (%d samples): the run that wrote it stopped before its manifest", path, len(ids))
            self.manifest.chunks.append(entry)
            known = set(self.manifest.done)
            self.manifest.done += [i for i in ids if i not in known]

    def save(self) -> None:
        tmp = self.folder / ".manifest.json.tmp"
        tmp.write_text(json.dumps(asdict(self.manifest), indent=1) + "\n")
        os.replace(tmp, self.folder / "manifest.json")

    def append(self, records: Sequence[Record], skipped: Sequence[str] = ()) -> None:
        """Write one chunk atomically, then the manifest that lists it."""
        m = self.manifest
        known = set(m.skipped)
        m.skipped += [s for s in skipped if s not in known]
        if records:
            name = f"chunk-{len(m.chunks):05d}.npz"
            while (self.folder / name).exists():  # never overwrite a chunk, listed or not
                name = f"chunk-{int(name[6:11]) + 1:05d}.npz"
            tmp = self.folder / f".{name}.tmp"
            with open(tmp, "wb") as fh:
                np.savez_compressed(
                    fh, ids=np.array([r.id for r in records]), sources=np.array([r.source for r in records]),
                    prompt_tokens=_concat([r.prompt for r in records]), prompt_offsets=_offsets([r.prompt for r in records]),
                    answer_tokens=_concat([r.answer for r in records]), answer_offsets=_offsets([r.answer for r in records]),
                    finished=np.array([r.finished for r in records], dtype=bool), meta=np.array(self.meta()),
                )
            os.replace(tmp, self.folder / name)
            m.chunks.append({"name": name, "samples": len(records), "prompt_tokens": sum(len(r.prompt) for r in records),
                             "answer_tokens": sum(len(r.answer) for r in records)})
            m.done += [r.id for r in records]
        self.save()

    def records(self) -> Iterator[Record]:
        for chunk in self.manifest.chunks:
            with np.load(self.folder / chunk["name"]) as z:
                po, ao = z["prompt_offsets"], z["answer_offsets"]
                pt, at = z["prompt_tokens"], z["answer_tokens"]
                for i, (pid, src, fin) in enumerate(zip(z["ids"], z["sources"], z["finished"])):
                    yield Record(str(pid), str(src), pt[po[i] : po[i + 1]], at[ao[i] : ao[i + 1]], bool(fin))


def _concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.int32) for a in arrays]) if arrays else np.zeros(0, np.int32)


def _offsets(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise CorpusError(f"no corpus in {folder}: manifest.json is missing (grow one with python -m medusa_gguf.corpus grow)")
    data = json.loads(path.read_text())
    if data.get("version") != CORPUS_VERSION:
        raise CorpusError(f"{path} has corpus version {data.get('version')}; this code reads version {CORPUS_VERSION}")
    return Manifest(**data)


# -- growing -----------------------------------------------------------------------------------------------------


def _settings(model: Backend | Settings | Path | str | None) -> Settings:
    if isinstance(model, Backend):
        return replace(model.settings, base_model_path=model.model_path)
    if isinstance(model, Settings):
        return model
    return Settings.from_env(base_model_path=Path(model) if model else None)


def expected_manifest(backend: Backend, model_sha256: str, gen: Generation) -> Manifest:
    """What a store for this model and setting must say, from the model's own chat template."""
    fmt = backend.render([{"role": "user", "content": FORMAT_PROBE}])
    prompt = backend.tokenize(backend.render([{"role": "user", "content": "x"}]))
    full = backend.tokenize(backend.render(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}], add_generation_prompt=False))
    n = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    return Manifest(model_file=backend.model_path.name, model_sha256=model_sha256, chat_format=fmt,
                    end_of_turn=[int(t) for t in full[n:]], generation=asdict(gen), kv_type=backend.kv_type)


def generation_backend(settings: Settings, streams: int, gen: Generation) -> Backend:
    """A context of `streams` independent sequences, each with room for the longest prompt and answer."""
    cells = streams * (gen.max_prompt_tokens + gen.max_new_tokens)
    return Backend(replace(settings, n_ctx=cells), streams=streams, n_batch=gen.n_batch)


def grow(
    model: Backend | Settings | Path | str | None, prompts: Sequence[Prompt], *, target_tokens: int,
    root: Path = ROOT, chunk_size: int = 64, streams: int = 16, gen: Generation = Generation(),
    max_seconds: float | None = None, progress: bool = True,
) -> GrowReport:
    """Answer prompts not yet done, in order, until the store holds `target_tokens` answer tokens (or the prompts or
    `max_seconds` run out; both are checked between chunks). Every `chunk_size` prompts become one chunk."""
    settings = _settings(model)
    model_path = resolve_model_path(settings.base_model_path)
    sha = file_sha256(model_path)
    folder = corpus_dir(root, sha)
    with generation_backend(settings, streams, gen) as backend:
        store = Store.open(folder, expected_manifest(backend, sha, gen))
        finished = set(store.manifest.done) | set(store.manifest.skipped)
        todo = [p for p in dict((p.id, p) for p in prompts).values() if p.id not in finished]
        start_tokens = store.manifest.answer_tokens
        bar = tqdm(total=target_tokens, initial=min(start_tokens, target_tokens), unit="tok", desc="self-distillation",
                   disable=not progress, dynamic_ncols=True)
        samples = new_tokens = 0
        seconds = 0.0
        for start in range(0, len(todo), chunk_size):
            if store.manifest.answer_tokens >= target_tokens or (max_seconds is not None and seconds >= max_seconds):
                break
            t0 = time.perf_counter()
            records, skipped = answer(backend, todo[start : start + chunk_size], streams, gen,
                                      on_tokens=lambda n: bar.update(n))
            seconds += time.perf_counter() - t0
            store.append(records, skipped)
            samples += len(records)
            new_tokens += sum(len(r.answer) for r in records)
            bar.set_postfix(answer_tok_s=f"{new_tokens / seconds:.1f}", samples=len(store.manifest.done))
        bar.close()
    report = GrowReport(folder, samples, new_tokens, seconds, store.manifest.answer_tokens)
    log.info("%s: %d new samples, %d answer tokens in %.0f s (%.1f tokens/s); %d in all", folder, samples, new_tokens,
             seconds, report.tokens_per_s, report.total_answer_tokens)
    return report


def answer(backend: Backend, prompts: Sequence[Prompt], streams: int, gen: Generation,
           on_tokens=lambda n: None) -> tuple[list[Record], list[str]]:
    """Greedy answers, `streams` prompts per decode call; also the ids of prompts over max_prompt_tokens."""
    tokens = [backend.tokenize(backend.render([{"role": "user", "content": p.text}])) for p in prompts]
    keep = [i for i, t in enumerate(tokens) if len(t) <= gen.max_prompt_tokens]
    skipped = [prompts[i].id for i, t in enumerate(tokens) if len(t) > gen.max_prompt_tokens]
    records = []
    for start in range(0, len(keep), streams):
        group = keep[start : start + streams]
        for i, out in zip(group, backend.greedy_batch([tokens[i] for i in group], gen.max_new_tokens)):
            records.append(Record(prompts[i].id, prompts[i].source, np.asarray(tokens[i], dtype=np.int32),
                                  np.asarray(out, dtype=np.int32), finished=len(out) < gen.max_new_tokens))
            on_tokens(len(out))
    return records, skipped


# -- reading -----------------------------------------------------------------------------------------------------


def load(folder: Path, *, model_sha256: str | None = None, max_seq_len: int = 0,
         sources: Sequence[str] = ()) -> list[TokenSeq]:
    """The corpus as training sequences: prompt, answer and (when it finished) the end-of-turn tokens, with
    `first_row` at the last prompt token, whose hidden state drafts the answer; the prompt is context only.
    This is what `data.tokenize_samples` makes of a chat, and `data.build_shards` takes (tokens, first_rows).
    `max_seq_len` splits longer sequences as tokenize_samples does; `sources` keeps those whose source starts so."""
    manifest = read_manifest(folder)
    if model_sha256 is not None and manifest.model_sha256 != model_sha256:
        raise CorpusError(f"{folder} holds answers of sha256 {manifest.model_sha256[:12]}…, not of the model given "
                          f"(sha256 {model_sha256[:12]}…): hidden states would not match its tokens")
    seqs = []
    for r in Store(Path(folder), manifest).records():
        if sources and not r.source.startswith(tuple(sources)):
            continue
        toks = [*r.prompt.tolist(), *r.answer.tolist(), *(manifest.end_of_turn if r.finished else [])]
        first = len(r.prompt) - 1
        step = max_seq_len or len(toks)
        for s in range(0, len(toks), step):
            chunk, first_row = toks[s : s + step], max(0, first - s)
            if len(chunk) - first_row >= 3:  # h_t and a token two steps ahead
                seqs.append(TokenSeq(chunk, first_row))
    return seqs


# -- command line ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medusa_gguf.corpus", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grow", help="answer more prompts and append chunks")
    g.add_argument("--target-tokens", type=int, required=True, help="stop once the store holds this many answer tokens")
    g.add_argument("--minutes", type=float, default=None, help="stop after about this much generation time")
    g.add_argument("--prompts", type=Path, nargs="+", default=[PROMPTS],
                   help="prompt JSONL files, answered in order (default: %(default)s)")
    g.add_argument("--chunk-size", type=int, default=64, help="prompts per chunk file (default: %(default)s)")
    g.add_argument("--streams", type=int, default=16, help="prompts per decode call (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=Generation.max_new_tokens, help="(default: %(default)s)")
    for q in (g, sub.add_parser("info", help="what the store for the model holds")):
        q.add_argument("--root", type=Path, default=ROOT, help="corpus root (default: %(default)s)")
        q.add_argument("--base_model_path", type=Path, default=None, help="GGUF (default: the embedded model)")
        q.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores up to 4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(base_model_path=args.base_model_path, n_threads=args.threads)
    if args.cmd == "info":
        folder = corpus_dir(args.root, file_sha256(resolve_model_path(settings.base_model_path)))
        m = read_manifest(folder)
        size = sum((folder / c["name"]).stat().st_size for c in m.chunks)
        print(f"{folder}: {len(m.chunks)} chunks, {len(m.done)} samples, {m.answer_tokens} answer tokens, "
              f"{sum(c['prompt_tokens'] for c in m.chunks)} prompt tokens, {len(m.skipped)} prompts skipped, "
              f"{size / 1e6:.2f} MB ({size / max(1, m.answer_tokens) * 1000 / 1e3:.1f} kB per 1k answer tokens)")
        return 0
    gen = Generation(max_new_tokens=args.max_new_tokens)
    prompts = [p for path in args.prompts for p in read_prompts(path)]
    report = grow(settings, prompts, target_tokens=args.target_tokens, root=args.root,
                  chunk_size=args.chunk_size, streams=args.streams, gen=gen,
                  max_seconds=args.minutes * 60 if args.minutes else None)
    print(f"{report.folder}: +{report.samples} samples, +{report.answer_tokens} answer tokens in {report.seconds:.0f} s "
          f"({report.tokens_per_s:.1f} tokens/s); {report.total_answer_tokens} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
