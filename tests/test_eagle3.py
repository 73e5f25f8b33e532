"""EAGLE-3 drafter: the torch module against llama.cpp's eagle3 graph on the default model, the TTT convention,
weights files, and the errors for files that do not fit the target."""
from __future__ import annotations

from copy import deepcopy
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch

from medusa_gguf.backend import Backend, BackendError
from medusa_gguf.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Error, load_drafter, read_drafter_file, save_drafter
from medusa_gguf.eagle3_gguf import (Eagle3FileError, LlamaEagle3, drafter_for_target, eagle3_config_for,
                                     export_eagle3_gguf, read_gguf_header)
from medusa_gguf.features import extract_features
from medusa_gguf.models import embedding_matrix, output_matrix
from medusa_gguf.settings import Settings

from .conftest import TEST_SETTINGS

DRAFT_VOCAB = 2048
N_ROWS = 32  # context entries compared per weight type
# max |llama.cpp - torch| allowed (prenorm, logits) per weight type; measured 7e-7/1e-5 (f32), 8e-4/6e-3 (f16),
# 2e-2/0.14 (q8_0: llama.cpp also rounds the activations to 8 bits), logits of magnitude ~11
TOLERANCE = {"f32": (1e-4, 1e-3), "f16": (5e-3, 5e-2), "q8_0": (0.1, 0.5), "q4_0": (0.1, 0.5)}
MATRICES = ("wq", "wk", "wv", "wo", "ffn_gate", "ffn_up", "ffn_down", "output")  # stored as the weight type


def rounded_to(drafter: Eagle3Drafter, weight_type: str) -> Eagle3Drafter:
    """The drafter with its matrices rounded as a q4_0 file stores them: 4-bit error is the file's content, so
    llama.cpp's q4_0 graph is held to torch on those weights, to within its 8-bit activations."""
    if weight_type != "q4_0":
        return drafter
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    state = {k: v.clone() for k, v in drafter.state_dict().items()}
    for name in MATRICES:
        w = state[f"{name}.weight"].float().numpy()
        state[f"{name}.weight"] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q4_0), q4_0))
    copy = deepcopy(drafter)
    copy.load_state_dict(state)
    return copy.eval()


@pytest.fixture(scope="module")
def target(model_path):
    out = output_matrix(model_path)
    return torch.from_numpy(embedding_matrix(model_path, out)), torch.from_numpy(out)


def random_drafter(config: Eagle3Config, embeddings: torch.Tensor, output: torch.Tensor | None = None,
                   seed: int = 0) -> Eagle3Drafter:
    """Seeded weights where every part matters: default Linear init, norms away from 1, a random draft vocab."""
    torch.manual_seed(seed)
    d2t = torch.randperm(config.n_vocab)[: config.draft_vocab_size].sort().values
    drafter = Eagle3Drafter(config, embeddings, d2t, output)
    with torch.no_grad():
        for name in ("attn_norm", "hidden_norm", "ffn_norm", "output_norm"):
            getattr(drafter, name).mul_(1 + 0.2 * torch.randn(config.width))
        if config.norm_before_fc:
            drafter.input_norm.mul_(1 + 0.2 * torch.randn(3 * config.target_width))
    return drafter.eval()


@pytest.fixture(scope="module")
def drafters(model_path, target):
    """The same seeded drafter without and with norm_before_fc (the normed one adds input_norm only)."""
    config = eagle3_config_for(model_path, draft_vocab_size=DRAFT_VOCAB)
    return {norm: random_drafter(replace(config, norm_before_fc=norm), *target) for norm in (False, True)}


@pytest.fixture(scope="module")
def drafter(drafters):
    return drafters[False]


