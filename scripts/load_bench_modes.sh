#!/bin/bash
# The README's load-benchmark table: this server with plain decoding and with the shipped heads drafting
# (TREE=default: the static tree; TREE=auto decodes plainly on a 2-core CPU), and the peer, llama-server built from
# the llama.cpp sources llama-cpp-python 0.3.36 vendors (scripts/llama_server_peer.py builds it once, ~10 min),
# with -np slots and its continuous batching. Each serves 16 requests at once (N_PARALLEL / -np) with a 1024-token
# window per request, on 2 threads, and is driven by scripts/load_bench.py at 1, 4, 16 and 32 streaming clients
# (2 requests per client, 64 tokens, greedy; every answer compared with the same prompt's answer alone).
# JSON: docs/load_bench_{plain,default,llama_server}.json.
#   bash scripts/load_bench_modes.sh [port] [extra load_bench.py flags...]
# LEVELS=16,32 MODES="plain" ... runs a part (modes: plain default llama_server).
set -euo pipefail
cd "$(dirname "$0")/.."
port=${1:-8765}
shift || true
mkdir -p runs
levels=${LEVELS:-1,4,16,32}
modes=${MODES:-plain default llama_server}
slots=16
model=$(.venv/bin/python -c "from medusa_gguf.models import embedded_model_path; print(embedded_model_path())")
server=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'scripts'); import llama_server_peer as p; print(p.build_llama_server(2))")

run() {  # name, command...
  local name=$1
  shift
  "$@" > "runs/load_server_$name.log" 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT  # the server is usually gone by then: not a failure
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
  .venv/bin/python scripts/load_bench.py "http://127.0.0.1:$port" --concurrency $levels --requests 2 \
      --max-tokens 64 --json "docs/load_bench_$name.json" "${extra[@]}"
  kill $pid
  wait $pid 2>/dev/null || true
}

extra=("$@")
for mode in $modes; do
  if [ "$mode" = llama_server ]; then
    run llama_server "$server" -m "$model" --port $port -t 2 -np $slots -c $((slots * 1024)) --no-webui
  else
    run "$mode" env PORT=$port TREE=$mode N_PARALLEL=$slots MAX_QUEUE=32 N_CTX=1024 N_THREADS=2 \
        .venv/bin/python main.py
  fi
done
