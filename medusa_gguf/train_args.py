"""Training options: the dataclass and its command line (kept free of torch so the CLI starts fast)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


TRAIN_DESCRIPTION = """Train Medusa heads on the base model's real hidden states.

  python model/train_medusa.py --base_model_path M.gguf --dataset_name wikitext \\
      --dataset_config wikitext-103-raw-v1 --dataset_split 'train[:10%]' --epochs 3
  python model/train_medusa.py --self_distill --prompts_file prompts.jsonl --epochs 2
  torchrun --nproc_per_node 2 model/train_medusa.py ...   (DistributedDataParallel)

Checkpoints (medusa_heads_epoch{N}.pth, medusa_heads_latest.pth), metrics.jsonl and training_curves.png go to
--output_dir; --resume continues an interrupted run exactly."""


@dataclass(frozen=True)
class TrainArgs:
    base_model_path: str | None = None
    dataset_name: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    train_files: tuple[str, ...] = ()
    self_distill: bool = False
    corpus: str | None = None  # a self-distilled corpus root (medusa_gguf.corpus, e.g. data/corpus): its answers
    prompts_file: str | None = None
    max_samples: int = 0  # 0: all
    distill_max_tokens: int = 256
    max_seq_len: int = 512
    val_fraction: float = 0.05
    max_train_sequences: int = 0  # 0: all; else train on the first N sequences only (data-size curves)
    train_on_rest: bool = False  # eagle3 --corpus --max_samples N: also train on every sequence outside the draw
    train_on_prompt: bool = False  # chats: also train and score the prompt's positions (default: the reply's only)
    output_dir: str = "medusa_heads_weights"
    cache_dir: str | None = None  # default: <output_dir>/cache
    k_heads: int = 5
    head_type: str = "medusa"  # "medusa", "dependent" or "eagle3"
    ttt_steps: int = 3  # eagle3: training-time test steps (the drafter unrolled on its own states)
    eval_steps: int = 6  # eagle3: validation unrolls max(ttt_steps, eval_steps) steps for the rank accuracies
    eval_only: bool = False  # eagle3: re-evaluate --output_dir's eagle3_latest.pth on the run's validation split
    norm_before_fc: bool = True  # eagle3: RMSNorm the three layers' concatenated features before fc
    mix_rank: int = 0  # dependent heads: rank of the path-mixing matrices (0: full)
    num_layers: int = 1
    hidden_dim: int = 0  # 0: half the base model's width
    block: str = "bottleneck"  # or "paper" (x + SiLU(W x + b)): what vLLM and SGLang load
    own_lm_head: bool = False
    draft_vocab_size: int = 8192  # 0: full vocabulary
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # 0: 5% of the optimizer steps
    max_grad_norm: float = 1.0
    loss_decay: float = 0.8
    epochs: int = 3
    save_steps: int = 200
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: leave torch's and llama.cpp's defaults
    precision: str = "auto"  # eagle3: matmul precision, auto | fp32 | bf16 (autocast; the weights stay fp32)
    stop_after_steps: int = 0  # testing aid: stop as if killed after this many optimizer steps


# -- command line --------------------------------------------------------------------------------------------------


def build_parser(prog: str = "train_medusa.py") -> argparse.ArgumentParser:
    d = TrainArgs()
    p = argparse.ArgumentParser(prog=prog, description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("base model and data")
    g.add_argument("--base_model_path", help="GGUF file; default: BASE_MODEL_PATH or the embedded SmolLM2-135M")
    g.add_argument("--dataset_name", help="Hugging Face dataset (cache or hub), e.g. wikitext")
    g.add_argument("--dataset_config", help="its configuration, e.g. wikitext-103-raw-v1")
    g.add_argument("--dataset_split", default=d.dataset_split, help="split, e.g. 'train[:10%%]' (default: %(default)s)")
    g.add_argument("--train_files", nargs="*", default=[], help=".txt, .jsonl with 'text', or .jsonl chat 'messages'")
    g.add_argument("--self_distill", action="store_true", help="train on the base model's own answers to the prompts")
    g.add_argument("--corpus", help="train on the answers stored in this self-distilled corpus root (data/corpus, "
                                    "grown by `python -m medusa_gguf.corpus grow`) instead of samples; the model's "
                                    "hash picks its folder")
    g.add_argument("--prompts_file", help="prompts for --self_distill (.jsonl with 'prompt'/'messages'/'text', or .txt)")
    g.add_argument("--max_samples", type=int, default=0, help="use at most this many samples/prompts (0: all); from a --corpus, a random "
                        "draw over the whole store (seeded by --seed), so every prompt source is represented")
    g.add_argument("--distill_max_tokens", type=int, default=d.distill_max_tokens, help="answer length cap (default: %(default)s)")
    g.add_argument("--max_seq_len", type=int, default=d.max_seq_len, help="tokens per training sequence (default: %(default)s)")
    g.add_argument("--val_fraction", type=float, default=d.val_fraction, help="held-out share of sequences (default: %(default)s)")
    g.add_argument("--train_on_prompt", action="store_true",
                   help="chats: also train (and validate) on the prompt and chat-template positions; by default only "
                        "the positions the heads meet when serving (from the last prompt token on) count")
    g.add_argument("--max_train_sequences", type=int, default=0,
                   help="train on the first N training sequences only, same hidden-state cache and validation set "
                        "(for data-size curves; 0: all)")
    g.add_argument("--train_on_rest", action="store_true",
                   help="eagle3, with --corpus and --max_samples N: also train on every corpus sequence outside the "
                        "draw of N. The draw's split stays as it was, so its cached features are reused, only the "
                        "rest is extracted, and validation is the same set an N-sample run reported on")
    h = p.add_argument_group("heads")
    h.add_argument("--k_heads", type=int, default=d.k_heads, help="number of heads (default: %(default)s)")
    h.add_argument("--head_type", default=d.head_type, choices=["medusa", "dependent", "eagle3"],
                   help="medusa: head k reads h_t; dependent: also the embeddings of tokens t+1..t+k on its tree path; "
                        "eagle3: an EAGLE-3 drafter (one decoder layer over three target layers' features, trained "
                        "with training-time test; eagle3_latest.pth, exported to llama.cpp by medusa_gguf.eagle3_gguf) "
                        "(default: %(default)s)")
    h.add_argument("--ttt_steps", type=int, default=d.ttt_steps,
                   help="eagle3: steps the drafter is unrolled on its own predictions, each with a loss "
                        "(default: %(default)s)")
    h.add_argument("--eval_steps", type=int, default=d.eval_steps,
                   help="eagle3: validation unrolls the drafter this many steps (at least --ttt_steps) for the rank "
                        "accuracies stored in the drafter, which TREE=auto sizes dynamic trees with: the accuracies "
                        "of levels past --ttt_steps are measured, not assumed equal to the last trained step's "
                        "(default: %(default)s)")
    h.add_argument("--eval_only", action="store_true",
                   help="eagle3: evaluate --output_dir's eagle3_latest.pth on this run's validation split (same "
                        "data flags and --seed as its training; cached features are reused), record the accuracies "
                        "in it and stop; re-export it afterwards")
    h.add_argument("--norm_before_fc", action=argparse.BooleanOptionalAction, default=d.norm_before_fc,
                   help="eagle3: RMSNorm the concatenated target features before fc (llama.cpp's "
                        "eagle3.norm_before_fc, as EAGLE-3.1 drafters do); the target's residual stream reaches "
                        "~25,000 on the default model (default: %(default)s)")
    h.add_argument("--mix_rank", type=int, default=d.mix_rank,
                   help="dependent heads: rank of the matrices that mix the path embeddings in (0: full rank; "
                        "a small rank means fewer bytes per draft; default: %(default)s)")
    h.add_argument("--num_layers", type=int, default=d.num_layers, help="residual blocks per head (default: %(default)s)")
    h.add_argument("--hidden_dim", type=int, default=0, help="block width (default: half the base model's width)")
    h.add_argument("--block", choices=("bottleneck", "paper"), default=d.block,
                   help="residual block: bottleneck, x + W_up SiLU(W_down x); or paper, x + SiLU(W x + b) with W "
                        "square, the Medusa paper's block and the only one `medusa-gguf export --format vllm` "
                        "writes (vLLM and SGLang load it; default: %(default)s)")
    h.add_argument("--own_lm_head", action="store_true", help="train a projection per head instead of sharing the base one")
    h.add_argument("--draft_vocab_size", type=int, default=d.draft_vocab_size,
                   help="heads score only the most frequent target tokens (0: full vocabulary; default: %(default)s)")
    t = p.add_argument_group("training")
    t.add_argument("--output_dir", default=d.output_dir, help="checkpoints, metrics and plots (default: %(default)s)")
    t.add_argument("--cache_dir", help="hidden-state shards and distilled data (default: OUTPUT_DIR/cache)")
    t.add_argument("--batch_size", type=int, default=d.batch_size, help="sequences per micro-batch (default: %(default)s)")
    t.add_argument("--grad_accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step (default: %(default)s)")
    t.add_argument("--learning_rate", type=float, default=d.learning_rate, help="peak AdamW learning rate (default: %(default)s)")
    t.add_argument("--weight_decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    t.add_argument("--warmup_steps", type=int, default=0, help="linear warmup, then cosine decay (default: 5%% of the steps)")
    t.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm, help="gradient clipping (default: %(default)s)")
    t.add_argument("--loss_decay", type=float, default=d.loss_decay, help="weight of head k is decay^(k-1) (default: %(default)s)")
    t.add_argument("--epochs", type=int, default=d.epochs, help="passes over the data (default: %(default)s)")
    t.add_argument("--save_steps", type=int, default=d.save_steps, help="checkpoint every N optimizer steps (default: %(default)s)")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/training_state.pth")
    t.add_argument("--seed", type=int, default=d.seed, help="data order and split seed (default: %(default)s)")
    t.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    t.add_argument("--threads", type=int, default=0, help="CPU threads for torch and llama.cpp (0: defaults)")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="eagle3: matmul precision; bf16 autocasts the matmuls and keeps fp32 weights, about twice "
                        "as fast where the CPU has AVX512-BF16 or AMX; auto picks it there (default: %(default)s)")
    t.add_argument("--stop_after_steps", type=int, default=0, help=argparse.SUPPRESS)
    return p


def args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    values = vars(ns).copy()
    values["train_files"] = tuple(values.get("train_files") or ())
    known = TrainArgs.__dataclass_fields__
    return TrainArgs(**{k: v for k, v in values.items() if k in known})