@pytest.fixture(scope="module")
def exported(drafters, model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eagle3")
    files = {}

    def get(weight_type: str, norm_before_fc: bool = False):
        key = (weight_type, norm_before_fc)
        if key not in files:
            files[key] = folder / f"drafter-{weight_type}{'-normed' if norm_before_fc else ''}.gguf"
            export_eagle3_gguf(drafters[norm_before_fc], files[key], target_gguf=model_path, weight_type=weight_type)
        return files[key]

    return get


def test_exported_file_carries_the_eagle3_metadata(exported, model_path):
    header = read_gguf_header(exported("f32"))
    meta = header.meta
    assert meta["general.architecture"].value == "eagle3"
    assert meta["eagle3.target_layers"].value == [2, 15, 27]
    assert meta["eagle3.target_hidden_size"].value == 576
    assert meta["eagle3.block_count"].value == 1
    assert meta["eagle3.attention.head_count_kv"].value == 3
    assert meta["eagle3.norm_before_fc"].value is False and "enc.output_norm.weight" not in header.tensors
    normed = read_gguf_header(exported("f32", True))
    assert normed.meta["eagle3.norm_before_fc"].value is True
    assert normed.tensors["enc.output_norm.weight"].shape == (3 * 576,)
    target_meta = read_gguf_header(model_path).meta
    assert meta["tokenizer.ggml.tokens"].value == target_meta["tokenizer.ggml.tokens"].value
    assert meta["tokenizer.ggml.merges"].value == target_meta["tokenizer.ggml.merges"].value


@pytest.mark.parametrize("weight_type, norm_before_fc",
                         [("f32", False), ("f16", False), ("q8_0", False), ("f32", True), ("q8_0", True),
                          ("q4_0", True)])
def test_llama_cpp_computes_what_torch_computes(weight_type, norm_before_fc, exported, drafters, backend):
    drafter = rounded_to(drafters[norm_before_fc], weight_type)
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((N_ROWS, 3 * 576)).astype(np.float32)
    tokens = rng.integers(0, drafter.config.n_vocab, N_ROWS).tolist()
    positions = list(range(N_ROWS))
    tol_h, tol_l = TOLERANCE[weight_type]
    with LlamaEagle3(exported(weight_type, norm_before_fc), backend) as e3, torch.no_grad():
        g = e3.encode(feats)
        g_t = drafter.fuse(torch.from_numpy(feats))
        assert np.abs(g - g_t.numpy()).max() < 1e-4  # fc (and input_norm) are f32 in every file
        if norm_before_fc:  # the norm really runs: without it g is another vector
            assert np.abs(g - drafter.fc(torch.from_numpy(feats)).numpy()).max() > 0.1

        # context entries (token t+1, g_t) at positions t, from the same g on both sides
        logits, pre = e3.decode(tokens, g_t.numpy(), positions)
        pre_t, kv = drafter.layer(torch.tensor([tokens]), g_t[None], torch.arange(N_ROWS))
        logits_t = drafter.logits(pre_t)
        diff_h, diff_l = np.abs(pre - pre_t[0].numpy()).max(), np.abs(logits - logits_t[0].numpy()).max()
        agree = (logits.argmax(-1) == logits_t[0].numpy().argmax(-1)).mean()

        # two draft steps on two branches (seqs 1 and 2 share the context), each fed its parent's prenorm
        t = N_ROWS - 1
        e3.seq_cp(0, 1)
        e3.seq_cp(0, 2)
        top2 = np.argsort(-logits[t])[:2]
        branch = [int(drafter.d2t[i]) for i in top2]
        l1, h1 = e3.decode(branch, np.repeat(pre[t : t + 1], 2, 0), [t + 1] * 2, seq_ids=[1, 2])
        deep = [int(drafter.d2t[np.argmax(l1[b])]) for b in range(2)]
        l2, h2 = e3.decode(deep, h1, [t + 2] * 2, seq_ids=[1, 2])
        steps_h, steps_l = [], []
        for b in range(2):
            p1, kv1 = drafter.layer(torch.tensor([[branch[b]]]), pre_t[:, t:], torch.tensor([t + 1]), context=kv)
            q1 = drafter.logits(p1)
            both = (torch.cat([kv[0], kv1[0]], 2), torch.cat([kv[1], kv1[1]], 2))
            p2, q2 = drafter(torch.tensor([[deep[b]]]), p1, torch.tensor([t + 2]), context=both)
            steps_h += [np.abs(h1[b] - p1[0, 0].numpy()).max(), np.abs(h2[b] - p2[0, 0].numpy()).max()]
            steps_l += [np.abs(l1[b] - q1[0, 0].numpy()).max(), np.abs(l2[b] - q2[0, 0].numpy()).max()]

        # roll the branches back to the shared context and draft again
        e3.seq_rm(1, t + 1)
        e3.seq_rm(2, t + 1)
        assert e3.pos_max(1) == e3.pos_max(2) == e3.pos_max(0) == t
        again, _ = e3.decode(branch[:1], pre_t[0, t:].numpy(), [t + 1], seq_ids=[1])
        first_t = drafter.logits(drafter.layer(torch.tensor([branch[:1]]), pre_t[:, t:], torch.tensor([t + 1]),
                                               context=kv)[0])
        steps_l.append(np.abs(again[0] - first_t[0, 0].numpy()).max())

        full, _ = e3.decode(deep[:1], h1[:1], [t + 2], seq_ids=[3], full_vocab=True)
        assert np.isneginf(np.delete(full[0], drafter.d2t.numpy())).all()
        with pytest.raises(ValueError, match=f"seq 0 holds positions up to {t}, so its entries must start at {t + 1}"):
            e3.decode(deep[:1], h1[:1], [t + 3])
        assert np.array_equal(e3.encode(feats[:4]), g[:4])  # the encoder also runs beside a filled cache

    print(f"\n{weight_type} norm_before_fc={norm_before_fc}: context rows max|diff| prenorm {diff_h:.2e} logits {diff_l:.2e}, argmax agreement "
          f"{agree:.3f} over {N_ROWS} rows; draft steps prenorm {max(steps_h):.2e} logits {max(steps_l):.2e}")
    assert diff_h < tol_h and diff_l < tol_l
    assert max(steps_h) < tol_h and max(steps_l) < tol_l
    assert agree >= 0.9


@pytest.mark.parametrize("norm_before_fc", [False, True])
def test_real_features_with_massive_activations_encode_exactly(norm_before_fc, exported, drafters, backend,
                                                               prompt_tokens):
    """The target's residual stream reaches ~25,000 on the default model: beyond what f16 or q8_0 activations keep,
    which is why fc stays f32 in a q8_0 file; with norm_before_fc, llama.cpp's RMSNorm over those rows too."""
    drafter = drafters[norm_before_fc]
    feats = extract_features(backend, prompt_tokens, drafter.config.target_layers)
    assert np.abs(feats).max() > 1e4
    with LlamaEagle3(exported("q8_0", norm_before_fc), backend) as e3, torch.no_grad():
        g = e3.encode(feats)
        g_t = drafter.fuse(torch.from_numpy(feats)).numpy()
        assert np.abs(g - g_t).max() < 1e-3
    print(f"\nnorm_before_fc={norm_before_fc}: max |g| {np.abs(g_t).max():.1f}, max |g - torch| "
          f"{np.abs(g - g_t).max():.2e}")


def test_ttt_one_step_is_the_plain_forward(drafter):
    torch.manual_seed(2)
    feats, tokens = torch.randn(2, 10, 3 * 576), torch.randint(0, drafter.config.n_vocab, (2, 10))
    with torch.no_grad():
        (ttt,) = drafter.ttt_forward(feats, tokens, 1)
        shifted = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], 1)
        _, plain = drafter(shifted, drafter.fuse(feats), torch.arange(10))
    assert torch.equal(ttt, plain)


