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
