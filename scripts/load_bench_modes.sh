#!/bin/bash
# The README's load-benchmark table: start `python main.py` once with plain decoding and once with Medusa heads
# (TREE=default: the static tree, since TREE=auto falls back to plain decoding on a 2-core CPU), drive each
# with scripts/load_bench.py at 1, 4 and 16 concurrent streaming clients, and stop it again.
#   bash scripts/load_bench_modes.sh [port] [extra load_bench.py flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
port=${1:-8765}
shift || true
for tree in plain default; do
  PORT=$port TREE=$tree MAX_QUEUE=32 .venv/bin/python main.py > "runs/load_server_$tree.log" 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT  # the server is usually gone by then: not a failure
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
  .venv/bin/python scripts/load_bench.py "http://127.0.0.1:$port" --concurrency 1,4,16 --requests 2 \
      --max-tokens 64 --json "docs/load_bench_$tree.json" "$@"
  kill $pid
  wait $pid 2>/dev/null || true
done
