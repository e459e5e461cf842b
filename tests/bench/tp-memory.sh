#!/usr/bin/env bash
# Issue 4's memory check: peak RSS (VmHWM) of every rank process of
# `aquila worker --tp N` for N = 1, 2, 4 on the `base` preset (f32
# safetensors, memory-mapped), once the group is loaded and serving, with a
# small KV pool (64 MiB per rank) so the weights dominate.
#   tests/bench/tp-memory.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked --bins
aq="${CARGO_TARGET_DIR:-target}/release/aquila"
base="${AQUILA_CACHE_DIR:-$HOME/.cache/aquila}/bench/base"
[ -f "$base/model.safetensors" ] || $aq make-model --preset base --seed 1 --out "$base"
echo "weights: $(du -b "$base/model.safetensors" | cut -f1) bytes"
for n in 1 2 4; do
    out=$(mktemp)
    RUST_LOG=warn $aq worker --model "$base" --listen 127.0.0.1:0 --tp $n --threads 1 \
        --kv-cache-mib 64 >"$out" &
    launcher=$!
    until grep -q 'listening on' "$out"; do
        kill -0 $launcher || { echo "worker exited" >&2; exit 1; }
        sleep 0.2
    done
    # Every rank has loaded once rank 0 listens (it waits for all at start).
    pids=$(cat /proc/$launcher/task/*/children 2>/dev/null || true)
    [ "$n" = 1 ] && pids=$launcher
    for p in $pids; do
        rank=$(tr '\0' ' ' </proc/$p/cmdline | grep -o -- '--rank [0-9]*' | cut -d' ' -f2 || true)
        hwm=$(grep VmHWM /proc/$p/status | awk '{print $2}')
        echo "{\"tp\": $n, \"rank\": \"${rank:-0}\", \"peak_rss_mib\": $((hwm / 1024))}"
    done
    kill $launcher
    wait $launcher || true
    rm -f "$out"
done
