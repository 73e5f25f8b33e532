"""The corpus prompts builder (scripts/corpus_prompts.py) and the resumable self-distillation store
(medusa_gguf/corpus.py), on the embedded default model with short answers."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medusa_gguf import corpus as C
from medusa_gguf.backend import EXACT_BATCH, Backend
from medusa_gguf.settings import Settings

from .conftest import ROOT

BUILDER = ROOT / "scripts" / "corpus_prompts.py"
COMMITTED = ROOT / "medusa_gguf" / "prompts" / "corpus_prompts.jsonl"
UNSEEN = ROOT / "medusa_gguf" / "prompts" / "unseen.jsonl"
GEN = C.Generation(max_new_tokens=4)
SMALL = {"python-docs": 40, "man": 12, "wordnet": 40, "fortunes": 20}
# One thread: llama.cpp's threads spin at every barrier, so on a busy 2-core machine two threads run 5-10x slower.
SETTINGS = Settings(n_ctx=1024, n_threads=1)


def _builder():
    spec = importlib.util.spec_from_file_location("corpus_prompts", BUILDER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder():
    return _builder()


@pytest.fixture(scope="module")
def small_build(builder):
    try:
        return builder.build(seed=0, counts=SMALL)
    except builder.MissingSource as exc:
        pytest.skip(str(exc))


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# -- prompts -----------------------------------------------------------------------------------------------------


def test_build_is_deterministic_and_seeded(builder, small_build):
    assert builder.build(seed=0, counts=SMALL) == small_build
    assert builder.build(seed=1, counts=SMALL) != small_build
    assert Counter(r["source"].split(":")[0] for r in small_build) == Counter(SMALL)


def test_committed_prompts_are_deduplicated_tagged_and_small():
    rows = [json.loads(line) for line in COMMITTED.read_text(encoding="utf-8").splitlines()]
    assert 3000 <= len(rows) and COMMITTED.stat().st_size < 2_000_000
    assert len({_norm(r["prompt"]) for r in rows}) == len(rows)
    assert all(r["id"] == hashlib.sha256(r["prompt"].encode()).hexdigest()[:16] for r in rows)
    sources = Counter(r["source"].split(":")[0] for r in rows)
    assert set(sources) == {"python-docs", "man", "wordnet", "fortunes"} and min(sources.values()) >= 500
    assert len({r["kind"] for r in rows}) >= 20


def test_prompts_share_no_five_words_with_the_unseen_set(builder):
    """unseen.jsonl is the held-out set: hand-written, a different source; no training prompt may quote it."""
    banned = set().union(*(builder.five_grams(json.loads(line)["prompt"]) for line in UNSEEN.read_text().splitlines()))
    assert banned
    rows = [json.loads(line) for line in COMMITTED.read_text(encoding="utf-8").splitlines()]
    assert not any(builder.five_grams(r["prompt"]) & banned for r in rows)
    # the filter is live: a prompt quoting an unseen one is dropped
    quote = json.loads(UNSEEN.read_text().splitlines()[0])["prompt"]
    assert builder.five_grams("Summarize: " + quote) & banned


def test_missing_package_is_named(builder, monkeypatch, tmp_path):
    monkeypatch.setattr(builder, "WORDNET", tmp_path / "nowhere")
    with pytest.raises(builder.MissingSource, match="wordnet-base.*apt-get install"):
        builder.wordnet_entries()


# -- the store ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts():
    return [p for p in C.read_prompts(COMMITTED) if len(p.text) < 120][:5]


@pytest.fixture(scope="module")
def plain():
    """A plain backend (seq 0 only): the reference for greedy answers."""
    with Backend(SETTINGS) as b:
        yield b


def _grow(root: Path, prompts, **kw):
    kw = {"target_tokens": 10**6, "chunk_size": 2, "streams": 2, "gen": GEN, "progress": False, **kw}
    return C.grow(SETTINGS, prompts, root=root, **kw)


def _count_calls(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Count greedy_batch's prompts; raise KeyboardInterrupt (a kill) at call number `fail_at`."""
    calls: list[int] = []
    real = Backend.greedy_batch

    def counted(self, batch, max_new_tokens):
        calls.append(len(batch))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(self, batch, max_new_tokens)

    monkeypatch.setattr(Backend, "greedy_batch", counted)
    return calls


def test_grow_stops_at_target_then_resumes_without_redoing(tmp_path, prompts, monkeypatch):
    first = _grow(tmp_path, prompts, target_tokens=1)  # one chunk reaches it
    assert first.samples == 2 and first.answer_tokens == first.total_answer_tokens > 0
    m = C.read_manifest(first.folder)
    assert first.folder.name == m.model_sha256[:12] and len(m.chunks) == 1 and m.end_of_turn
    calls = _count_calls(monkeypatch)
    second = _grow(tmp_path, prompts)
    assert second.samples == len(prompts) - 2 and sum(calls) == len(prompts) - 2  # the first two were not redone
    assert _grow(tmp_path, prompts).samples == 0 and sum(calls) == len(prompts) - 2
    records = list(C.Store(first.folder, C.read_manifest(first.folder)).records())
    assert [r.id for r in records] == [p.id for p in prompts]
    assert all(r.prompt.dtype == np.int32 and 0 < len(r.answer) <= GEN.max_new_tokens for r in records)


