"""`medusa-gguf`: the command line.

    medusa-gguf generate "Why is the sky blue?" --max-tokens 64
    medusa-gguf costs --json cost_curve.json

Every subcommand reads the environment variables of `Settings` (BASE_MODEL_PATH, N_THREADS, N_CTX, ...);
its flags override them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .models import ModelFileError
from .settings import Settings, SettingsError

log = logging.getLogger("medusa_gguf")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (flags override the environment variables in brackets)")
    g.add_argument("--model", type=Path, help="GGUF file, or an installed model's name (gemma3-270m) [BASE_MODEL_PATH]; default: the "
                                             "embedded SmolLM2-135M-Instruct")
    g.add_argument("--n-ctx", type=int, help="context window in tokens [N_CTX, default 4096]")
    g.add_argument("--threads", type=int, help="CPU threads [N_THREADS, default: every CPU up to 4, half beyond]")
    g.add_argument("--gpu-layers", type=int, help="layers to offload to a GPU, -1 = all [N_GPU_LAYERS, default -1]")
    g.add_argument("-v", "--verbose", action="store_true", help="log debug lines, llama.cpp's included")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        base_model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.gpu_layers
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from .decoding import GenerationResult, SamplingParams
    from .engine import Engine

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop),
    )
    engine = Engine(_settings(args))
    try:
        if args.raw or not engine.backend.has_chat_template:
            if not args.raw:
                log.info("%s has no chat template (a base model): the prompt is sent as plain text",
                         engine.backend.model_path.name)
            tokens = engine.tokenize(args.prompt)
        else:
            system = [{"role": "system", "content": args.system}] if args.system else []
            tokens = engine.chat_prompt(system + [{"role": "user", "content": args.prompt}])
        result = GenerationResult()
        for piece in engine.generate(tokens, params, result):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        st = result.stats
        log.info(
            "%d prompt tokens, %d generated, finish_reason=%s, %s decoding%s: %d steps, %.2f tokens/step, %.1f tokens/s",
            len(tokens), len(result.tokens), result.finish_reason, st.mode,
            f" ({st.reason})" if st.reason else "", st.steps, st.tau, st.tokens_per_s,
        )
    finally:
        engine.close()
    return 0


def _cmd_costs(args: argparse.Namespace) -> int:
    from .backend import Backend
    from .costs import format_table, measure_costs, save_curve

    if args.steps:
        from .costs import format_step_costs, measure_step_costs, save_json
        from .engine import step_costs_cache

        with Backend(_settings(args)) as backend:
            costs = measure_step_costs(backend)
            cache = step_costs_cache(backend)
        print(format_step_costs(costs))
        print(f"plain steps {costs.noise:.2f}x apart (slowest / fastest; above 1.6 the machine was busy)")
        save_json(costs.to_json(), args.json)
        save_json(costs.to_json(), cache)
        print(f"wrote {args.json} and the cache TREE=auto reads, {cache}")
        return 0
    sizes = tuple(sorted({int(s) for s in args.sizes.split(",")}))
    with Backend(_settings(args)) as backend:
        curve = measure_costs(backend, sizes, repeats=args.repeats, context_tokens=args.context)
    print(format_table(curve))
    save_curve(curve, args.json)
    print(f"wrote {args.json}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train_args import args_from_namespace
    from .training import train

    targs = args_from_namespace(args)
    path = train(targs)
    what = "EAGLE-3 drafter" if targs.head_type == "eagle3" else "heads"
    print(f"{what} {'re-scored' if targs.eval_only else 'written'}: {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    serve(Settings.from_env(
        base_model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
        host=args.host, port=args.port, n_parallel=args.parallel, max_queue=args.max_queue,
    ))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_report, plot_report, read_prompts, run_bench

    settings = _settings(args)
    result = run_bench(settings, read_prompts(args.prompts, args.limit), args.max_tokens, static_tree=args.static_tree,
                       weights=args.weights, dependent_weights=args.dependent_weights, eagle3=args.eagle3)
    print(format_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_report(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_recipe(args: argparse.Namespace) -> int:
    from .recipe import run_recipe

    shipped = run_recipe(args.output_dir, prompts=args.prompts, epochs=args.epochs, threads=args.threads or 0,
                         install=args.install, resume=args.resume, head_type=args.head_type)
    print(f"heads: {shipped}; report: {args.output_dir / 'REPORT.md'}")
    return 0


def _cmd_export_eagle3(args: argparse.Namespace) -> int:
    import torch

    from .eagle3 import load_drafter
    from .eagle3_gguf import export_eagle3_gguf
    from .models import embedding_matrix, output_matrix, resolve_model_path

    model = resolve_model_path(args.model)
    drafter = load_drafter(args.weights, torch.from_numpy(embedding_matrix(model, output_matrix(model))))
    export_eagle3_gguf(drafter, args.output, target_gguf=model, weight_type=args.weight_type)
    acc = drafter.config.accuracy
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB, {args.weight_type}; target "
          f"{model.name}; validation top-1 per step, given the earlier steps right: "
          f"{' '.join(f'{row[0]:.3f}' for row in acc) if acc else 'none recorded'})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_eagle3_hf, export_vllm

    if args.format == "eagle3-hf":
        out = export_eagle3_hf(args.weights, args.output, dtype=args.dtype)
        cfg = json.loads((out / "config.json").read_text())
        what = (f"EAGLE-3 drafter, target layers {cfg['eagle_aux_hidden_state_layer_ids']}, draft vocabulary "
                f"{cfg['draft_vocab_size']} of {cfg['vocab_size']}")
        method, n_spec = "eagle3", 3
    else:
        out = export_vllm(args.weights, args.output, model=args.model, dtype=args.dtype)
        cfg = json.loads((out / "config.json").read_text())
        what = f"{cfg['num_heads']} Medusa heads, draft vocabulary {cfg['truncated_vocab_size']} of {cfg['vocab_size']}"
        method, n_spec = "medusa", cfg["num_heads"]
    print(f"wrote {out}/config.json and model.safetensors ({what}, {args.dtype}); serve with vLLM: "
          f"--speculative-config '{{\"method\": \"{method}\", \"model\": \"{out}\", "
          f"\"num_speculative_tokens\": {n_spec}}}'")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .backend import quantize
    from .models import resolve_model_path

    quantize(resolve_model_path(args.model), args.output, args.type, args.threads or 0)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medusa-gguf",
        description="Medusa speculative decoding for GGUF models on llama.cpp.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="print the model's reply to a prompt", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    gen.add_argument("prompt", help="the user message (sent through the model's chat template unless --raw)")
    gen.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with this mass")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling (fixed seed: same output)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable); never printed")
    gen.add_argument("--system", default=None, help="optional system message")
    gen.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    _add_model_args(gen)
    gen.set_defaults(func=_cmd_generate)

    costs = sub.add_parser(
        "costs",
        help="measure what decoding costs on this machine: one decode call by size, or (--steps) the step cost model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    costs.add_argument("--sizes", default="1,2,4,8,16,32,64", help="comma-separated tokens per call")
    costs.add_argument("--repeats", type=int, default=9, help="timed calls per size (median reported)")
    costs.add_argument("--context", type=int, default=128, help="tokens already in context before each call")
    costs.add_argument("--json", type=Path, default=Path("cost_curve.json"), help="where to write the curve")
    costs.add_argument("--steps", action="store_true",
                       help="measure the step cost model TREE=auto uses instead: whole decode-loop steps by tree size "
                            "and leaves at 64, 512 and 2048 tokens of context (about a minute); also replaces the cached model "
                            "TREE=auto calibrates with")
    _add_model_args(costs)
    costs.set_defaults(func=_cmd_costs)

    bench = sub.add_parser(
        "bench", help="benchmark plain, prompt lookup and Medusa decoding side by side on the same prompts",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--prompts", type=Path, required=True, help="JSONL with 'prompt' (and optional 'category')")
    bench.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    bench.add_argument("--limit", type=int, default=0, help="use this many prompts, spread over the file (0: all)")
    bench.add_argument("--weights", type=Path, default=None, help="heads of the medusa_* rows [MEDUSA_WEIGHTS_PATH, else the shipped Medusa-type heads]")
    bench.add_argument("--dependent-weights", type=Path, default=None,
                       help="dependent heads for the medusa_dependent methods [the shipped dependent heads, if any]")
    bench.add_argument("--eagle3", type=Path, default=None,
                       help="exported EAGLE-3 drafter (.gguf) for the eagle3 methods [MEDUSA_WEIGHTS_PATH if it is "
                            "one, else the shipped drafter, if any]")
    bench.add_argument("--static-tree", default="default", help="static tree: default, wide, chain or a JSON file")
    bench.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    bench.add_argument("--plot", type=Path, default=None, help="write a PNG chart")
    _add_model_args(bench)
    bench.set_defaults(func=_cmd_bench)

    recipe = sub.add_parser(
        "recipe", help="reproduce the heads shipped for the default model (distill, extract, train, validate, calibrate)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    recipe.add_argument("name", choices=["default"], help="the recipe: 'default' = the embedded SmolLM2-135M model")
    recipe.add_argument("--prompts", type=int, default=3000, help="training prompts to self-distill")
    recipe.add_argument("--epochs", type=int, default=6, help="training epochs")
    recipe.add_argument("--head-type", default="dependent", choices=["medusa", "dependent"],
                        help="medusa: heads read h_t; dependent: also the drafted tokens on their path")
    recipe.add_argument("--output-dir", type=Path, default=Path("runs/recipe-default"), help="work folder")
    recipe.add_argument("--install", action="store_true", help="copy the heads into the package (medusa_gguf/assets)")
    recipe.add_argument("--resume", action="store_true", help="continue an interrupted run")
    recipe.add_argument("--threads", type=int, default=0, help="CPU threads (0: defaults)")
    recipe.add_argument("-v", "--verbose", action="store_true", help="log debug lines")
    recipe.set_defaults(func=_cmd_recipe)

    quant = sub.add_parser("quantize", help="write a copy of a GGUF with another weight type (f16, q8_0, q4_0, q4_k)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    quant.add_argument("output", type=Path, help="the new GGUF file")
    quant.add_argument("--type", required=True, choices=["f16", "q8_0", "q4_0", "q4_k"],
                       help="weight type (q4_k: llama.cpp's Q4_K_M mix)")
    _add_model_args(quant)
    quant.set_defaults(func=_cmd_quantize)

    exp = sub.add_parser(
        "export-eagle3", help="write a trained EAGLE-3 drafter (.pth / .safetensors) as a GGUF llama.cpp loads as eagle3",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The GGUF carries the target's tokenizer, its model file's SHA-256 and the drafter's validation "
                    "accuracies (the engine's TREE=auto sizes trees with them); serve it with MEDUSA_WEIGHTS_PATH=OUT "
                    "or llama-server --model-draft OUT --spec-type draft-eagle3.",
    )
    exp.add_argument("weights", type=Path, help="drafter file written by train_medusa.py --head_type eagle3")
    exp.add_argument("output", type=Path, help="the GGUF to write")
    exp.add_argument("--weight-type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                     help="matrix type (fc stays f32: the target's residual stream exceeds f16's range; "
                          "q4_0 halves the bytes each draft call reads)")
    _add_model_args(exp)
    exp.set_defaults(func=_cmd_export_eagle3)

    vx = sub.add_parser(
        "export", help="write a trained drafter for another engine (--format vllm: Medusa heads as vLLM's and "
                       "SGLang's medusa draft model; --format eagle3-hf: an EAGLE-3 drafter in the Hugging Face layout)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="--format vllm writes OUTPUT/config.json (model_type medusa) and OUTPUT/model.safetensors "
                    "(blocks.{h}.layers.{l}, lm_heads.{h}, token_map). Only Medusa-type heads with the paper's block "
                    "export (train with --head_type medusa --block paper); heads sharing the model's output matrix read "
                    "it from the GGUF (--model). --format eagle3-hf writes an EAGLE-3 drafter (train_medusa.py "
                    "--head_type eagle3) as LlamaForCausalLMEagle3: fc, midlayer.*, norm, lm_head, d2t offsets, t2d, "
                    "with q/k in Hugging Face's rotate-half order; vLLM's and SGLang's eagle3 method and llama.cpp's "
                    "converter read it. Either drafter learned the quantized GGUF's hidden states: on an fp16 "
                    "checkpoint of the same model expect somewhat lower acceptance (README).",
    )
    vx.add_argument("weights", type=Path, help="heads or EAGLE-3 drafter file (.pth / .safetensors) written by "
                                               "train_medusa.py")
    vx.add_argument("output", type=Path, help="folder to write (replaced if it exists)")
    vx.add_argument("--format", default="vllm", choices=["vllm", "eagle3-hf"], help="the engine's layout")
    vx.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="tensor type")
    _add_model_args(vx)
    vx.set_defaults(func=_cmd_export)

    from .train_args import build_parser as training_parser

    train = sub.add_parser(
        "train", parents=[training_parser()], add_help=False, help="train Medusa heads on the base model's hidden states",
        description=training_parser().description, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("-v", "--verbose", action="store_true", help="log debug lines, llama.cpp's included")
    train.set_defaults(func=_cmd_train)

    srv = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (also: python main.py)",
        description="Serve /v1/models, /v1/completions, /v1/chat/completions, /health and /metrics. "
        "Set API_KEY in the environment to require 'Authorization: Bearer <key>' on /v1 routes.",
    )
    srv.add_argument("--host", help="address to listen on [HOST, default 127.0.0.1]")
    srv.add_argument("--port", type=int, help="port to listen on [PORT, default 8000]")
    srv.add_argument("--parallel", type=int, help="requests served at once, their decodes batched in one context [N_PARALLEL, default 4]")
    srv.add_argument(
        "--max-queue", type=int, help="requests that may wait for a slot, more get 503 [MAX_QUEUE, default 16]"
    )
    _add_model_args(srv)
    srv.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (SettingsError, ModelFileError, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"medusa-gguf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
