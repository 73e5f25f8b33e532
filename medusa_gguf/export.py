"""Medusa heads for engines that serve across GPUs: vLLM and SGLang's `medusa` draft model.

    medusa-gguf export --format vllm HEADS.pth OUT_DIR [--model GGUF] [--dtype float16|bfloat16|float32]

OUT_DIR gets what vLLM's loader reads (vllm/model_executor/models/medusa.py, vllm/transformers_utils/configs/medusa.py):
- config.json: `model_type: medusa`, `architectures: [MedusaModel]`, hidden_size, vocab_size (the base model's),
  num_heads, num_hidden_layers (residual blocks per head), truncated_vocab_size (the draft vocabulary),
  medusa_fc_bias (the blocks' linears have biases), original_lm_head (one projection shared by every head).
- model.safetensors: `blocks.{h}.layers.{l}.weight` / `.bias` [hidden, hidden], each block computing
  x + SiLU(W x + b); `lm_heads.{h}.weight` [truncated_vocab_size, hidden] (only `lm_heads.0.weight` when the
  projection is shared); `token_map` [truncated_vocab_size] int64, the draft row -> base-model token id, when the
  draft vocabulary is smaller than the model's.

Only heads that compute what that loader builds can be exported: Medusa-type heads (each reads h_t alone) with
the paper's block (`--block paper` in training). Dependent heads read the drafted tokens' embeddings, and the
bottleneck block has two matrices per layer; neither has a place in that layout, and the export says so.

What does not carry over: the heads learned the hidden states of the quantized GGUF. An fp16 or bf16 checkpoint of
the same model computes slightly different hidden states, so acceptance there can be a little lower; the README
gives the effect measured on another weight type of the same model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .heads import HeadsError, read_heads_file

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def vllm_tensors(weights: Path, projection: torch.Tensor | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json's dict, the tensors by vLLM's names) for a heads file. `projection` is the base model's output
    matrix [n_vocab, n_embd], needed when the heads share it (it is not stored in the heads file)."""
    config, state = read_heads_file(weights)
    if config.head_type != "medusa":
        raise HeadsError(f"{weights} holds {config.head_type} heads, which read the drafted tokens' embeddings; "
                         f"vLLM's Medusa reads h_t alone: train --head_type medusa --block paper to export")
    if config.block != "paper":
        raise HeadsError(f"{weights} uses the {config.block} block (x + W_up SiLU(W_down x)); vLLM's Medusa block is "
                         f"x + SiLU(W x + b): train with --block paper to export")
    draft_ids = state.get("draft_ids")
    truncated = config.n_vocab if draft_ids is None or len(draft_ids) == config.n_vocab else len(draft_ids)
    tensors: dict[str, torch.Tensor] = {}
    for h in range(config.k_heads):
        for layer in range(config.num_layers):
            for part in ("weight", "bias"):
                tensors[f"blocks.{h}.layers.{layer}.{part}"] = state[f"blocks.{h}.{layer}.linear.{part}"]
    if config.own_lm_head:
        for h in range(config.k_heads):
            tensors[f"lm_heads.{h}.weight"] = state["lm_heads"][h]
    else:
        if projection is None:
            raise HeadsError(f"{weights} shares the base model's output matrix, which the export reads from the GGUF: "
                             f"pass the model (--model)")
        if tuple(projection.shape) != (config.n_vocab, config.n_embd):
            raise HeadsError(f"the model's output matrix is {tuple(projection.shape)}; {weights} was trained for "
                             f"[{config.n_vocab}, {config.n_embd}] ({config.base_model_name})")
        rows = projection if draft_ids is None else projection[draft_ids.long()]
        tensors["lm_heads.0.weight"] = rows
    if truncated < config.n_vocab:
        tensors["token_map"] = draft_ids.long()
    cfg = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": config.n_embd,
        "vocab_size": config.n_vocab,
        "num_heads": config.k_heads,
        "num_hidden_layers": config.num_layers,
        "truncated_vocab_size": truncated,
        "medusa_fc_bias": True,
        "original_lm_head": not config.own_lm_head,
        "max_paths": 64,
        "topk": 10,
        "medusa_gguf": {"base_model_name": config.base_model_name, "base_model_sha256": config.base_model_sha256,
                        "accuracy": config.accuracy},
    }
    return cfg, tensors


def export_vllm(weights: Path, out_dir: Path, *, model: Path | None = None, dtype: str = "float16") -> Path:
    """Write OUT_DIR/config.json and OUT_DIR/model.safetensors (see the module docstring); returns OUT_DIR. The
    folder is built beside the target and renamed into place, so a failed export leaves no half folder."""
    from safetensors.torch import save_file

    config, _ = read_heads_file(weights)
    projection = None
    if config.head_type == "medusa" and not config.own_lm_head:
        from .models import output_matrix, resolve_model_path

        projection = torch.from_numpy(output_matrix(resolve_model_path(model)))
    cfg, tensors = vllm_tensors(weights, projection)
    cfg["torch_dtype"] = dtype
    cast = {k: v if k == "token_map" else v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(cast, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(t.numel() for t in cast.values())
    log.info("wrote %s: %d heads, %d blocks each, draft vocabulary %d of %d, %.1fM parameters (%s)", out_dir,
             cfg["num_heads"], cfg["num_hidden_layers"], cfg["truncated_vocab_size"], cfg["vocab_size"], n / 1e6, dtype)
    return out_dir
