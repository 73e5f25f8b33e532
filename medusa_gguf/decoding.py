"""One streaming generator for every caller: the CLI, the server, the benchmark and evaluation.

`generate()` yields UTF-8-safe text pieces (a character split across tokens is held back until whole) and fills
a `GenerationResult` with the tokens, the finish reason and the step statistics as it goes. Each step emits one
or more tokens: one for plain decoding, up to the tree depth + 1 for a Medusa step. Stop handling is shared:
EOS, stop strings (never emitted, not even in part, even across steps), max_tokens and the end of the context.
"""
from __future__ import annotations

import codecs
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from .backend import Backend, DecodeOutput
from .sampling import accept_lossless, accept_typical, distribution, probabilities, sample  # noqa: F401 (re-exported)
from .tree import Tree, TreeSchedule, build_tree, n_leaves

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The caller's cancel check turned true while a decode waited for its turn (batching.Slot)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: whole vocabulary
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Medusa verification when temperature > 0: "lossless" (speculative sampling over the tree: the output
    # distribution is the base model's own) or "typical" (Medusa's typical acceptance: faster, not lossless).
    acceptance: str = "lossless"
    typical_epsilon: float = 0.09  # typical acceptance: accept x if p(x) > min(epsilon, alpha * exp(-entropy))
    typical_alpha: float = 0.3

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.acceptance not in ("lossless", "typical"):
            raise ValueError(f"acceptance must be 'lossless' or 'typical', got {self.acceptance!r}")


@dataclass
class GenerationStats:
    mode: str = "plain"  # "plain" or "medusa"
    reason: str | None = None  # why plain decoding was used, when it was
    steps: int = 0
    tokens: int = 0  # tokens produced by the model, including any dropped past a stop point
    accepted_per_depth: list[int] = field(default_factory=list)  # [d]: steps whose draft was accepted to depth d+1
    guard_plain_steps: int = 0  # Medusa mode: steps the acceptance guard decoded plainly (drafts were not paying)
    time_heads_s: float = 0.0
    time_decode_s: float = 0.0
    time_total_s: float = 0.0
    # Medusa mode: whether the engine measured tree decoding bit-identical to plain decoding at start (then greedy
    # output equals plain decoding's); False: it may differ, and the benchmark's match rate says how often.
    exact: bool | None = None
    # One entry per decode step when a caller asks for it (a list, not None): (context tokens before the step,
    # tree nodes, tree leaves, tokens emitted, seconds). The benchmark checks the cost model against it.
    trace: list[tuple[int, int, int, int, float]] | None = None

    @property
    def tau(self) -> float:
        """Mean tokens per step (accepted drafts + the base model's own token)."""
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time_total_s if self.time_total_s > 0 else 0.0

    @property
    def time_python_s(self) -> float:
        return max(0.0, self.time_total_s - self.time_heads_s - self.time_decode_s)

    def acceptance_rate_per_depth(self) -> list[float]:
        return [n / self.steps for n in self.accepted_per_depth] if self.steps else []

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "reason": self.reason,
            "steps": self.steps,
            "tokens": self.tokens,
            "tau": round(self.tau, 4),
            "acceptance_rate_per_depth": [round(r, 4) for r in self.acceptance_rate_per_depth()],
            "guard_plain_steps": self.guard_plain_steps,
            "exact": self.exact,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "time_heads_s": round(self.time_heads_s, 6),
            "time_decode_s": round(self.time_decode_s, 6),
            "time_python_s": round(self.time_python_s, 6),
        }


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)  # the completion's tokens (none past a stop point)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" (max_tokens or end of context)
    stats: GenerationStats = field(default_factory=GenerationStats)


