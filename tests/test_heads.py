"""Medusa heads: initialisation, weights files, safe loading, mismatch errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from medusa_gguf.heads import (DependentHeads, HeadsConfig, HeadsError, MedusaHeads, _Int8Linear, load_heads,
                               read_heads_file, save_heads)
from medusa_gguf.tree import build_tree

N_EMBD, N_VOCAB = 16, 50


def make_heads(k=3, draft=None, draft_int8=True, **kw) -> MedusaHeads:
    torch.manual_seed(0)
    proj = torch.randn(N_VOCAB, N_EMBD)
    cfg = HeadsConfig(k_heads=k, n_embd=N_EMBD, n_vocab=N_VOCAB, hidden_dim=8,
                      draft_vocab_size=len(draft) if draft is not None else 0, **kw)
    return MedusaHeads(cfg, proj, draft, draft_int8=draft_int8)


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


# -- dependent heads ------------------------------------------------------------------------------------------------


def make_dependent(k=3, draft=None, trained=False, draft_int8=True, **kw) -> DependentHeads:
    torch.manual_seed(0)
    proj = torch.randn(N_VOCAB, N_EMBD)
    emb = torch.randn(N_VOCAB, N_EMBD)
    cfg = HeadsConfig(k_heads=k, n_embd=N_EMBD, n_vocab=N_VOCAB, hidden_dim=8, head_type="dependent",
                      draft_vocab_size=len(draft) if draft is not None else 0, **kw)
    heads = DependentHeads(cfg, proj, emb, draft, draft_int8=draft_int8)
    if trained:
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(0.5 * torch.randn_like(p))
    return heads


@pytest.mark.parametrize("mix_rank", [0, 4])
def test_untrained_dependent_heads_equal_medusa_heads(mix_rank):
    dep, med = make_dependent(num_layers=2, mix_rank=mix_rank), make_heads(num_layers=2)
    h = torch.randn(4, N_EMBD)
    future = torch.randint(0, N_VOCAB, (4, 3))
    assert torch.equal(dep(h, future), med(h))
    tree = build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    assert dep.draft(h[0].numpy(), 7, tree) == med.draft(h[0].numpy(), 7, tree)


def test_dependent_heads_read_the_path_tokens():
    heads = make_dependent(trained=True)
    h = torch.randn(1, N_EMBD)
    a = heads(h, torch.tensor([[1, 2, 3]]))
    b = heads(h, torch.tensor([[1, 2, 4]]))  # only token t+3 differs: heads 1 and 2 cannot see it
    assert torch.equal(a[:, :2], b[:, :2]) and not torch.equal(a[:, 2], b[:, 2])
    c = heads(h, torch.tensor([[5, 2, 3]]))  # token t+1 (the root) feeds every head
    assert not any(torch.equal(a[:, k], c[:, k]) for k in range(3))


@pytest.mark.parametrize("mix_rank", [0, 4])
def test_level_by_level_draft_matches_teacher_forced_scores(mix_rank):
    """Each drafted node is its head's rank-r candidate given exactly the tokens above it on its path."""
    draft = torch.tensor([0, 3, 5, 8, 13, 21, 34, 40, 44, 49])
    heads = make_dependent(draft=draft, trained=True, mix_rank=mix_rank, draft_int8=False)  # exact fp32 drafts
    tree = build_tree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (1, 0, 1)])
    h = torch.randn(N_EMBD)
    tokens = heads.draft(h.numpy(), 9, tree)
    for i in range(1, tree.n_nodes):
        path, j = [], tree.parents[i]
        while j >= 0:
            path.append(tokens[j])
            j = tree.parents[j]
        path = path[::-1]  # root .. parent: tokens t+1 .. t+d
        d = tree.depths[i]
        future = torch.tensor([path + [0] * (3 - len(path))])
        logits = heads(h.unsqueeze(0), future)[0, d - 1]
        assert tokens[i] == int(draft[torch.topk(logits, tree.ranks[i] + 1).indices[-1]])
    assert set(tokens[1:]) <= set(draft.tolist())


@pytest.mark.parametrize("mix_rank", [0, 4])
def test_dependent_heads_round_trip_and_need_embeddings(tmp_path, mix_rank):
    heads = make_dependent(trained=True, accuracy=[[0.5], [0.4], [0.3]], mix_rank=mix_rank)
    path = tmp_path / "dep.pth"
    save_heads(heads, path)
    assert "embeddings" not in read_heads_file(path)[1]  # rebuilt from the GGUF, never stored
    with pytest.raises(HeadsError, match="need the base model's token embeddings"):
        load_heads(path, base_projection())
    torch.manual_seed(0)
    proj, emb = torch.randn(N_VOCAB, N_EMBD), torch.randn(N_VOCAB, N_EMBD)
    back = load_heads(path, proj, embeddings=lambda: emb)
    assert isinstance(back, DependentHeads) and back.config.head_type == "dependent"
    h, future = torch.randn(2, N_EMBD), torch.randint(0, N_VOCAB, (2, 3))
    assert torch.allclose(back(h, future), heads(h, future))
    with pytest.raises(HeadsError, match=r"token embeddings have shape \(50, 8\)"):
        load_heads(path, proj, embeddings=torch.zeros(N_VOCAB, 8))


@pytest.mark.parametrize("own", [False, True])
def test_fast_inference_path_matches_forward_and_follows_updates(own):
    heads = make_heads(num_layers=2, draft=torch.tensor([0, 3, 5, 8, 13, 21, 34, 40]), own_lm_head=own,
                       draft_int8=False)
    for step in range(2):  # the second round changes the weights after the fast path was built
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(0.5 * torch.randn_like(p))
        h = torch.randn(N_EMBD)
        want = heads.draft_ids[torch.topk(heads(h.unsqueeze(0))[0], 3, dim=-1).indices].numpy()
        assert np.array_equal(heads.topk(h.numpy(), 3), want)


@pytest.mark.parametrize("head_type", ["medusa", "dependent"])
def test_int8_drafts_track_the_exact_scores(head_type):
    """int8 weights move the draft logits by well under 1% of their range and keep the top-1 candidate wherever
    the exact top two are not a near-tie; widths that are not multiples of 16 exercise the kernel's zero-padding."""
    torch.manual_seed(1)
    d, v = 40, 300
    cfg = HeadsConfig(k_heads=3, n_embd=d, n_vocab=v, hidden_dim=24, head_type=head_type)
    proj, emb = torch.randn(v, d), torch.randn(v, d)
    heads = MedusaHeads(cfg, proj) if head_type == "medusa" else DependentHeads(cfg, proj, emb)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.3 * torch.randn_like(p))
    heads.draft_int8 = True
    quantized = heads._inference_weights()
    heads.draft_int8 = False
    exact = heads._inference_weights()
    assert isinstance(quantized.projections[0], _Int8Linear) and quantized.projections[0].weight.dtype == torch.int8
    h = torch.randn(64, d)
    agree = kept = 0
    for k in range(cfg.k_heads):
        x = h + (exact.mix[k][0](emb[torch.randint(0, v, (64, k + 1))].flatten(1)) if head_type == "dependent" else 0)
        want, got = exact.logits(exact.block(k, x)), quantized.logits(quantized.block(k, x))
        assert (got - want).abs().max() < 0.01 * (want.max() - want.min())
        top2 = torch.topk(want, 2, dim=-1)
        clear = (top2.values[:, 0] - top2.values[:, 1]) > 0.01 * (want.max() - want.min())
        kept += int(clear.sum())
        agree += int((got.argmax(-1) == want.argmax(-1))[clear].sum())
    assert kept > 100 and agree == kept
