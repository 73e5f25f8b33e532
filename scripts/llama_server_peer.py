"""The peer: llama-server built from the llama.cpp that llama-cpp-python 0.3.36 vendors, on the same model and
prompts, in four modes: plain, EAGLE-3 with this project's exported drafter (`--spec-type draft-eagle3`),
n-gram (`ngram-mod`), and this project's server (`python main.py`) with the same drafter: calibrated (`TREE=auto`),
a top-1 chain (`TREE=chain`) and the default dynamic tree (`TREE=default`). Not part of CI:
building llama-server takes ~10 minutes on 2 cores (cached under ~/.cache/medusa-gguf/llama-server).

    .venv/bin/python scripts/llama_server_peer.py --drafter medusa_gguf/assets/smollm2-135m-instruct-q4_1.eagle3.gguf \\
        --prompts medusa_gguf/prompts/unseen.jsonl --limit 10 --max-tokens 128 --json runs/peer.json

Every mode answers the same chat requests, greedy, one at a time; tokens/s is completion tokens over wall time
per request (summed). The outputs of every mode are compared with llama-server's plain outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"
CACHE = Path(os.environ.get("MEDUSA_GGUF_CACHE", Path.home() / ".cache" / "medusa-gguf")) / "llama-server"


def build_llama_server(jobs: int) -> Path:
    """llama-server from the vendored sources of llama-cpp-python's sdist (pip download), built once."""
    exe = CACHE / "build" / "bin" / "llama-server"
    if exe.is_file():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
    src = CACHE / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not src.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(CACHE, filter="data")
    flags = json.loads((ROOT / ".venv" / "llama-build.json").read_text()).get("cmake_args", "") \
        if (ROOT / ".venv" / "llama-build.json").is_file() else ""
    cmd = ["cmake", "-S", str(src), "-B", str(CACHE / "build"), "-DCMAKE_BUILD_TYPE=Release",
           "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
           *[f for f in str(flags).split() if f.startswith("-D")]]
    print("configuring:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    subprocess.run(["cmake", "--build", str(CACHE / "build"), "--target", "llama-server", "-j", str(jobs)], check=True)
    return exe


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become ready in {timeout} s")


def model_id(url: str) -> str:
    """The served model's id: this project's server answers 404 for another name, as the OpenAI API does."""
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def chat(url: str, prompt: str, max_tokens: int) -> tuple[str, int, float, dict]:
    body = json.dumps({"model": model_id(url), "temperature": 0, "max_tokens": max_tokens, "seed": 0,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        reply = json.loads(r.read())
    dt = time.perf_counter() - t0
    return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"], dt, reply


def run_mode(name: str, cmd: list[str], url: str, prompts: list[str], max_tokens: int, env=None) -> dict:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    log = open(CACHE / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        wait_ready(url, proc)
        chat(url, prompts[0], 8)  # warm-up
        texts, tokens, seconds, extra = [], 0, 0.0, []
        for p in prompts:
            text, n, dt, reply = chat(url, p, max_tokens)
            texts.append(text)
            tokens += n
            seconds += dt
            extra.append(reply.get("timings") or reply.get("medusa") or {})
        row = {"mode": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "texts": texts}
        drafted = [e.get("draft_n", 0) for e in extra]
        accepted = [e.get("draft_n_accepted", 0) for e in extra]
        if any(drafted):  # llama-server: every step drafts (n-min 0), so steps = tokens - accepted drafts
            row["draft_acceptance"] = sum(accepted) / max(1, sum(drafted))
            row["tau"] = tokens / max(1, tokens - sum(accepted))
        steps = sum(e.get("steps", 0) for e in extra)
        if steps:  # this server: tokens per step, and the share of steps whose first draft was accepted
            row["tau"] = sum(e.get("tokens", 0) for e in extra) / steps
            first = [e["steps"] * (e.get("acceptance_rate_per_depth") or [0.0])[0] for e in extra if e.get("steps")]
            row["first_draft_accepted"] = sum(first) / steps
        print(f"   {row['tokens_per_s']:.1f} tokens/s over {tokens} tokens", flush=True)
        return row
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", type=Path, required=True, help="exported EAGLE-3 drafter (.gguf)")
    ap.add_argument("--prompts", type=Path, default=ROOT / "medusa_gguf" / "prompts" / "unseen.jsonl")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-max", type=int, default=5, help="llama-server --spec-draft-n-max")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build jobs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from medusa_gguf.models import embedded_model_path

    model = embedded_model_path()
    exe = build_llama_server(args.jobs)
    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows[:: max(1, len(rows) // args.limit)][: args.limit]]
    port = 8093
    url = f"http://127.0.0.1:{port}"
    base = [str(exe), "-m", str(model), "--port", str(port), "-t", str(args.threads), "-c", "4096", "-np", "1",
            "--no-webui", "-fa", "off"]
    spec = ["--spec-draft-n-max", str(args.draft_max), "--spec-draft-n-min", "0"]
    modes = [("llama-server plain", base),
             ("llama-server draft-eagle3", base + ["-md", str(args.drafter), "--spec-type", "draft-eagle3", *spec]),
             ("llama-server ngram-mod", base + ["--spec-type", "ngram-mod"])]
    results = []
    for name, cmd in modes:
        try:
            results.append(run_mode(name.replace(" ", "_"), cmd, url, prompts, args.max_tokens))
        except Exception as exc:  # a mode that fails is reported, the others still run
            print(f"   {name} failed: {exc} (log: {CACHE / (name.replace(' ', '_') + '.log')})", flush=True)
            results.append({"mode": name.replace(" ", "_"), "error": str(exc)})
    # This server with the same drafter and one slot (the drafter serves one request at a time; with more slots
    # the server decodes plainly): calibrated (what a user gets), and drafting on every step as llama-server does
    # (a chain as deep as llama-server's, and the default dynamic tree).
    for tree in ("auto", "chain", "default"):
        env = {**os.environ, "PORT": str(port), "MEDUSA_WEIGHTS_PATH": str(args.drafter),
               "N_THREADS": str(args.threads), "TREE": tree, "N_PARALLEL": "1"}  # one slot, as llama-server -np 1
        results.append(run_mode(f"medusa-gguf_eagle3_{tree}", [sys.executable, "main.py"], url, prompts,
                                args.max_tokens, env=env))
    plain = next((r for r in results if r["mode"] == "llama-server_plain" and "texts" in r), None)
    print(f"\n{'mode':30s} {'tokens/s':>9s} {'vs plain':>9s} {'tau':>5s} {'same text':>10s}")
    for r in results:
        if "texts" not in r:
            print(f"{r['mode']:30s} failed: {r['error']}")
            continue
        same = sum(a == b for a, b in zip(r["texts"], plain["texts"])) if plain else 0
        ratio = r["tokens_per_s"] / plain["tokens_per_s"] if plain else float("nan")
        print(f"{r['mode']:30s} {r['tokens_per_s']:9.1f} {ratio:8.2f}x {r.get('tau', 1.0):5.2f} "
              f"{same:>4d}/{len(prompts)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(CACHE / "tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