def test_ttt_steps_match_chain_drafting(drafter):
    """Step k at anchor t equals drafting depth k after a context ending at t, with the true tokens drafted."""
    torch.manual_seed(3)
    T, steps, t = 12, 3, 6
    feats, tokens = torch.randn(1, T, 3 * 576), torch.randint(0, drafter.config.n_vocab, (1, T))
    with torch.no_grad():
        ttt = drafter.ttt_forward(feats, tokens, steps)
        g = drafter.fuse(feats)
        h, kv = drafter.layer(tokens[:, 1 : t + 2], g[:, : t + 1], torch.arange(t + 1))
        assert torch.allclose(drafter.logits(h)[0, t], ttt[0][0, t], atol=1e-5)
        state = h[:, t:]
        for k in range(1, steps):
            h, kv_k = drafter.layer(tokens[:, t + 1 + k : t + 2 + k], state, torch.tensor([t + k]), context=kv)
            assert torch.allclose(drafter.logits(h)[0, 0], ttt[k][0, t], atol=1e-4), k
            kv = (torch.cat([kv[0], kv_k[0]], 2), torch.cat([kv[1], kv_k[1]], 2))
            state = h


@pytest.mark.parametrize("suffix, norm_before_fc", [(".pth", False), (".safetensors", False), (".pth", True),
                                                    (".safetensors", True)])
def test_weights_file_round_trip(suffix, norm_before_fc, drafters, target, tmp_path):
    drafter = drafters[norm_before_fc]
    path = tmp_path / f"eagle3{suffix}"
    save_drafter(drafter, path)
    config, state = read_drafter_file(path)
    assert config == drafter.config and "embeddings" not in state
    assert ("input_norm" in state) == norm_before_fc
    loaded = load_drafter(path, target[0])
    torch.manual_seed(4)
    feats, tokens = torch.randn(1, 6, 3 * 576), torch.randint(0, drafter.config.n_vocab, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded.ttt_forward(feats, tokens, 2)[1], drafter.ttt_forward(feats, tokens, 2)[1])
    with pytest.raises(Eagle3Error, match="width 576"):
        load_drafter(path, torch.zeros(drafter.config.n_vocab, 64))


