#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build medusa-gguf for CUDA, then, with every layer on the GPU, run the exactness
# and greedy-property tests, measure the cost curve and a short benchmark. Results and a summary.json go to
# ${OUT:-gpu_out}/; a failing step is recorded there and the next one still runs.
#   bash scripts/gpu_check.sh      # build: minutes (pip needs the network); the checks: about 8 minutes at most
# Run it in a fresh clone: setup.sh installs a CUDA build of llama-cpp-python into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PATH="$PATH:/usr/local/cuda/bin"

command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: this check needs an NVIDIA GPU" >&2; exit 2; }
command -v nvcc >/dev/null || { echo "error: no nvcc on PATH or in /usr/local/cuda/bin: the CUDA build needs the CUDA toolkit" >&2; exit 2; }
if [ -d .venv ] && ! grep -qs '"backend": "cuda"' .venv/llama-build.json; then
    echo "error: $(pwd)/.venv exists and is not a CUDA build; run this in a fresh clone (or remove .venv)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt"

start=$SECONDS
LLAMA_BACKEND=cuda bash scripts/setup.sh 2>&1 | tee "$OUT/setup.log"
echo "$((SECONDS - start))" >"$OUT/setup.seconds"
cp .venv/llama-build.json "$OUT/llama-build.json"

export N_GPU_LAYERS=-1
: >"$OUT/steps.txt"
# step NAME LIMIT_S COMMAND...: run it under a time limit, keep its log, its exit status and its wall time.
step() {
    local name=$1 limit=$2 rc=0 t0=$SECONDS
    shift 2
    echo "== $name (at most ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    tail -n 3 "$OUT/$name.log"
    echo "$name $rc $((SECONDS - t0))" >>"$OUT/steps.txt"
}

tests=(tests/test_decoding.py tests/test_backend.py)
[ -f tests/test_exactness.py ] && tests+=(tests/test_exactness.py)
step tests 240 .venv/bin/python -m pytest "${tests[@]}" -q --junitxml "$OUT/tests.xml"
step costs 60 .venv/bin/medusa-gguf costs --json "$OUT/costs.json"
step bench 180 .venv/bin/medusa-gguf bench --prompts medusa_gguf/prompts/heldout.jsonl --limit 10 --max-tokens 64 \
    --json "$OUT/bench.json"

.venv/bin/python - "$OUT" <<'EOF'
"""Write summary.json: the GPU, the llama.cpp build, and per step its exit status, seconds and test counts."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import llama_cpp

out = Path(sys.argv[1])
summary = {
    "gpu": (out / "gpu.txt").read_text().strip(),
    "llama_build": json.loads((out / "llama-build.json").read_text()),
    "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    "setup_seconds": int((out / "setup.seconds").read_text()),
    "steps": {},
}
for line in (out / "steps.txt").read_text().splitlines():
    if line.strip():
        name, rc, seconds = line.split()
        summary["steps"][name] = {"rc": int(rc), "seconds": int(seconds), "timed_out": rc in ("124", "137")}
report = out / "tests.xml"
if report.exists():
    suite = ET.parse(report).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    summary["steps"]["tests"].update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
# The Backend's "loaded ..." line names the buffers holding the weights: CUDA0 when the layers went to the GPU.
loaded = [ln for ln in (out / "costs.log").read_text().splitlines() if "weight buffers:" in ln]
summary["weight_buffers"] = loaded[0].split("weight buffers:", 1)[1].strip() if loaded else None
for name in ("costs", "bench"):
    path = out / f"{name}.json"
    summary[name] = json.loads(path.read_text()) if path.exists() else None
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary["steps"], indent=2))
print(f"wrote {out / 'summary.json'}")
EOF
