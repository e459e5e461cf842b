#!/usr/bin/env bash
# Sets up the Python venv for the peer benchmarks in peers.py (llama.cpp via
# llama-cpp-python, and HF transformers on CPU). Idempotent: steps whose pinned
# versions are already installed are skipped.
#   venv: ${AQUILA_PEERS_VENV:-$HOME/.cache/aquila/peers-venv}  (~5.7 GB)
#   time: ~10-15 min for the llama.cpp build (2 jobs), ~4 min for the rest.
# Only PyPI is needed. PyPI's Linux torch wheel is the CUDA build: it pulls
# ~4 GB of nvidia-*/cuda-* wheels that it needs even to import, but runs on CPU.
set -euo pipefail

VENV=${AQUILA_PEERS_VENV:-$HOME/.cache/aquila/peers-venv}
JOBS=${AQUILA_PEERS_JOBS:-2}
PINS_LLAMA="llama-cpp-python==0.3.36"
PINS_TORCH="torch==2.15.0 transformers==5.24.0 accelerate==1.15.0 gguf==0.19.0
  safetensors==0.8.0 numpy==2.4.6 sentencepiece==0.2.3"
# the native build dies with an illegal instruction on these machines; AMX is
# off too. AVX-512 only where the CPU has it: these VMs come with and without
# (an AVX-512 build on an AVX2-only VM dies the same way).
avx512=OFF; vnni=OFF
grep -qw avx512f /proc/cpuinfo && avx512=ON
grep -qw avx512_vnni /proc/cpuinfo && vnni=ON
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=$avx512 -DGGML_AVX512_VNNI=$vnni \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

# true when every "name==version" pin given is installed in the venv
have() {
  "$VENV/bin/python" - "$@" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
EOF
}

df -h "$(dirname "$VENV")" 2>/dev/null | tail -1 || true
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q --upgrade pip; }

if have $PINS_LLAMA; then echo "llama-cpp-python: already installed"; else
  echo "building $PINS_LLAMA from source ($JOBS jobs)..."
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS FORCE_CMAKE=1 \
    "$VENV/bin/pip" install --no-binary llama-cpp-python $PINS_LLAMA
fi

if have $PINS_TORCH; then echo "torch/transformers: already installed"; else
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install $PINS_TORCH
fi

"$VENV/bin/python" -c "import llama_cpp, torch, transformers; print('ok: llama_cpp', llama_cpp.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__)"
