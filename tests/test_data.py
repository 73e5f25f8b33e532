"""Training data readers and shard helpers (no model needed except where named)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from medusa_gguf import data as D


def test_txt_documents_split_on_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("First doc line one.\nline two.\n\n\nSecond doc.\n")
    assert [s.text for s in D.read_file(f)] == ["First doc line one.\nline two.", "Second doc."]


def test_jsonl_text_chat_and_prompt_rows(tmp_path):
    f = tmp_path / "a.jsonl"
    rows = [{"text": "plain"}, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"prompt": "question?"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = D.read_file(f)
    assert samples[0].text == "plain"
    assert samples[1].messages == (("user", "hi"), ("assistant", "yo")) and samples[1].prompt() == "hi"
    assert samples[2].prompt() == "question?"


@pytest.mark.parametrize("content, message", [
    ("{not json", "a.jsonl:1: not JSON"),
    ('{"other": 1}', "a.jsonl:1: expected a 'text' string"),
    ('{"messages": [{"role": "user"}]}', "a.jsonl:1: each message needs 'role' and 'content'"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    f = tmp_path / "a.jsonl"
    f.write_text(content + "\n")
    with pytest.raises(D.DataError, match=message):
        D.read_file(f)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(D.DataError, match="training file not found"):
        D.read_file(tmp_path / "none.txt")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(D.DataError, match="unsupported file type '.csv'"):
        D.read_file(tmp_path / "a.csv")


def test_offline_hub_dataset_fails_fast_and_points_to_local_options(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    t0 = time.perf_counter()
    with pytest.raises(D.DataError) as err:
        D.read_hf_dataset("wikitext", "wikitext-103-raw-v1", "train[:1%]")
    assert time.perf_counter() - t0 < 60
    msg = str(err.value)
    assert "not in the local cache and the Hugging Face Hub is unreachable" in msg and "--train_files" in msg


def test_future_tokens_and_split():
    fut = D.future_tokens([10, 11, 12, 13], 3)
    assert fut.tolist() == [[11, 12, 13], [12, 13, -1], [13, -1, -1], [-1, -1, -1]]
    seqs = [[i] * 5 for i in range(20)]
    train, val = D.split_sequences(seqs, 0.1, seed=0)
    assert len(val) == 2 and len(train) == 18 and not {s[0] for s in val} & {s[0] for s in train}
    assert D.split_sequences(seqs, 0.1, seed=0) == (train, val)


def test_shards_are_reused_and_rebuilt_when_inputs_change(backend, tmp_path):
    seqs = [[1, 5, 9, 13, 17, 21, 25], [2, 4, 6, 8]]
    m1 = D.build_shards(backend, seqs, tmp_path, model_sha256="abc", n_future=3)
    stamp = (tmp_path / m1.shards[0]).stat().st_mtime_ns
    m2 = D.build_shards(backend, seqs, tmp_path, model_sha256="abc", n_future=3)
    assert m2.key == m1.key and (tmp_path / m1.shards[0]).stat().st_mtime_ns == stamp  # reused, not rewritten
    m3 = D.build_shards(backend, seqs, tmp_path, model_sha256="other-model", n_future=3)
    assert m3.key != m1.key
    shard = D.read_shard(tmp_path / m3.shards[0])
    assert shard["hidden"].dtype == np.float16 and shard["hidden"].shape == (5 + 2, backend.n_embd)
    assert shard["offsets"].tolist() == [0, 5, 7] and shard["tokens"].tolist() == [1, 5, 9, 13, 17, 2, 4]


def test_chats_train_on_the_reply_only(backend):
    chat = D.Sample(messages=(("user", "Name a primary colour."), ("assistant", "Red is a primary colour.")))
    prompt = backend.tokenize(backend.apply_chat_template([{"role": "user", "content": "Name a primary colour."}]))
    [seq] = D.tokenize_samples(backend, [chat], max_seq_len=512)
    # row first_row is the last prompt token (its hidden state drafts the reply); everything before is context
    assert seq.first_row == len(prompt) - 1 and seq.tokens[: len(prompt)] == prompt
    assert len(seq.tokens) > len(prompt) + 3
    [whole] = D.tokenize_samples(backend, [chat], max_seq_len=512, train_on_prompt=True)
    assert whole.tokens == seq.tokens and whole.first_row == 0
    [text] = D.tokenize_samples(backend, [D.Sample(text="Red is a primary colour, and so is blue.")], max_seq_len=512)
    assert text.first_row == 0
    opening = D.Sample(messages=(("assistant", "How can I help?"), ("user", "Name a colour."), ("assistant", "Red.")))
    assert D.tokenize_samples(backend, [opening], max_seq_len=512)[0].first_row == 0  # no prompt before it
    # chunks: the offset is carried into the chunk that holds it; chunks made only of prompt are dropped
    chunks = D.tokenize_samples(backend, [chat], max_seq_len=len(prompt) // 2 + 1)
    assert all(c.first_row < len(c.tokens) - 2 for c in chunks)
    assert sum(len(c.tokens) - c.first_row for c in chunks) <= len(seq.tokens) - seq.first_row + len(chunks)


def test_shards_drop_context_rows_and_key_on_them(backend, tmp_path):
    seqs = [[1, 5, 9, 13, 17, 21, 25], [2, 4, 6, 8]]
    whole = D.build_shards(backend, seqs, tmp_path / "a", model_sha256="abc", n_future=3)
    assert D.build_shards(backend, seqs, tmp_path / "b", model_sha256="abc", n_future=3, first_rows=[0, 0]).key == whole.key
    masked = D.build_shards(backend, seqs, tmp_path / "c", model_sha256="abc", n_future=3, first_rows=[3, 1])
    assert masked.key != whole.key and masked.rows == (5 - 3) + (2 - 1)
    shard = D.read_shard(tmp_path / "c" / masked.shards[0])
    assert shard["offsets"].tolist() == [0, 2, 3] and shard["tokens"].tolist() == [13, 17, 4]
    assert shard["future"][0].tolist() == [17, 21, 25]
    full = D.read_shard(tmp_path / "a" / whole.shards[0])  # the kept rows hold the same hidden states as before
    np.testing.assert_array_equal(shard["hidden"], full["hidden"][[3, 4, 6]])
    with pytest.raises(ValueError, match="first_rows has 1 entries for 2 sequences"):
        D.build_shards(backend, seqs, tmp_path / "d", model_sha256="abc", n_future=3, first_rows=[0])
