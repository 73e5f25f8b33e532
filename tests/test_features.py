"""EAGLE-3 feature extraction (medusa_gguf/features.py) on the default model.

The independent reading: a second llama.cpp context on the same model with an eval callback (cb_eval) that copies
the graph's `l_out-{l-1}` tensors, the output of decoder layer l-1, which src/models/llama.cpp feeds to layer l.
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest

import llama_cpp as lc

from medusa_gguf import features as F
from medusa_gguf.backend import EXACT_BATCH, KV_GGML_TYPES, Backend
from medusa_gguf.data import read_shard
from medusa_gguf.models import embedding_matrix

_GGML = ctypes.CDLL(str(Path(lc.__file__).parent / "lib" / "libggml-base.so"))
_GGML.ggml_get_name.argtypes, _GGML.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
_GGML.ggml_nelements.argtypes, _GGML.ggml_nelements.restype = [ctypes.c_void_p], ctypes.c_int64
_GGML.ggml_nbytes.argtypes, _GGML.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
_GGML.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_GGML.ggml_backend_tensor_get.restype = None


class CallbackReader:
    """A context like Backend's, whose eval callback keeps a copy of every tensor named in `names`."""

    def __init__(self, backend: Backend, names: set[str]) -> None:
        self.names, self.n_embd = names, backend.n_embd
        self.captured: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self._cb = lc.ggml_backend_sched_eval_callback(self._on_tensor)  # keep a reference: C holds the pointer
        params = lc.llama_context_default_params()
        params.n_ctx = backend.settings.n_ctx
        params.n_batch = params.n_ubatch = backend.n_batch
        params.n_seq_max = backend.n_seq_max
        params.kv_unified = True
        params.embeddings = True
        params.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_threads = params.n_threads_batch = backend.n_threads
        params.type_k = params.type_v = KV_GGML_TYPES[backend.kv_type]  # the same KV cache type: the same sums
        params.cb_eval = self._cb
        params.cb_eval_user_data = None
        self.ctx = lc.llama_init_from_model(backend._model, params)
        assert self.ctx
        self.batch = lc.llama_batch_init(backend.n_batch, 0, 1)

    def _on_tensor(self, t: int, ask: bool, user_data: int) -> bool:
        name = _GGML.ggml_get_name(t).decode()
        if ask:
            return name in self.names
        n = _GGML.ggml_nelements(t)
        assert _GGML.ggml_nbytes(t) == 4 * n, f"{name} is not float32"
        buf = np.empty(n, dtype=np.float32)
        _GGML.ggml_backend_tensor_get(t, buf.ctypes.data, 0, 4 * n)
        self.captured[name].append(buf.reshape(-1, self.n_embd))
        return True

    def decode(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """Decode one sequence in the extractor's chunks (EXACT_BATCH tokens); each name's rows, all positions."""
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        for v in self.captured.values():
            v.clear()
        for start in range(0, len(tokens), EXACT_BATCH):
            part = tokens[start : start + EXACT_BATCH]
            for i, tok in enumerate(part):
                self.batch.token[i], self.batch.pos[i], self.batch.n_seq_id[i] = tok, start + i, 1
                self.batch.seq_id[i][0] = 0
                self.batch.logits[i] = True
            self.batch.n_tokens = len(part)
            assert lc.llama_decode(self.ctx, self.batch) == 0
        return {n: np.concatenate(v) for n, v in self.captured.items()}

    def close(self) -> None:
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)


N_TOKENS = 70  # two decode calls: EXACT_BATCH (63) tokens, then 7


@pytest.fixture(scope="module")
def tokens(backend):
    text = backend.apply_chat_template([
        {"role": "user", "content": "Name three rivers in Europe and say in one line why each one matters."},
        {"role": "assistant", "content": "The Danube links ten countries; the Rhine carries freight from the Alps to "
                                         "the North Sea; the Thames made London a trading city and still "
                                         "carries boats through its centre every day, past the bridges and quays "
                                         "of the old town."},
    ], add_generation_prompt=False)
    toks = backend.tokenize(text)
    assert len(toks) >= N_TOKENS
    return toks[:N_TOKENS]


