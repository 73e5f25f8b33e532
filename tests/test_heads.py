"""Medusa heads: initialisation, weights files, safe loading, mismatch errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from medusa_gguf.heads import HeadsConfig, HeadsError, MedusaHeads, load_heads, read_heads_file, save_heads

N_EMBD, N_VOCAB = 16, 50


def make_heads(k=3, draft=None, **kw) -> MedusaHeads:
    torch.manual_seed(0)
    proj = torch.randn(N_VOCAB, N_EMBD)
    cfg = HeadsConfig(k_heads=k, n_embd=N_EMBD, n_vocab=N_VOCAB, hidden_dim=8,
                      draft_vocab_size=len(draft) if draft is not None else 0, **kw)
    return MedusaHeads(cfg, proj, draft)


def test_untrained_heads_equal_the_base_lm_head():
    heads = make_heads(num_layers=2)
    h = torch.randn(4, N_EMBD)
    logits = heads(h)  # [4, K, V]
    base = h @ heads.projection.T
    for k in range(3):
        assert torch.equal(logits[:, k], base)


def test_layers_are_distinct_modules():
    heads = make_heads(num_layers=2)
    params = [p for p in heads.parameters()]
    assert len({id(p) for p in params}) == len(params) == 3 * 2 * 4  # K heads x layers x (2 weights + 2 biases)
    with torch.no_grad():
        heads.blocks[0][0].up.weight.fill_(1.0)
    assert heads.blocks[1][0].up.weight.abs().sum() == 0 and heads.blocks[0][1].up.weight.abs().sum() == 0


def test_topk_maps_draft_ids_back_to_full_vocabulary():
    draft = torch.tensor([3, 7, 11, 20, 42])
    heads = make_heads(draft=draft)
    h = heads.projection[2] * 10  # draft row 2 = full id 11 scores highest for every untrained head
    ids = heads.topk(h.numpy(), k=2)
    assert ids.shape == (3, 2)
    assert set(ids[:, 0]) == {11}
    assert set(ids.ravel()) <= set(draft.tolist())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_and_load_round_trip(tmp_path, suffix):
    heads = make_heads(draft=torch.tensor([1, 2, 3, 4]), accuracy=[[0.5, 0.1]], base_model_name="m.gguf")
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / f"heads{suffix}"
    save_heads(heads, path)
    back = load_heads(path, base_projection())
    assert back.config == heads.config
    h = torch.randn(2, N_EMBD)
    assert torch.allclose(back(h), heads(h))


def base_projection() -> torch.Tensor:
    """The projection make_heads used: the same seeded draw."""
    torch.manual_seed(0)
    return torch.randn(N_VOCAB, N_EMBD)


def test_weights_file_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"format": "medusa-gguf-heads/1", "config": {}, "payload": Evil()}, fh)
    with pytest.raises(HeadsError, match="refusing to load .*evil.pth"):
        read_heads_file(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(HeadsError, match="not found: .*nope.pth"):
        read_heads_file(tmp_path / "nope.pth")
    torch.save({"just": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(HeadsError, match="not a medusa-gguf weights file"):
        read_heads_file(tmp_path / "other.pth")


def test_mismatches_name_both_sides(tmp_path):
    heads = make_heads(k=3, base_model_name="small.gguf")
    path = tmp_path / "h.pth"
    save_heads(heads, path)
    with pytest.raises(HeadsError, match=r"width 16 \(small.gguf\); this model has width 32"):
        load_heads(path, torch.zeros(N_VOCAB, 32))
    with pytest.raises(HeadsError, match=r"vocabulary of 50 tokens \(small.gguf\); this model has 60"):
        load_heads(path, torch.zeros(60, N_EMBD))
    with pytest.raises(HeadsError, match="has 3 heads but 5 were requested"):
        load_heads(path, torch.zeros(N_VOCAB, N_EMBD), k_heads=5)


def test_half_precision_file_is_smaller_and_close(tmp_path):
    heads = make_heads()
    save_heads(heads, tmp_path / "full.pth")
    save_heads(heads, tmp_path / "half.pth", half=True)
    assert (tmp_path / "half.pth").stat().st_size < (tmp_path / "full.pth").stat().st_size
    back = load_heads(tmp_path / "half.pth", base_projection())
    h = torch.randn(2, N_EMBD)
    assert np.allclose(back(h).detach().numpy(), heads(h).detach().numpy(), atol=1e-2)