class AcceptanceGuard:
    """Keeps a calibrated tree honest inside one request, by the clock: decode plainly while drafting is slower.

    The calibration predicts from the heads' validation accuracies and the measured cost model; a given prompt can
    be harder and the machine busier. Every `window` tree steps the guard compares their tokens per second (tokens
    emitted over their wall time, drafting included) with plain decoding's, 1 / the time of a plain step at the
    current context: the cost model's prediction, scaled by what this request's own plain steps measured against
    it. Below it, the next `cooldown` steps are plain (no heads, one token), then the tree gets another window; each
    failed window doubles the cooldown (up to `max_cooldown`), a paying one resets it.
    """

    def __init__(self, plain_step_s: Callable[[int], float], *, window: int = 12, cooldown: int = 16,
                 max_cooldown: int = 256) -> None:
        if window < 1 or cooldown < 1:
            raise ValueError(f"bad guard settings: window={window}, cooldown={cooldown}")
        self.predicted_plain_s = plain_step_s  # context length -> seconds of one plain step
        self.window, self.base_cooldown, self.max_cooldown = window, cooldown, max_cooldown
        self.cooldown = cooldown
        self.plain_left = 0
        self.tokens = self.steps = 0  # of the current window
        self.seconds = 0.0
        self.plain_ratios: deque[float] = deque(maxlen=16)  # measured / predicted, of this request's plain steps

    def use_tree(self) -> bool:
        """Whether the next step drafts (else it is a plain step, counted against the cooldown)."""
        if self.plain_left:
            self.plain_left -= 1
            return False
        return True

    def plain_s(self, context: int) -> float:
        """Seconds a plain step takes now at this context: predicted, corrected by the measured plain steps."""
        ratio = float(np.median(self.plain_ratios)) if self.plain_ratios else 1.0
        return self.predicted_plain_s(context) * ratio

    def record_plain(self, seconds: float, context: int) -> None:
        predicted = self.predicted_plain_s(context)
        if predicted > 0:
            self.plain_ratios.append(seconds / predicted)

    def record_tree(self, tokens: int, seconds: float, context: int) -> None:
        """A tree step emitted `tokens` (accepted drafts + the base model's own token) in `seconds`."""
        self.tokens, self.steps, self.seconds = self.tokens + tokens, self.steps + 1, self.seconds + seconds
        if self.steps < self.window:
            return
        tree_rate, plain_rate = self.tokens / self.seconds, 1.0 / self.plain_s(context)
        if tree_rate < plain_rate:
            log.debug("acceptance guard: %.1f tokens/s over %d tree steps (%.2f tokens/step), plain %.1f tokens/s: "
                      "the next %d steps are plain", tree_rate, self.steps, self.tokens / self.steps, plain_rate,
                      self.cooldown)
            self.plain_left = self.cooldown
            self.cooldown = min(2 * self.cooldown, self.max_cooldown)
        else:
            self.cooldown = self.base_cooldown
        self.tokens = self.steps = 0
        self.seconds = 0.0


class Stepper(Protocol):
    """Produces the next tokens; plain decoding and Medusa both implement it.

    `step` returns 1..budget new tokens. All but the last are already in the KV cache; the last one is pending
    and is decoded by the next step (as the next tree's root, for Medusa).
    """

    def step(self, budget: int) -> list[int]: ...


class PlainStepper:
    """One token per step: decode the pending token, sample the next from its logits."""

    def __init__(self, backend: Backend, prefill: DecodeOutput, params: SamplingParams, stats: GenerationStats) -> None:
        self.backend, self.params, self.stats = backend, params, stats
        self.rng = np.random.default_rng(params.seed)
        self.logits = prefill.logits[-1]
        self.pending: int | None = None

    def step(self, budget: int) -> list[int]:
        start = time.perf_counter()
        context, decoded = self.backend.n_past, self.pending is not None  # the first token needs no decode
        if decoded:
            self.logits = self.backend.append([self.pending]).logits[-1]
            self.stats.time_decode_s += time.perf_counter() - start
        self.pending = sample(self.logits, self.params, self.rng)
        if self.stats.trace is not None and decoded:
            self.stats.trace.append((context, 1, 1, 1, time.perf_counter() - start))
        return [self.pending]


class DraftSession(Protocol):
    """One request's drafting state, behind which each drafter lives (Medusa or dependent heads, EAGLE-3).

    `propose` returns a tree rooted at `pending` (tokens[0] == pending, the token the base model chose last) of at
    most `max_depth` levels, for the base model to verify at `context` tokens of context; depth 0 means a plain
    step. `accept` is told the deepest accepted node and the verification call's outputs (the path root..node
    is now committed), so the drafter can read the states it conditions on next. `load`: how many requests share
    the verification call (batching.Slot.load; 1 on a Backend of its own).
    """

    depth: int  # the deepest level it drafts: stats.accepted_per_depth has this many entries

    def propose(self, pending: int, context: int, max_depth: int, load: int = 1) -> tuple[Tree, list[int]]: ...

    def accept(self, tree: Tree, tokens: list[int], node: int, out: DecodeOutput) -> None: ...