@pytest.fixture(scope="module")
def feats(backend, tokens):
    """The default layers' features of `tokens`; causal, so a prefix's features are a prefix of these rows."""
    return F.extract_features(backend, tokens)


def test_default_layers_follow_eagle3():
    assert F.default_target_layers(30) == (2, 15, 27)  # SmolLM2-135M
    assert F.default_target_layers(32) == (2, 16, 29)  # the layers llama.cpp's converter writes for Llama-3.1-8B
    with pytest.raises(F.LayerError, match="6 layers"):
        F.default_target_layers(6)


def test_features_match_the_eval_callbacks_layer_inputs(backend, tokens, feats):
    layers = F.default_target_layers(backend.n_layer)
    assert feats.shape == (len(tokens), 3 * backend.n_embd) and feats.dtype == np.float32
    reader = CallbackReader(backend, {f"l_out-{lid - 1}" for lid in layers})
    try:
        ref = reader.decode(tokens)
    finally:
        reader.close()
    for k, lid in enumerate(layers):  # concatenated in the order given, as common/speculative.cpp does
        block = feats[:, k * backend.n_embd : (k + 1) * backend.n_embd]
        assert ref[f"l_out-{lid - 1}"].shape == block.shape
        assert np.array_equal(block, ref[f"l_out-{lid - 1}"]), f"layer {lid}"
    assert not np.array_equal(feats[:, : backend.n_embd], feats[:, backend.n_embd : 2 * backend.n_embd])


def test_first_and_last_layer_inputs(backend, model_path, tokens):
    """Id l is the INPUT of layer l: id 0 is the embedding row itself, and the last id, n_layer - 1, is the output
    of layer n_layer - 2 (the last layer's own output is not tapped by llama.cpp)."""
    last = backend.n_layer - 1
    got = F.extract_features(backend, tokens[:8], layers=[0, last])
    emb = embedding_matrix(model_path)[tokens[:8]]
    np.testing.assert_allclose(got[:, : backend.n_embd], emb, rtol=0, atol=1e-6)
    reader = CallbackReader(backend, {f"l_out-{last - 1}"})
    try:
        assert np.array_equal(got[:, backend.n_embd :], reader.decode(tokens[:8])[f"l_out-{last - 1}"])
    finally:
        reader.close()


def test_taps_leave_the_models_outputs_unchanged(backend, tokens):
    plain = backend.extract_hidden([tokens[:24]])[0]
    with F.FeatureExtractor(backend):
        tapped = backend.extract_hidden([tokens[:24]])[0]
    assert np.array_equal(plain, tapped)


def test_packed_sequences_equal_one_at_a_time(backend, tokens, feats):
    seqs = [tokens[:30], tokens[30:45], [], tokens, tokens[5:12]]  # 30 + 15 share a call; 70 spans two
    assert F.pack_calls([len(s) for s in seqs]) == [[0, 1], [3], [4]]
    with F.FeatureExtractor(backend) as fx:
        packed = fx.extract(seqs)
        alone = fx.extract([seqs[1]]) + fx.extract([seqs[4]])
    assert [p.shape[0] for p in packed] == [len(s) for s in seqs]
    assert np.array_equal(packed[0], feats[:30]) and np.array_equal(packed[3], feats)
    assert np.array_equal(packed[1], alone[0]) and np.array_equal(packed[4], alone[1])


def test_bad_layer_names_layer_and_layer_count(backend):
    with pytest.raises(F.LayerError, match=r"layer 30 does not exist: the model has 30 layers"):
        F.FeatureExtractor(backend, layers=[2, 15, 30])
    with pytest.raises(F.LayerError, match=r"layer -1 does not exist: the model has 30 layers"):
        F.FeatureExtractor(backend, layers=[-1])
    with pytest.raises(F.LayerError, match="repeat"):
        F.FeatureExtractor(backend, layers=[2, 2, 3])


def _shards(folder: Path) -> dict[str, np.ndarray]:
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [read_shard(folder / s) for s in manifest["shards"]]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("features", "tokens", "future")}
    out["lengths"] = np.concatenate([np.diff(p["offsets"]) for p in parts])
    return out


def _no_decode(*args, **kwargs):
    raise AssertionError("decoded again")


