#!/usr/bin/env bash
# Aquila-7B-shaped models beside their peers on the same files, one run,
# 2 threads:
#  - GGUF Q4_0 and Q4_K_M (made by make-model --preset 7b if missing):
#    `aquila bench-model` (512-token prefill, batch-1 decode, 8 sequences
#    decoding together: the engine alone) against peers.py's llamacpp
#    (prefill + batch 1) and llamacpp-parallel --parallel 8 (40-token
#    prompts; bench-model again with those), then 8
#    concurrent streams through a gateway (a worker serving the file, a
#    gateway in front, `aquila bench --concurrency 8`, 40-token prompts).
#  - with BF16=DIR (a bf16 folder: make-model --preset 7b --dtype bf16):
#    bench-model on it against peers.py transformers --dtype bf16, one after
#    the other (both hold 15 GB; 24 GiB holds one).
#   tests/bench/aquila7b-peers.sh [DIR]   (DIR holds q4_0/ and q4_k_m/; default ~/.cache/aquila/aquila-7b-gguf)
#   GEN=32 PT=512 THREADS=2 TYPES="q4_0 q4_k_m" BF16=DIR to change; X8_ONLY=1 runs only
#   the 8-sequence pair (llamacpp-parallel, then the gateway), to repeat it.
#   Needs tests/bench/setup-peers.sh first.
set -euo pipefail
cd "$(dirname "$0")/../.."
GEN=${GEN:-32} PT=${PT:-512} THREADS=${THREADS:-2} TYPES=${TYPES:-q4_0 q4_k_m}
dir=${1:-$HOME/.cache/aquila/aquila-7b-gguf}
py=${AQUILA_PEERS_VENV:-$HOME/.cache/aquila/peers-venv}/bin/python
cargo build --release --locked --quiet --bin aquila
aq=${CARGO_TARGET_DIR:-target}/release/aquila
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

source tests/bench/serve.sh

# 8 streams through a gateway in front of a worker serving file $1. The
# decode rate is 8 streams ÷ their mean inter-token gap, the figure
# llamacpp-parallel reports (its decode steps alone); output_tok_per_s also
# counts the prefill and the first token's wait.
gateway8() {
    start worker worker --model "$1" --threads "$THREADS" --listen 127.0.0.1:0
    start gateway gateway --listen 127.0.0.1:0 --worker "$addr"
    local url="http://$addr"
    ready "$url"
    RUST_LOG=warn $aq bench --gateway "$url" --api generate --concurrency 8 --num-requests 8 \
        --warmup-requests 1 --prompt-tokens 40 --output-tokens "$GEN" --vocab-range 1000:20000 \
        --json "$tmp/gw.json" >/dev/null
    python3 - "$tmp/gw.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
itl = r["itl_ms"]
print(json.dumps({"engine": "aquila gateway x8", "succeeded": r["succeeded"],
                  "decode_tok_per_s": round(8 * 1000 / itl["mean"], 2),
                  "output_tok_per_s": round(r["output_tokens_per_s"], 2),
                  "itl_ms_mean": round(itl["mean"], 1), "itl_ms_p50": round(itl["p50"], 1),
                  "ttft_ms_mean": round(r["ttft_ms"]["mean"], 1)}))
PY
    kill "${pids[@]}"
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
}

for t in $TYPES; do
    f=$dir/$t/model.gguf
    [ -f "$f" ] || $aq make-model --preset 7b --format gguf --gguf-type "$t" --out "$dir/$t"
    echo "== $t"
    if [ -z "${X8_ONLY:-}" ]; then
        RUST_LOG=warn $aq bench-model --model "$f" --threads "$THREADS" --prompt-tokens "$PT" \
            --gen-tokens "$GEN" --batch 8
        "$py" tests/bench/peers.py llamacpp --gguf "$f" --threads "$THREADS" --prompt-tokens "$PT" \
            --gen-tokens "$GEN" --repeats 1 2>/dev/null | tail -1
    fi
    "$py" tests/bench/peers.py llamacpp-parallel --gguf "$f" --parallel 8 --threads "$THREADS" \
        --prompt-tokens 40 --gen-tokens "$GEN" --repeats 1 2>/dev/null | tail -1
    # The engine alone with llamacpp-parallel's 40-token prompts (the run
    # above decodes its 8 sequences after 512-token prompts: 8 × 512 tokens
    # of f32 KV cache, 4 GB, read every step).
    [ -n "${X8_ONLY:-}" ] || RUST_LOG=warn $aq bench-model --model "$f" --threads "$THREADS" \
        --prompt-tokens 40 --gen-tokens "$GEN" --batch 8
    gateway8 "$f"
done

if [ -n "${BF16:-}" ]; then
    echo "== bf16 folder $BF16"
    RUST_LOG=warn $aq bench-model --model "$BF16" --threads "$THREADS" --prompt-tokens "$PT" \
        --gen-tokens "$GEN" --batch 8
    "$py" tests/bench/peers.py transformers --model "$BF16" --dtype bf16 --threads "$THREADS" \
        --prompt-tokens "$PT" --gen-tokens "$GEN" --repeats 1 2>/dev/null | tail -1
fi
