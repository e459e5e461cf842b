#!/usr/bin/env bash
# Aquila-7B-shaped GGUFs (Q4_0, Q4_K_M; made by make-model --preset 7b if
# missing) beside llama.cpp on the same files, one run, 2 threads:
# `aquila bench-model` (512-token prefill, batch-1 decode, 8 sequences
# decoding together: the engine alone, no gateway) against peers.py's
# llamacpp (prefill + batch 1) and llamacpp-parallel --parallel 8.
#   tests/bench/aquila7b-peers.sh [DIR]   (DIR holds q4_0/ and q4_k_m/; default ~/.cache/aquila/aquila-7b-gguf)
#   GEN=32 PT=512 THREADS=2 to change; needs tests/bench/setup-peers.sh first.
set -euo pipefail
cd "$(dirname "$0")/../.."
GEN=${GEN:-32} PT=${PT:-512} THREADS=${THREADS:-2}
dir=${1:-$HOME/.cache/aquila/aquila-7b-gguf}
py=${AQUILA_PEERS_VENV:-$HOME/.cache/aquila/peers-venv}/bin/python
cargo build --release --locked --quiet --bin aquila
aq=${CARGO_TARGET_DIR:-target}/release/aquila
for t in q4_0 q4_k_m; do
  f=$dir/$t/model.gguf
  [ -f "$f" ] || $aq make-model --preset 7b --format gguf --gguf-type $t --out "$dir/$t"
  echo "== $t"
  RUST_LOG=warn $aq bench-model --model "$f" --threads "$THREADS" --prompt-tokens "$PT" \
    --gen-tokens "$GEN" --batch 8
  "$py" tests/bench/peers.py llamacpp --gguf "$f" --threads "$THREADS" --prompt-tokens "$PT" \
    --gen-tokens "$GEN" --repeats 1 2>/dev/null | tail -1
  "$py" tests/bench/peers.py llamacpp-parallel --gguf "$f" --parallel 8 --threads "$THREADS" \
    --prompt-tokens 40 --gen-tokens "$GEN" --repeats 1 2>/dev/null | tail -1
done