def test_shards_round_trip_reuse_and_rebuild(backend, tokens, feats, tmp_path, monkeypatch):
    seqs = [tokens[:40], tokens[:20], tokens[40:60]]  # 40 alone, 20 + 20 in one call
    firsts = [5, 0, 0]
    m = F.extract_feature_shards(backend, seqs, tmp_path, n_future=3, first_rows=firsts, shard_rows=30)
    assert m.complete and m.layers == [2, 15, 27] and m.sequences == 3 and m.shards == [
        "shard-00000.safetensors", "shard-00001.safetensors"]
    got = _shards(tmp_path)
    # kept rows: from first_rows on, and only where token t+2 exists
    assert got["lengths"].tolist() == [40 - 5 - 2, 20 - 2, 20 - 2] and m.rows == sum(got["lengths"])
    assert got["features"].dtype == np.float16 and got["features"].shape == (m.rows, 3 * backend.n_embd)
    assert got["tokens"].dtype == np.int32 and got["future"].shape == (m.rows, 3)
    assert np.array_equal(got["features"][:33], feats[5:38].astype(np.float16))
    assert np.array_equal(got["features"][33:51], feats[:18].astype(np.float16))
    assert got["tokens"][:33].tolist() == seqs[0][5:38] and got["future"][0].tolist() == seqs[0][6:9]
    assert got["future"][32].tolist() == [seqs[0][38], seqs[0][39], -1]

    monkeypatch.setattr(F.FeatureExtractor, "_call", _no_decode)
    assert F.extract_feature_shards(backend, seqs, tmp_path, n_future=3, first_rows=firsts, shard_rows=30) == m
    for changed in (dict(n_future=4), dict(n_future=3, layers=[1, 2, 3]), dict(n_future=3)):  # first_rows dropped
        with pytest.raises(AssertionError, match="decoded again"):
            F.extract_feature_shards(backend, seqs, tmp_path, **changed)
    assert not list(tmp_path.glob("shard-*"))  # the old key's shards went before the rebuild began


def test_iter_feature_rows_reads_every_shard(backend, tokens, tmp_path):
    m = F.extract_feature_shards(backend, [tokens[:12], tokens[:10]], tmp_path, n_future=2, shard_rows=5)
    rows = list(F.iter_feature_rows(m.paths(tmp_path)))
    assert [f.shape for f, _ in rows] == [(10, 3 * backend.n_embd), (8, 3 * backend.n_embd)]
    assert [fut.shape for _, fut in rows] == [(10, 2), (8, 2)]


def test_killed_run_resumes_after_its_last_shard(backend, tokens, feats, tmp_path, monkeypatch):
    seqs = [tokens[:30], tokens[:40], tokens[:25], tokens[:20]]  # calls: 30 | 40 | 25 + 20
    decoded: list[int] = []
    real_call = F.FeatureExtractor._call

    def dies_on_third_call(self, toks, positions, seq_ids):
        decoded.append(len(toks))
        if len(decoded) == 3:
            raise KeyboardInterrupt
        return real_call(self, toks, positions, seq_ids)

    monkeypatch.setattr(F.FeatureExtractor, "_call", dies_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        F.extract_feature_shards(backend, seqs, tmp_path, n_future=3, shard_rows=20)
    part = json.loads((tmp_path / "manifest.json").read_text())
    assert not part["complete"] and part["sequences"] == 2 and len(part["shards"]) == 2
    decoded.clear()
    monkeypatch.setattr(F.FeatureExtractor, "_call", lambda self, *a: decoded.append(len(a[0])) or real_call(self, *a))
    resumed = F.extract_feature_shards(backend, seqs, tmp_path, n_future=3, shard_rows=20)
    assert decoded == [45]  # only the last two sequences were decoded again
    assert resumed.complete and resumed.sequences == 4 and resumed.rows == sum(len(s) - 2 for s in seqs)
    got = _shards(tmp_path)
    want = np.concatenate([feats[: len(s) - 2] for s in seqs]).astype(np.float16)
    assert np.array_equal(got["features"], want)
    assert got["tokens"].tolist() == [t for s in seqs for t in s[:-2]]
