"""Drafters for engines that serve across GPUs: Medusa heads as vLLM's and SGLang's `medusa` draft model, and
EAGLE-3 drafters in the Hugging Face layout that EAGLE-3 checkpoints use.

    medusa-gguf export --format vllm HEADS.pth OUT_DIR [--model GGUF] [--dtype float16|bfloat16|float32]
    medusa-gguf export --format eagle3-hf DRAFTER.pth OUT_DIR [--dtype ...]

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

`--format eagle3-hf` writes the layout of EAGLE-3 checkpoints (`LlamaForCausalLMEagle3`), as vLLM's and SGLang's
`eagle3` method and llama.cpp's converter (`convert_hf_to_gguf.py`, conversion/llama.py) read it:
- config.json: a one-layer llama config (hidden_size, intermediate_size, heads, head_dim, rms_norm_eps,
  rope_theta, vocab_size = the target's) plus draft_vocab_size, target_hidden_size, norm_before_fc and
  eagle_aux_hidden_state_layer_ids (top level and under eagle_config). The ids are layer INPUTS, the convention of
  vLLM's aux hidden states and of llama.cpp's eagle3.target_layers (medusa_gguf/features.py).
- model.safetensors: `fc.weight`, `input_norm.weight` (norm_before_fc only), `midlayer.input_layernorm` (the token
  embedding's norm), `midlayer.hidden_norm`, `midlayer.self_attn.{q,k,v,o}_proj`, `midlayer.post_attention_layernorm`,
  `midlayer.mlp.{gate,up,down}_proj`, `norm`, `lm_head` [draft_vocab_size, hidden], `d2t` (int64 OFFSETS:
  target id - draft id, as EAGLE-3 stores them) and `t2d` (bool [vocab]).
- q_proj and k_proj rows are reordered from llama.cpp's adjacent-pair RoPE layout (which the drafter computes) to
  Hugging Face's rotate-half layout: the inverse of the permutation llama.cpp's converter applies.
- The token embeddings are the target's and are not stored; EAGLE-3 loaders take them from the target.

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
    config, _ = read_heads_file(weights)
    projection = None
    if config.head_type == "medusa" and not config.own_lm_head:
        from .models import output_matrix, resolve_model_path

        projection = torch.from_numpy(output_matrix(resolve_model_path(model)))
    cfg, tensors = vllm_tensors(weights, projection)
    cfg["torch_dtype"] = dtype
    cast = {k: v if k == "token_map" else v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    _write_folder(out_dir, cfg, cast)
    n = sum(t.numel() for t in cast.values())
    log.info("wrote %s: %d heads, %d blocks each, draft vocabulary %d of %d, %.1fM parameters (%s)", out_dir,
             cfg["num_heads"], cfg["num_hidden_layers"], cfg["truncated_vocab_size"], cfg["vocab_size"], n / 1e6, dtype)
    return out_dir


# -- EAGLE-3, Hugging Face layout ------------------------------------------------------------------------------


def rope_to_hf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from llama.cpp's layout (RoPE on adjacent pairs) to Hugging Face's (rotate-half):
    the inverse of `LlamaModel.permute` in llama.cpp's converter, which maps HF to GGML."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def eagle3_hf_tensors(weights: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json's dict, the tensors by the EAGLE-3 checkpoint names) for a drafter file (module docstring)."""
    from .eagle3 import read_drafter_file

    c, state = read_drafter_file(weights)
    d2t = state["d2t"].long()
    t2d = torch.zeros(c.n_vocab, dtype=torch.bool)
    t2d[d2t] = True
    tensors = {
        "fc.weight": state["fc.weight"],
        "midlayer.input_layernorm.weight": state["attn_norm"],
        "midlayer.hidden_norm.weight": state["hidden_norm"],
        "midlayer.self_attn.q_proj.weight": rope_to_hf(state["wq.weight"], c.n_head),
        "midlayer.self_attn.k_proj.weight": rope_to_hf(state["wk.weight"], c.n_head_kv),
        "midlayer.self_attn.v_proj.weight": state["wv.weight"],
        "midlayer.self_attn.o_proj.weight": state["wo.weight"],
        "midlayer.post_attention_layernorm.weight": state["ffn_norm"],
        "midlayer.mlp.gate_proj.weight": state["ffn_gate.weight"],
        "midlayer.mlp.up_proj.weight": state["ffn_up.weight"],
        "midlayer.mlp.down_proj.weight": state["ffn_down.weight"],
        "norm.weight": state["output_norm"],
        "lm_head.weight": state["output.weight"],
        "d2t": d2t - torch.arange(len(d2t)),
        "t2d": t2d,
    }
    if c.norm_before_fc:
        tensors["input_norm.weight"] = state["input_norm"]
    layers = list(c.target_layers)
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": c.width,
        "intermediate_size": c.n_ff,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_head_kv,
        "head_dim": c.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.n_ctx_train,
        "vocab_size": c.n_vocab,
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_width,
        "tie_word_embeddings": False,
        "norm_before_fc": c.norm_before_fc,
        "norm_before_residual": False,
        "eagle_aux_hidden_state_layer_ids": layers,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": layers, "use_aux_hidden_state": True},
        "medusa_gguf": {"base_model_name": c.base_model_name, "base_model_sha256": c.base_model_sha256,
                        "accuracy": [list(r) for r in c.accuracy]},
    }
    return cfg, tensors


def _write_folder(out_dir: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """config.json + model.safetensors, built beside OUT_DIR and renamed into place (no half folder on failure)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_eagle3_hf(weights: Path, out_dir: Path, *, dtype: str = "bfloat16") -> Path:
    """Write an EAGLE-3 drafter in the Hugging Face layout (module docstring); returns OUT_DIR."""
    cfg, tensors = eagle3_hf_tensors(weights)
    cfg["torch_dtype"] = dtype
    cast = {k: v if not v.is_floating_point() else v.to(DTYPES[dtype]) for k, v in tensors.items()}
    _write_folder(out_dir, cfg, cast)
    log.info("wrote %s: EAGLE-3 drafter, target layers %s, draft vocabulary %d of %d (%s)", out_dir,
             cfg["eagle_aux_hidden_state_layer_ids"], cfg["draft_vocab_size"], cfg["vocab_size"], dtype)
    return Path(out_dir)