class HeadsSession:
    """Medusa-style heads over one hidden state: head k reads h_t of the last committed token t (dependent heads
    also the tokens above it on the path) and guesses token t+1+k, so the tree's root is `pending` and its
    depth-k nodes are head k's candidates. The deepest accepted node's hidden state feeds the next step: no extra
    forward pass. The tree comes from a static tree or a calibrated schedule by context length."""

    def __init__(self, heads, tree: Tree | TreeSchedule, prefill: DecodeOutput) -> None:
        self.heads, self.hidden = heads, prefill.hidden[-1]
        self.schedule = tree if isinstance(tree, TreeSchedule) else TreeSchedule((), (tree,))
        self.depth = self.schedule.depth
        self.cut: dict[tuple[Tree, int], Tree] = {}  # trees cut to a smaller depth near max_tokens or the context end

    def _tree(self, context: int, max_depth: int, load: int = 1) -> Tree:
        full = self.schedule.tree_at(context, load)
        depth = max(0, min(full.depth, max_depth))
        if depth == full.depth:
            return full
        if (full, depth) not in self.cut:
            self.cut[full, depth] = build_tree(c for c in full.choices if len(c) <= depth)
        return self.cut[full, depth]

    def propose(self, pending: int, context: int, max_depth: int, load: int = 1) -> tuple[Tree, list[int]]:
        tree = self._tree(context, max_depth, load)
        if tree.depth == 0:  # a plain step: the heads have nothing to guess
            return tree, [pending]
        return tree, self.heads.draft(self.hidden, pending, tree)

    def accept(self, tree: Tree, tokens: list[int], node: int, out: DecodeOutput) -> None:
        self.hidden = out.hidden[node]


class SpeculativeStepper:
    """One speculative step: the drafter proposes a tree, the base model decodes it in one call, the longest
    accepted path is committed (the four steps of Medusa's loop: candidates, tree decode, posterior, update).

    Index convention: `pending` is the token the base model chose last (sampled from the logits of the last
    committed token t, not yet decoded); it is the tree's root, decoded with the drafts in one call.
    """

    def __init__(self, backend: Backend, prefill: DecodeOutput, params: SamplingParams, stats: GenerationStats,
                 drafter: DraftSession, guard: AcceptanceGuard | None = None) -> None:
        self.backend, self.params, self.stats, self.drafter, self.guard = backend, params, stats, drafter, guard
        self.rng = np.random.default_rng(params.seed)
        self.logits = prefill.logits[-1]
        self.pending: int | None = None
        stats.mode = "medusa"
        stats.accepted_per_depth = [0] * drafter.depth

    def step(self, budget: int) -> list[int]:
        if self.pending is None:  # the first token comes from the prompt's own logits
            self.pending = sample(self.logits, self.params, self.rng)
            return [self.pending]
        t0 = time.perf_counter()
        context = self.backend.n_past
        room = self.backend.n_ctx - context  # positions left, the root's included
        drafting = self.guard is None or self.guard.use_tree()
        tree, tokens = self.drafter.propose(self.pending, context, min(budget - 1, room - 1) if drafting else 0,
                                            getattr(self.backend, "load", 1))
        t1 = time.perf_counter()
        self.stats.time_heads_s += t1 - t0
        if tree.depth == 0:  # a plain step, as cheap as plain decoding's own
            self.stats.guard_plain_steps += not drafting
            out = self.backend.append([self.pending])
            self.stats.time_decode_s += time.perf_counter() - t1
            _, self.pending = self._verify(tree, tokens, out.logits)
            self.drafter.accept(tree, tokens, 0, out)
            self._record(context, tree, 1, time.perf_counter() - t0, drafted=False)
            return [self.pending]
        out = self.backend.decode_tree(tokens, tree.parents)
        t2 = time.perf_counter()
        node, bonus = self._verify(tree, tokens, out.logits)
        t3 = time.perf_counter()
        self.backend.commit(node)
        self.drafter.accept(tree, tokens, node, out)
        self.stats.time_decode_s += t2 - t1 + time.perf_counter() - t3
        for d in range(tree.depths[node]):
            self.stats.accepted_per_depth[d] += 1
        path = []
        i = node
        while i > 0:
            path.append(tokens[i])
            i = tree.parents[i]
        self.pending = bonus
        self._record(context, tree, len(path) + 1, time.perf_counter() - t0, drafted=True)
        return path[::-1] + [bonus]

    def _record(self, context: int, tree: Tree, tokens: int, seconds: float, *, drafted: bool) -> None:
        if self.stats.trace is not None:
            self.stats.trace.append((context, tree.n_nodes, n_leaves(tree), tokens, seconds))
        if self.guard is not None:
            if drafted:
                self.guard.record_tree(tokens, seconds, context)
            else:
                self.guard.record_plain(seconds, context)

    def _verify(self, tree: Tree, tokens: list[int], logits: np.ndarray) -> tuple[int, int]:
        """Walk down from the root; return (deepest accepted node, the next token sampled at it)."""
        children = _children(tree)
        node = 0
        while True:
            kids = children[node]
            if self.params.temperature == 0:
                best = int(np.argmax(logits[node]))
                nxt = next((c for c in kids if tokens[c] == best), None)
                if nxt is None:
                    return node, best
                node = nxt
                continue
            dist = distribution(logits[node], self.params)
            drafts = [tokens[c] for c in kids]  # in rank order
            if self.params.acceptance == "typical":
                k = accept_typical(dist, drafts, self.params)
                bonus = dist.draw(self.rng) if k is None else None
            else:  # speculative sampling: every token comes out with exactly the base model's probability
                k, bonus = accept_lossless(dist, drafts, self.rng)
            if k is None:
                return node, bonus
            node = kids[k]


