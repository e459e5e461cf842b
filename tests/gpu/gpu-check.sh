#!/usr/bin/env bash
# The CUDA backend's check, for a machine with one NVIDIA GPU and no Rust
# toolchain. Build the binary where Rust is, strip it (about 20 MB), copy it
# over with this repository:
#
#   NVCC=… CUDA_COMPUTE_CAP=90 cargo build --release --features cuda --bin aquila
#   strip -o aquila-cuda target/release/aquila
#   tests/gpu/gpu-check.sh [./aquila-cuda]          # on the GPU machine
#
# It runs `aquila gpu-check` (kernels against f64 references, the tiny preset
# on CPU and GPU, an Aquila-7B-shaped model's prefill and decode speed and the
# bandwidth roofline) and then the same shapes through PyTorch + transformers
# as the peer (skipped with a message where they are missing). CUDA's and
# NCCL's libraries come from the driver and, where they are pip wheels, from
# Python's site-packages. Prints a table last; about 5 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/../.."
bin="${1:-${AQUILA_BIN:-./aquila-cuda}}"
out="${OUT:-$(mktemp -d)}"
py="${PYTHON:-python3}"
[ -x "$bin" ] || { echo "no binary at $bin (see the top of $0)"; exit 2; }

# cuBLAS and NCCL from pip wheels (nvidia-cublas, nvidia-nccl-cu13...), if any.
libs=$("$py" - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for lib in glob.glob(os.path.join(sp, "nvidia", "**", "lib"), recursive=True):
        if glob.glob(os.path.join(lib, "lib*.so*")):
            dirs.add(lib)
print(":".join(sorted(dirs)))
PY
)
# The loader (cudarc) asks for libNAME.so or a few CUDA-versioned names, not
# NCCL's libnccl.so.2 nor CUDA 13's .so.13: give every wheel library an
# unversioned name too.
links="$out/lib"
mkdir -p "$links"
for dir in ${libs//:/ }; do
    for f in "$dir"/lib*.so.*; do
        [ -e "$f" ] || continue
        name=$(basename "$f")
        name=${name%%.so.*}
        [ -e "$links/$name.so" ] || ln -s "$f" "$links/$name.so"
    done
done
export LD_LIBRARY_PATH="$links${libs:+:$libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null

# The binary embeds kernels compiled by the build machine's nvcc; a driver
# older than that toolkit refuses them. This machine's nvcc, if it has one,
# compiles kernels.cu for its own GPU and driver, for a second try.
local_kernels=""
nvcc_bin=$(command -v nvcc || true)
[ -z "$nvcc_bin" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && nvcc_bin="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
if [ -n "$nvcc_bin" ] && [ -n "$cap" ] &&
    "$nvcc_bin" --fatbin -O3 -std=c++17 "-gencode=arch=compute_$cap,code=sm_$cap" \
        -o "$out/kernels.fatbin" worker/src/gpu/cuda/kernels.cu; then
    local_kernels="$out/kernels.fatbin"
fi

run_check() {
    rm -f "$out/aquila.json"
    timeout 300 "$bin" gpu-check --json "$out/aquila.json" 2>&1 | tee "$out/aquila.md"
    return "${PIPESTATUS[0]}"
}
echo "==> aquila gpu-check"
run_check
status=$?
if [ "$status" -ne 0 ] && grep -q 'loading the kernels' "$out/aquila.md" && [ -n "$local_kernels" ]; then
    echo "==> the embedded kernels do not load here: again with kernels.cu compiled by $nvcc_bin for sm_$cap"
    AQUILA_CUDA_KERNELS="$local_kernels" run_check
    status=$?
fi

echo "==> peer: transformers LlamaForCausalLM, bf16, same shapes"
timeout 180 "$py" tests/gpu/peer_transformers.py | tee "$out/peer.jsonl"

"$py" - "$out/aquila.json" "$out/peer.jsonl" <<'PY'
import json, os, re, sys
# No report: the check stopped before writing one (its output says why).
rows = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else []
peer = {}
for line in open(sys.argv[2]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if "skipped" in r:
        print(f"\npeer skipped: {r['skipped']}")
    elif "tokens_per_s" in r:
        peer[r["what"]] = r["tokens_per_s"]
print("\n| measurement | aquila | transformers | aquila ÷ transformers |")
print("| --- | --- | --- | --- |")
for r in rows:
    if r["part"] != "aquila-7b":
        continue
    ours = re.match(r"([\d.]+) tokens/s", r["value"])
    theirs = peer.get(r["what"])
    ratio = f"{float(ours.group(1)) / theirs:.1f}×" if ours and theirs else ""
    print(f"| {r['what']} | {r['value']} | {f'{theirs:.0f} tokens/s' if theirs else ''} | {ratio} |")
if not rows:
    print("\nno report from aquila gpu-check: its output above says why")
failed = [r for r in rows if r.get("pass") is False]
print(f"\ncomparisons: {sum(r.get('pass') is True for r in rows)} passed, {len(failed)} failed")
PY
exit "$status"
