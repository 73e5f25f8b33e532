"""`medusa-gguf export --format vllm`: the files read back with vLLM's own loading rules give the heads' drafts.

The rules below are written from vLLM's Medusa loader (vllm/transformers_utils/configs/medusa.py and
vllm/model_executor/models/medusa.py), not from the exporter: config keys with "num" and "heads" / "layers" in them
become num_heads / num_hidden_layers; parameters `blocks.{h}.layers.{l}.weight` (and `.bias` when medusa_fc_bias),
`lm_heads.{h}.weight`, or one `lm_head.weight` loaded from `lm_heads.0.weight` when original_lm_head; `token_map`
only when truncated_vocab_size < vocab_size, and then it is required; every block computes x + SiLU(W x + b), and
logits over the draft vocabulary are scattered into the full one at token_map (elsewhere -inf).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from medusa_gguf.export import export_vllm
from medusa_gguf.heads import HeadsConfig, HeadsError, build_heads, save_heads
from medusa_gguf.models import output_matrix


def vllm_read(folder):
    """The config and parameters as vLLM's Medusa loader would build them; raises where vLLM would fail."""
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "medusa" and raw["architectures"] == ["MedusaModel"]
    cfg = dict(raw)
    for k in list(cfg):
        if "num" in k and "heads" in k:
            cfg["num_heads"] = cfg.pop(k)
        elif "num" in k and "layers" in k:
            cfg["num_hidden_layers"] = cfg.pop(k)
    cfg.setdefault("truncated_vocab_size", cfg["vocab_size"])
    hidden, heads, layers = cfg["hidden_size"], cfg["num_heads"], cfg["num_hidden_layers"]
    bias = cfg.get("medusa_fc_bias", False)
    expected = {}
    for h in range(heads):
        for layer in range(layers):
            expected[f"blocks.{h}.layers.{layer}.weight"] = (hidden, hidden)
            if bias:
                expected[f"blocks.{h}.layers.{layer}.bias"] = (hidden,)
    shared = cfg.get("original_lm_head", False)
    for h in range(1 if shared else heads):
        expected["lm_head.weight" if shared else f"lm_heads.{h}.weight"] = (cfg["truncated_vocab_size"], hidden)
    params, token_map = {}, None
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            name = name.replace("medusa_heads.", "")
            if name == "token_map":
                if cfg["truncated_vocab_size"] < cfg["vocab_size"]:
                    token_map = tensor
            elif name in expected:
                params[name] = tensor
            elif shared and name == "lm_heads.0.weight":
                params["lm_head.weight"] = tensor
    assert cfg["truncated_vocab_size"] == cfg["vocab_size"] or token_map is not None
    assert set(params) == set(expected), set(expected) ^ set(params)
    for name, shape in expected.items():
        assert tuple(params[name].shape) == shape, (name, tuple(params[name].shape), shape)
    return cfg, params, token_map


def vllm_logits(cfg, params, token_map, hidden: torch.Tensor) -> torch.Tensor:
    """[num_heads, vocab_size] logits for one hidden state, computed the way vLLM's Medusa.forward does."""
    out = []
    for h in range(cfg["num_heads"]):
        x = hidden.float()
        for layer in range(cfg["num_hidden_layers"]):
            w = params[f"blocks.{h}.layers.{layer}.weight"].float()
            b = params.get(f"blocks.{h}.layers.{layer}.bias")
            x = x + torch.nn.functional.silu(x @ w.T + (0 if b is None else b.float()))
        lm = params["lm_head.weight" if cfg.get("original_lm_head") else f"lm_heads.{h}.weight"].float()
        logits = x @ lm.T
        if token_map is not None:
            full = torch.full((cfg["vocab_size"],), -torch.inf)
            full[token_map] = logits
            logits = full
        out.append(logits)
    return torch.stack(out)


@pytest.fixture(scope="module")
def projection(model_path):
    return torch.from_numpy(output_matrix(model_path))