class MedusaStepper(SpeculativeStepper):
    """A speculative stepper over heads and a static tree or calibrated schedule (HeadsSession)."""

    def __init__(self, backend: Backend, prefill: DecodeOutput, params: SamplingParams, stats: GenerationStats,
                 heads, tree: Tree | TreeSchedule, guard: AcceptanceGuard | None = None) -> None:
        super().__init__(backend, prefill, params, stats, HeadsSession(heads, tree, prefill), guard)


@functools.lru_cache(maxsize=64)
def _children(tree: Tree) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in range(tree.n_nodes)]
    for i, p in enumerate(tree.parents):
        if p >= 0:
            kids[p].append(i)
    return kids


class _StopScanner:
    """Holds back text that could still become a stop string; finds the earliest complete one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found). After a stop, the rest is dropped."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate(
    backend: Backend,
    prompt_tokens: Sequence[int],
    params: SamplingParams,
    result: GenerationResult | None = None,
    *,
    heads=None,
    tree: Tree | TreeSchedule | None = None,
    guard: AcceptanceGuard | None = None,
    drafter=None,
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Yield the text pieces of the completion of `prompt_tokens`; fill `result` (if given) as it goes.

    With `heads` and a `tree` of depth >= 1 each step is a Medusa step; a `drafter` (whose
    `session(prompt_tokens, prefill)` returns a DraftSession, e.g. eagle3_draft.Eagle3Drafting) drafts its own
    trees; otherwise decoding is plain. A `guard`
    (fresh per request) turns drafting off for a while when the tree's acceptance falls below its cost.
    Closing the generator early (a client went away) stops decoding at once; so does `cancelled()` turning true,
    checked before every step, so text held back by the stop-string scanner does not keep a lost request running
    (the result's finish_reason stays None).
    """
    result = result if result is not None else GenerationResult()
    stats = result.stats
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    scanner = _StopScanner(params.stop)
    try:
        prefill = backend.prefill(prompt_tokens)
    except Cancelled:
        return
    stepper: Stepper
    if drafter is not None:
        stepper = SpeculativeStepper(backend, prefill, params, stats, drafter.session(prompt_tokens, prefill), guard)
    elif heads is not None and tree is not None and tree.depth > 0:
        stepper = MedusaStepper(backend, prefill, params, stats, heads, tree, guard)
    else:
        stepper = PlainStepper(backend, prefill, params, stats)
    t0 = time.perf_counter()
    try:
        while result.finish_reason is None:
            if cancelled is not None and cancelled():
                return
            if backend.n_past >= backend.n_ctx:  # no room left for the pending token
                result.finish_reason = "length"
                break
            try:
                new_tokens = stepper.step(params.max_tokens - len(result.tokens))
            except Cancelled:
                return
            stats.steps += 1
            stats.tokens += len(new_tokens)
            for token in new_tokens:
                if backend.is_eog(token):
                    result.finish_reason = "stop"
                    break
                result.tokens.append(token)
                text, stopped = scanner.feed(decoder.decode(backend.token_bytes(token)))
                if text:
                    result.text += text
                    yield text
                if stopped:  # the stop string and everything after it are dropped
                    result.finish_reason = "stop"
                    return
                if len(result.tokens) >= params.max_tokens:
                    result.finish_reason = "length"
                    break
        tail = scanner.flush() + decoder.decode(b"", final=True)
        if tail:
            result.text += tail
            yield tail
    finally:
        stats.time_total_s = time.perf_counter() - t0