def test_load_gives_token_sequences_for_the_shard_builder(tmp_path, prompts, plain):
    report = _grow(tmp_path, prompts[:2])
    m = C.read_manifest(report.folder)
    seqs = C.load(report.folder, model_sha256=m.model_sha256)
    records = list(C.Store(report.folder, m).records())
    for seq, rec in zip(seqs, records):
        assert seq.first_row == len(rec.prompt) - 1  # the last prompt token's hidden state drafts the answer
        assert seq.tokens[: len(rec.prompt)] == plain.tokenize(
            plain.apply_chat_template([{"role": "user", "content": next(p.text for p in prompts if p.id == rec.id)}]))
        tail = m.end_of_turn if rec.finished else []
        assert seq.tokens[len(rec.prompt) :] == rec.answer.tolist() + tail
    assert C.load(report.folder, sources=["no-such-source"]) == []
    split = C.load(report.folder, max_seq_len=6)
    assert all(len(s.tokens) <= 6 for s in split) and sum(s.first_row == 0 for s in split) > 0


def test_kill_inside_a_chunk_leaves_a_loadable_store(tmp_path, prompts, monkeypatch):
    calls = _count_calls(monkeypatch, fail_at=2)  # dies generating the second chunk
    with pytest.raises(KeyboardInterrupt):
        _grow(tmp_path, prompts)
    folder = next(tmp_path.iterdir())
    assert len(C.load(folder)) == 2 and len(C.read_manifest(folder).done) == 2
    monkeypatch.undo()
    calls = _count_calls(monkeypatch)
    assert _grow(tmp_path, prompts).samples == len(prompts) - 2 == sum(calls)


def test_kill_while_writing_leaves_no_partial_chunk_and_adopts_an_unlisted_one(tmp_path, prompts, monkeypatch):
    real = C.os.replace

    def dies_on(suffix: str, after: str = ""):
        """os.replace that raises KeyboardInterrupt for `suffix`, once a file ending in `after` was renamed."""
        renamed: list[str] = []

        def replace(src, dst):
            if str(src).endswith(suffix) and (not after or any(r.endswith(after) for r in renamed)):
                raise KeyboardInterrupt
            renamed.append(str(src))
            return real(src, dst)

        return replace

    monkeypatch.setattr(C.os, "replace", dies_on(".npz.tmp"))  # killed before the chunk is renamed
    with pytest.raises(KeyboardInterrupt):
        _grow(tmp_path, prompts[:2])
    folder = next(tmp_path.iterdir())
    assert list(folder.glob(".chunk-*.tmp")) and C.load(folder) == []
    monkeypatch.setattr(C.os, "replace", dies_on("manifest.json.tmp", after=".npz.tmp"))  # killed after the chunk, before its manifest
    with pytest.raises(KeyboardInterrupt):
        _grow(tmp_path, prompts[:2])
    monkeypatch.setattr(C.os, "replace", real)
    assert C.read_manifest(folder).done == [] and len(list(folder.glob("chunk-*.npz"))) == 1
    calls = _count_calls(monkeypatch)
    report = _grow(tmp_path, prompts[:2])
    assert report.samples == 0 and calls == [] and not list(folder.glob(".*.tmp"))  # adopted, not redone
    assert len(C.load(folder)) == 2


def test_a_store_of_another_model_or_setting_is_refused(tmp_path, prompts):
    report = _grow(tmp_path, prompts[:1])
    path = report.folder / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "model_sha256": "ab" * 32, "model_file": "other.gguf"}))
    with pytest.raises(C.CorpusError, match=r"other\.gguf \(sha256 abababababab….*its own folder is"):
        _grow(tmp_path, prompts)
    with pytest.raises(C.CorpusError, match="not of the model given"):
        C.load(report.folder, model_sha256=good["model_sha256"])
    path.write_text(json.dumps(good))
    with pytest.raises(C.CorpusError, match="max_new_tokens"):
        _grow(tmp_path, prompts, gen=C.Generation(max_new_tokens=9))
    path.write_text(json.dumps({**good, "kv_type": "f16" if good["kv_type"] != "f16" else "bf16"}))
    with pytest.raises(C.CorpusError, match="kv_type"):
        _grow(tmp_path, prompts)


def test_batched_answers_equal_plain_decoding(prompts, plain):
    """Several prompts per decode call give the greedy answers of plain decoding, one prompt at a time (prefill,
    then one token per call), a prompt of 64+ tokens too (prefilled over several calls)."""
    gen = C.Generation(max_new_tokens=8)
    prompts = prompts + [next(p for p in C.read_prompts(COMMITTED) if 500 < len(p.text) < 700)]
    with C.generation_backend(SETTINGS, len(prompts), gen) as b:
        together, _ = C.answer(b, prompts, len(prompts), gen)
        assert b.kv_type == plain.kv_type
    assert max(len(r.prompt) for r in together) > 2 * EXACT_BATCH
    for rec in together:
        out, answer = plain.prefill(rec.prompt.tolist()), []
        while len(answer) < gen.max_new_tokens and not plain.is_eog(token := int(np.argmax(out.logits[-1]))):
            answer.append(token)
            out = plain.append([token])
        assert rec.answer.tolist() == answer, rec.id
    assert len({tuple(r.answer.tolist()) for r in together}) == len(prompts)  # distinct answers: no stream mix-up