def test_a_file_from_before_norm_before_fc_loads_without_it(drafter, target, tmp_path):
    path = tmp_path / "old.pth"
    old_config = {k: v for k, v in drafter.config.to_dict().items() if k != "norm_before_fc"}
    torch.save({"format": "medusa-gguf-eagle3/1", "config": old_config, "state_dict": drafter.trainable_state_dict()},
               path)
    loaded = load_drafter(path, target[0])
    assert loaded.config.norm_before_fc is False and loaded.config == drafter.config


def test_weights_file_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"format": "medusa-gguf-eagle3/1", "config": Eagle3Error("x")}, path)
    with pytest.raises(Eagle3Error, match="refusing"):
        read_drafter_file(path)


def test_a_drafter_outliving_its_target_refuses_to_run(exported):
    target = Backend(Settings(**TEST_SETTINGS))
    e3 = LlamaEagle3(exported("f32"), target)
    target.close()
    with pytest.raises(BackendError, match="target Backend .* was closed; close the drafter first"):
        e3.decode([1], np.zeros((1, 576), np.float32), [0])
    e3.close()
    with pytest.raises(BackendError, match="is closed"):
        e3.pos_max(0)


def test_a_non_eagle3_gguf_is_rejected(model_path, backend):
    with pytest.raises(Eagle3FileError, match="'llama' model, not an EAGLE-3 drafter"):
        LlamaEagle3(model_path, backend)


def test_a_drafter_for_another_width_is_rejected(model_path, tmp_path):
    cfg = Eagle3Config(target_width=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=49152, target_layers=(2, 15, 27),
                       draft_vocab_size=256)
    small = random_drafter(cfg, torch.zeros(49152, 64))
    with pytest.raises(Eagle3FileError, match="width 64, but the target .* has width 576"):
        export_eagle3_gguf(small, tmp_path / "small.gguf", target_gguf=model_path)


def header_only_gguf(path, **keys):
    """An eagle3 header without tensors: the checks run before llama.cpp reads anything."""
    w = gguf.GGUFWriter(path, "eagle3")
    w.add_embedding_length(keys.get("width", 576))
    w.add_uint32("eagle3.target_hidden_size", keys.get("target_width", 576))
    w.add_key_value("eagle3.target_layers", list(keys.get("layers", (2, 15, 27))), gguf.GGUFValueType.ARRAY,
                    gguf.GGUFValueType.INT32)
    if "norm_before_fc" in keys:
        w.add_bool("eagle3.norm_before_fc", keys["norm_before_fc"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()  # no tensors: pads the header to the data alignment
    w.close()
    return path


def test_files_that_do_not_fit_the_target_are_rejected(tmp_path, backend, drafter, model_path):
    with pytest.raises(Eagle3FileError, match="target of width 512 .* has width 576"):
        LlamaEagle3(header_only_gguf(tmp_path / "w.gguf", target_width=512), backend)
    with pytest.raises(Eagle3FileError, match="layer 30 does not exist"):
        LlamaEagle3(header_only_gguf(tmp_path / "l.gguf", layers=(2, 15, 30)), backend)
    with pytest.raises(Eagle3FileError, match=r"norm_before_fc, so it needs enc.output_norm.weight of shape \(1728,\)"):
        LlamaEagle3(header_only_gguf(tmp_path / "n.gguf", norm_before_fc=True), backend)
    bad = Eagle3Drafter(Eagle3Config(**{**drafter.config.to_dict(), "target_layers": (2, 15, 30)}),
                        drafter.embeddings, drafter.d2t)
    with pytest.raises(Eagle3FileError, match="layer 30 does not exist"):
        export_eagle3_gguf(bad, tmp_path / "bad.gguf", target_gguf=model_path)


def test_an_untrained_drafter_scores_like_the_target_lm_head(model_path, target):
    d2t = torch.arange(0, 49152, 7)
    drafter = drafter_for_target(model_path, d2t)
    h = torch.randn(3, 576)
    norm = read_gguf_header(model_path).tensors["output_norm.weight"]
    w = torch.from_numpy(np.fromfile(model_path, dtype=np.float32, count=576, offset=norm.offset))
    expected = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + drafter.config.rms_eps) * w) @ target[1][d2t].T
    with torch.no_grad():
        assert torch.allclose(drafter.logits(h), expected, atol=1e-4)
    assert torch.equal(drafter.embeddings, target[0]) and "embeddings" not in dict(drafter.named_parameters())
