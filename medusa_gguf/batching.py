"""Many requests, one model: continuous batching over one llama.cpp context.

Each request decodes through a `Slot`, which stands in for the Backend that `decoding.generate` drives, unchanged,
in the request's own thread. A slot's decode does not run at once: it joins the pending work, and when every
active slot has asked for its next call (or the oldest has waited `max_wait_s`), one of the waiting threads runs a
round for all of them:
- one call (more when they exceed EXACT_BATCH tokens) with every plain step, every verification tree and every
  prompt's last chunk, each text in its own sequence of the shared cache (`Backend.decode_batch`);
- one silent call with chunks of the prompts still being read, at most EXACT_BATCH tokens, oldest prompt first.
  So a long prompt is read a chunk per round, between the others' steps, and never stalls them for long.
Then each thread verifies and commits its own text. Every call keeps at most EXACT_BATCH tokens, so each row's
results are bit-identical to those it gets alone: greedy output does not depend on the load.

A finished request's text stays in its slot's cells as a prompt cache: a new prompt starts from the longest prefix
any text in the cache holds (the chat template's system prompt, the conversation so far), shared, not decoded
again (`Backend.reuse_prefix`). Not with layer taps on: an EAGLE-3 drafter needs every prompt token's features.

llama.cpp is only ever called by one thread at a time (`_llama`, a lock held around every call and cache edit).
With more than one slot, rounds run on one long-lived thread of the batcher's own, whichever request asked for
them: OpenMP (llama.cpp's CPU threads) keeps a pool of workers per thread that ever led its work, and several pools
on a machine with as many cores as decoding threads make every pool's barriers sleep instead of spin.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .backend import EXACT_BATCH, Backend, ContextLengthError, DecodeOutput, SeqState, Work, tree_leaves
from .decoding import Cancelled

log = logging.getLogger(__name__)


@dataclass
class _Job:
    slot: "Slot"
    tokens: Sequence[int]
    parents: Sequence[int] | None = None
    prefill: bool = False
    offset: int = 0  # prefill: prompt tokens already in the cache
    features: list = field(default_factory=list)  # prefill: feature rows of the chunks read so far
    submitted: float = 0.0
    done: bool = False
    result: DecodeOutput | None = None
    error: BaseException | None = None

    @property
    def n_left(self) -> int:
        return len(self.tokens) - self.offset

    def finish(self, result: DecodeOutput | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True


@dataclass
class BatchStats:
    """What the batcher did, for logs, metrics and the load benchmark."""

    rounds: int = 0
    calls: int = 0
    tokens: int = 0  # tokens decoded, prompt chunks included
    step_rows: int = 0  # tokens of the calls with outputs (steps, trees, last prompt chunks)
    early_rounds: int = 0  # rounds started before every active slot had asked (max_wait_s)
    prompt_tokens: int = 0  # prompt tokens of the requests served
    reused_tokens: int = 0  # of those, read from the cache (a prefix some text held) instead of decoded
    seconds: float = 0.0  # inside llama.cpp calls


class Batcher:
    """The slots of one Backend built with `slots=n`, and the rounds that serve them (see the module docstring)."""

    def __init__(self, backend: Backend, *, max_wait_s: float = 0.25) -> None:
        self.backend = backend
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._llama = threading.Lock()
        self._pending: list[_Job] = []
        self._active = 0
        self._running = False
        backend.reset()
        self.slots = [Slot(self, state) for state in backend.states]
        # one slot: its request's thread leads every call, the drafter's included, so there is one pool already
        self._rounds = ThreadPoolExecutor(1, thread_name_prefix="rounds") if len(self.slots) > 1 else None

    def close(self) -> None:
        if self._rounds is not None:
            self._rounds.shutdown(wait=True)

    @property
    def active(self) -> int:
        return self._active

    # -- called by slots ---------------------------------------------------------------------------------------

    def _enter(self) -> None:
        with self._cond:
            self._active += 1

    def _leave(self, slot: "Slot") -> None:
        with self._llama:
            self.backend.discard_tree(slot.state)  # the text itself stays: a prompt cache for the next requests
        with self._cond:
            self._active -= 1
            self._cond.notify_all()  # the others may all be waiting now

    def _edit(self, fn: Callable, *args):
        """A cache edit (commit, release) between rounds."""
        with self._llama:
            return fn(*args)

    def _submit(self, job: _Job) -> DecodeOutput | None:
        with self._cond:
            job.submitted = time.monotonic()
            self._pending.append(job)
            self._cond.notify_all()
            while not job.done:
                waited = time.monotonic() - self._pending[0].submitted if self._pending else 0.0
                if not self._running and self._pending and (len(self._pending) >= self._active
                                                           or waited >= self.max_wait_s):
                    jobs, self._running = list(self._pending), True
                    early = len(jobs) < self._active
                    self._cond.release()
                    try:
                        if self._rounds is None:
                            self._round(jobs, early)
                        else:
                            self._rounds.submit(self._round, jobs, early).result()
                    finally:
                        self._cond.acquire()
                        self._running = False
                        self._pending = [j for j in self._pending if not j.done]
                        self._cond.notify_all()
                else:
                    self._cond.wait(timeout=self.max_wait_s)
        if job.error is not None:
            raise job.error
        return job.result

    # -- a round -----------------------------------------------------------------------------------------------

    def _round(self, jobs: list[_Job], early: bool) -> None:
        be = self.backend
        self.stats.rounds += 1
        self.stats.early_rounds += early
        with self._llama:
            live = []
            for j in jobs:
                if j.slot.cancelled():
                    j.finish(error=Cancelled())
                    continue
                try:
                    if not j.prefill:
                        be.check_room(j.slot.state, len(j.tokens) if j.parents is None else _depth(j.parents) + 1)
                    live.append(j)
                except ContextLengthError as exc:
                    j.finish(error=exc)
            # steps and trees (as many trees as there are free leaf sequences; the rest wait for the next round),
            # and the prompts whose last chunk fits one call
            leaves, out = be.free_leaves, []
            for j in live:
                if j.parents is not None:
                    n = len(tree_leaves(j.parents))
                    if n > leaves:
                        continue
                    leaves -= n
                if not j.prefill:
                    out.append(j)
            out += [j for j in live if j.prefill and j.n_left <= EXACT_BATCH]
            calls: list[tuple[list, bool]] = [(call, True) for call in _pack(out)]
            # one silent call with the next chunks of longer prompts (each keeps at least its last token back)
            room, chunk = EXACT_BATCH, []
            for j in live:
                if j.prefill and j.n_left > EXACT_BATCH and room > 0:
                    n = min(room, j.n_left - 1)
                    chunk.append((j, n))
                    room -= n
            if chunk:
                calls.append((chunk, False))
            # room for the whole round first: once a call's trees wait for their commits, no compaction is possible
            sizes = [sum(n for _, n in c) if not outputs else sum(j.n_left if j.prefill else len(j.tokens) for j in c)
                     for c, outputs in calls]
            free = be.reserve(sum(sizes))
            for (call, outputs), size in zip(calls, sizes):
                if size > free:  # what does not fit waits for the next round, after the commits
                    break
                free -= size
                self._call(call, outputs=outputs)

    def _call(self, call: list, *, outputs: bool) -> None:
        """One decode_batch call. `call`: jobs (outputs=True, chains before trees) or (prefill job, n tokens)."""
        if outputs:
            works = [Work(j.slot.state, j.tokens[j.offset:] if j.prefill else j.tokens, j.parents,
                          "last" if j.prefill else "all") for j in call]
            jobs = list(call)
        else:
            works = [Work(j.slot.state, j.tokens[j.offset : j.offset + n], None, "none") for j, n in call]
            jobs = [j for j, _ in call]
        t0 = time.perf_counter()
        try:
            results = self.backend.decode_batch(works)
        except Exception as exc:  # noqa: BLE001 (a failed call fails its jobs, not the batcher)
            log.warning("a batched decode of %d texts failed: %s", len(works), exc)
            for j in jobs:
                j.finish(error=exc)
            return
        n_tokens = sum(len(w.tokens) for w in works)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        self.stats.tokens += n_tokens
        self.stats.step_rows += n_tokens if outputs else 0
        for j, w, r in zip(jobs, works, results):
            if not j.prefill:
                j.finish(r)
                continue
            j.offset += len(w.tokens)
            if r is not None and r.features is not None:
                j.features.append(r.features)
            if j.offset == len(j.tokens):
                feats = np.concatenate(j.features) if j.features else None
                j.finish(DecodeOutput(logits=r.logits, hidden=r.hidden, features=feats))


def _depth(parents: Sequence[int]) -> int:
    depths: list[int] = []
    for p in parents:
        depths.append(0 if p < 0 else depths[p] + 1)
    return max(depths)


def _pack(jobs: list[_Job]) -> list[list[_Job]]:
    """Calls of at most EXACT_BATCH tokens, in arrival order, each with its chains before its trees (a tree's
    discarded tail can then be freed when it is the call's last)."""
    calls: list[list[_Job]] = []
    size = EXACT_BATCH + 1
    for j in jobs:
        n = j.n_left if j.prefill else len(j.tokens)
        if size + n > EXACT_BATCH:
            calls.append([])
            size = 0
        calls[-1].append(j)
        size += n
    return [sorted(c, key=lambda j: j.parents is not None) for c in calls]


class Slot:
    """One request's view of the shared Backend: what decoding.generate and the drafters call. Its decodes wait
    for the round; edits of its own text run between rounds. Use `serving()` around a generation."""

    def __init__(self, batcher: Batcher, state: SeqState) -> None:
        self.batcher, self.state, self.backend = batcher, state, batcher.backend
        self.cancelled: Callable[[], bool] = lambda: False
        self._in_use = False

    @contextmanager
    def serving(self, cancelled: Callable[[], bool] | None = None) -> Iterator["Slot"]:
        """Counts the slot as active (rounds wait for its work) until the generation ends; its text stays cached."""
        if self._in_use:
            raise RuntimeError(f"slot {self.state.seq} is already serving a request")
        self._in_use = True
        self.cancelled = cancelled or (lambda: False)
        self.batcher._enter()
        try:
            yield self
        finally:
            self.batcher._leave(self)
            self.cancelled = lambda: False
            self._in_use = False

    # -- the Backend interface that decoding.generate uses ------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    @property
    def n_past(self) -> int:
        return self.state.n_past

    @property
    def load(self) -> int:
        """Requests being served now, this one included: they share each round's calls."""
        return max(1, self.batcher.active)

    def is_eog(self, token: int) -> bool:
        return self.backend.is_eog(token)

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        return self.backend.token_bytes(token, special=special)

    def prefill(self, tokens: Sequence[int]) -> DecodeOutput:
        if not tokens:
            raise ValueError("cannot prefill an empty prompt")
        if len(tokens) > self.n_ctx:
            raise ContextLengthError(f"prompt of {len(tokens)} tokens exceeds the context window n_ctx={self.n_ctx}")
        reused = 0 if self.backend.taps else self.batcher._edit(self.backend.reuse_prefix, self.state, tokens)
        if self.backend.taps:
            self.batcher._edit(self.backend.release, self.state)
        self.batcher.stats.prompt_tokens += len(tokens)
        self.batcher.stats.reused_tokens += reused
        return self.batcher._submit(_Job(self, list(tokens), prefill=True, offset=reused))

    def append(self, tokens: Sequence[int]) -> DecodeOutput:
        return self.batcher._submit(_Job(self, list(tokens)))

    def decode_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> DecodeOutput:
        if len(tokens) != len(parents) or not tokens:
            raise ValueError(f"a tree needs as many parents as tokens (got {len(tokens)} and {len(parents)})")
        if len(tokens) > EXACT_BATCH:
            raise ValueError(f"a tree of {len(tokens)} nodes exceeds the limit of {EXACT_BATCH}")
        return self.batcher._submit(_Job(self, list(tokens), list(parents)))

    def commit(self, node: int) -> int:
        return self.batcher._edit(self.backend.commit_seq, self.state, node)