def make_heads(tmp_path, projection, *, own_lm_head: bool, block: str = "paper", head_type: str = "medusa"):
    n_vocab, n_embd = projection.shape
    draft_ids = torch.sort(torch.randperm(n_vocab, generator=torch.Generator().manual_seed(0))[:1024]).values
    config = HeadsConfig(k_heads=3, n_embd=n_embd, n_vocab=n_vocab, hidden_dim=n_embd // 2, num_layers=2,
                         head_type=head_type, own_lm_head=own_lm_head, draft_vocab_size=1024, block=block,
                         base_model_name="test", base_model_sha256="0" * 64)
    emb = projection if head_type == "dependent" else None
    heads = build_heads(config, projection, emb, draft_ids, draft_int8=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking weights: the blocks start as the identity otherwise
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path / f"heads-{block}-{own_lm_head}.pth"
    save_heads(heads, path)
    return heads, path


@pytest.mark.parametrize("own_lm_head", [False, True])
def test_vllm_reads_back_the_heads_drafts(tmp_path, projection, model_path, own_lm_head):
    heads, path = make_heads(tmp_path, projection, own_lm_head=own_lm_head)
    out = export_vllm(path, tmp_path / "vllm", model=model_path, dtype="float32")
    cfg, params, token_map = vllm_read(out)
    assert cfg["vocab_size"] == projection.shape[0] and cfg["truncated_vocab_size"] == 1024
    assert cfg["num_heads"] == 3 and cfg["num_hidden_layers"] == 2 and cfg["original_lm_head"] == (not own_lm_head)
    assert torch.equal(token_map, heads.draft_ids)
    hidden = torch.randn(projection.shape[1], generator=torch.Generator().manual_seed(2)) * 3
    ours = heads(hidden.unsqueeze(0))[0]  # [K, V_draft] over the draft vocabulary
    theirs = vllm_logits(cfg, params, token_map, hidden)
    assert torch.allclose(theirs[:, heads.draft_ids], ours, atol=1e-4, rtol=1e-5)
    assert torch.equal(theirs.argmax(-1), heads.draft_ids[ours.argmax(-1)])  # the same proposals, in full-vocab ids
    assert torch.isinf(theirs).sum() == 3 * (projection.shape[0] - 1024)  # tokens outside the draft vocabulary


def test_half_precision_export_keeps_the_top_proposal(tmp_path, projection, model_path):
    heads, path = make_heads(tmp_path, projection, own_lm_head=False)
    out = export_vllm(path, tmp_path / "vllm16", model=model_path)
    cfg, params, token_map = vllm_read(out)
    assert cfg["torch_dtype"] == "float16" and params["lm_head.weight"].dtype == torch.float16
    assert token_map.dtype == torch.int64
    agree = 0
    for seed in range(20):
        hidden = torch.randn(projection.shape[1], generator=torch.Generator().manual_seed(seed)) * 3
        ours = heads.draft_ids[heads(hidden.unsqueeze(0))[0].argmax(-1)]
        agree += int(torch.equal(vllm_logits(cfg, params, token_map, hidden).argmax(-1), ours))
    assert agree >= 18, agree


@pytest.mark.parametrize("block, head_type, message", [
    ("bottleneck", "medusa", "vLLM's Medusa block is x \\+ SiLU"),
    ("paper", "dependent", "read the drafted tokens' embeddings"),
])
def test_heads_vllm_cannot_express_are_refused_with_the_reason(tmp_path, projection, model_path, block, head_type,
                                                              message):
    _, path = make_heads(tmp_path, projection, own_lm_head=True, block=block, head_type=head_type)
    with pytest.raises(HeadsError, match=message):
        export_vllm(path, tmp_path / "out", model=model_path)
    assert not (tmp_path / "out").exists()


def test_paper_block_heads_draft_like_their_module(projection, tmp_path):
    """The drafting fast path (fp32) computes the paper block as the module does."""
    heads, _ = make_heads(tmp_path, projection, own_lm_head=True)
    hidden = np.random.default_rng(3).standard_normal(projection.shape[1]).astype(np.float32)
    top = heads.topk(hidden, 4)
    ref = heads.draft_ids[torch.topk(heads(torch.from_numpy(hidden).unsqueeze(0))[0], 4, dim=-1).indices].numpy()
    assert np.array_equal(top, ref)


def test_the_command_line_export(tmp_path, projection, model_path):
    _, path = make_heads(tmp_path, projection, own_lm_head=True)
    ran = subprocess.run([sys.executable, "-m", "medusa_gguf", "export", "--format", "vllm", str(path),
                          str(tmp_path / "cli")], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "--speculative-config" in ran.stdout and (tmp_path / "cli" / "model.safetensors").is_file()
    vllm_read(tmp_path / "cli")


# -- EAGLE-3 in the Hugging Face layout -------------------------------------------------------------------------
# The reading rules are llama.cpp's converter's (vendor/llama.cpp conversion/llama.py, LlamaModel): midlayer.* is
# model.layers.0.*, q_proj / k_proj rows go through LlamaModel.permute (HF rotate-half -> GGML adjacent pairs),
# hidden_norm is attn_norm_2, input_norm is enc.output_norm, and d2t holds offsets, made absolute by adding
# arange. The forward below is Hugging Face's llama attention (rotate-half RoPE over cat(freqs, freqs)).


def _hf_permute(w, n_head, n_head_kv=None):  # LlamaModel.permute, as the converter has it
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture
def eagle3_file(tmp_path):
    from medusa_gguf.eagle3 import Eagle3Config, Eagle3Drafter, save_drafter

    torch.manual_seed(3)
    c = Eagle3Config(target_width=32, n_head=4, n_head_kv=2, n_ff=48, n_vocab=60, target_layers=(2, 5, 8),
                     draft_vocab_size=20, norm_before_fc=True, rope_theta=10000.0, base_model_sha256="ab" * 32)
    emb = torch.randn(60, 32)
    drafter = Eagle3Drafter(c, emb, torch.randperm(60)[:20].sort().values)
    with torch.no_grad():
        for name in ("input_norm", "attn_norm", "hidden_norm", "ffn_norm", "output_norm"):
            getattr(drafter, name).mul_(1 + 0.3 * torch.randn_like(getattr(drafter, name)))
    save_drafter(drafter, tmp_path / "d.pth")
    return tmp_path / "d.pth", drafter.eval(), emb


def _read(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return json.loads((folder / "config.json").read_text()), {k: f.get_tensor(k) for k in f.keys()}


def test_eagle3_hf_export_gives_back_the_drafter_under_llama_cpps_converter_rules(tmp_path, eagle3_file):
    from medusa_gguf.export import export_eagle3_hf

    path, drafter, _ = eagle3_file
    cfg, t = _read(export_eagle3_hf(path, tmp_path / "hf", dtype="float32"))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert "draft_vocab_size" in cfg  # what the converter detects an EAGLE-3 checkpoint by
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 5, 8] and cfg["norm_before_fc"] is True
    assert cfg["vocab_size"] == 60 and cfg["draft_vocab_size"] == 20 and cfg["target_hidden_size"] == 32
    s = drafter.state_dict()
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    assert torch.equal(_hf_permute(t["midlayer.self_attn.q_proj.weight"], n_head, n_head), s["wq.weight"])
    assert torch.equal(_hf_permute(t["midlayer.self_attn.k_proj.weight"], n_head, n_kv), s["wk.weight"])
    assert not torch.equal(t["midlayer.self_attn.q_proj.weight"], s["wq.weight"])  # the order did change
    same = {"fc.weight": "fc.weight", "input_norm.weight": "input_norm", "midlayer.hidden_norm.weight": "hidden_norm",
            "midlayer.input_layernorm.weight": "attn_norm", "midlayer.self_attn.v_proj.weight": "wv.weight",
            "midlayer.self_attn.o_proj.weight": "wo.weight", "midlayer.post_attention_layernorm.weight": "ffn_norm",
            "midlayer.mlp.gate_proj.weight": "ffn_gate.weight", "midlayer.mlp.up_proj.weight": "ffn_up.weight",
            "midlayer.mlp.down_proj.weight": "ffn_down.weight", "norm.weight": "output_norm",
            "lm_head.weight": "output.weight"}
    for hf, ours in same.items():
        assert torch.equal(t[hf], s[ours]), hf
    absolute = t["d2t"] + torch.arange(t["d2t"].numel())
    assert torch.equal(absolute, s["d2t"])
    assert t["t2d"].dtype == torch.bool and t["t2d"].sum() == 20 and bool(t["t2d"][s["d2t"]].all())
    assert set(t) == set(same) | {"midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "d2t", "t2d"}


def _hf_eagle3_logits(cfg, t, emb, features, tokens):
    """One EAGLE-3 pass the Hugging Face way: rotate-half RoPE, repeat_kv, causal attention."""
    eps, H, Hkv, d = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotate_half(x):
        return torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)

    T = tokens.shape[1]
    g = rms(features, t["input_norm.weight"]) @ t["fc.weight"].T if cfg["norm_before_fc"] else features @ t["fc.weight"].T
    a = torch.cat((rms(emb[tokens], t["midlayer.input_layernorm.weight"]), rms(g, t["midlayer.hidden_norm.weight"])), -1)
    q = (a @ t["midlayer.self_attn.q_proj.weight"].T).view(1, T, H, d).transpose(1, 2)
    k = (a @ t["midlayer.self_attn.k_proj.weight"].T).view(1, T, Hkv, d).transpose(1, 2)
    v = (a @ t["midlayer.self_attn.v_proj.weight"].T).view(1, T, Hkv, d).transpose(1, 2)
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat((freqs, freqs), -1).cos().float(), torch.cat((freqs, freqs), -1).sin().float()
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = g + att.transpose(1, 2).reshape(1, T, H * d) @ t["midlayer.self_attn.o_proj.weight"].T
    n = rms(h, t["midlayer.post_attention_layernorm.weight"])
    mlp = (torch.nn.functional.silu(n @ t["midlayer.mlp.gate_proj.weight"].T) * (n @ t["midlayer.mlp.up_proj.weight"].T))
    h = h + mlp @ t["midlayer.mlp.down_proj.weight"].T
    return rms(h, t["norm.weight"]) @ t["lm_head.weight"].T


def test_eagle3_hf_export_computes_the_drafters_logits_the_hugging_face_way(tmp_path, eagle3_file):
    from medusa_gguf.export import export_eagle3_hf

    path, drafter, emb = eagle3_file
    cfg, t = _read(export_eagle3_hf(path, tmp_path / "hf", dtype="float32"))
    torch.manual_seed(0)
    features, tokens = torch.randn(1, 11, 96) * 5, torch.randint(0, 60, (1, 11))
    with torch.no_grad():
        _, ours = drafter(tokens, drafter.fuse(features), torch.arange(11))
        theirs = _hf_eagle3_logits(cfg, t, emb, features, tokens)
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())
    # without the row reordering, Hugging Face's RoPE would compute something else
    wrong = dict(t, **{"midlayer.self_attn.q_proj.weight": drafter.wq.weight.detach(),
                       "midlayer.self_attn.k_proj.weight": drafter.wk.weight.detach()})
    assert not torch.allclose(ours, _hf_eagle3_logits(cfg, wrong, emb, features, tokens), atol=1e-2)


def test_the_command_line_eagle3_hf_export(tmp_path, eagle3_file):
    path, _, _ = eagle3_file
    proc = subprocess.run([sys.executable, "-m", "medusa_gguf", "export", "--format", "eagle3-hf", str(path),
                           str(tmp_path / "out"), "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"method": "eagle3"' in proc.stdout
    cfg, t = _read(tmp_path / "out")
    assert cfg["torch_dtype"] == "bfloat16" and t["fc.weight"].dtype == torch.bfloat16 and t["d2t"].dtype == torch.int64
    bad = subprocess.run([sys.executable, "-m", "medusa_gguf", "export", "--format", "eagle3-hf",
                          str(tmp_path / "missing.pth"), str(tmp_path / "o2")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "missing.pth" in bad.stderr and "Traceback" not in bad.stderr
