#!/usr/bin/env bash
# Aquila-7B at full size (issue 18; figures in BENCHMARKS.md): a random-weight
# folder in the official release's layout (two fp16 .bin shards + index, the
# AquilaModel config), written once by `make-model --preset 7b` (14.6 GB, with
# the real tokenizer when AQUILA_TOKENIZER_DIR is set); then with default
# flags: time to listening, the load summary, each process's peak RSS and a
# greedy answer through a gateway; `--dtype f32` refused (time, exit code);
# and `--tp 2` on this host, whose greedy text must equal TP 1's.
#   tests/bench/aquila7b.sh [MODEL_DIR]    (default ~/.cache/aquila/aquila-7b-random)
set -u
cd "$(dirname "$0")/../.."
cargo build --release --locked --quiet --bin aquila
BIN=${CARGO_TARGET_DIR:-target}/release/aquila
M=${1:-$HOME/.cache/aquila/aquila-7b-random}
if [ ! -f "$M/pytorch_model.bin.index.json" ]; then
  tok=(); [ -n "${AQUILA_TOKENIZER_DIR:-}" ] && tok=(--tokenizer "$AQUILA_TOKENIZER_DIR")
  $BIN make-model --preset 7b --format bin-sharded "${tok[@]}" --out "$M"
fi
out=$(mktemp -d)
echo "== f32 refusal"
/usr/bin/time -f "elapsed %e s, maxrss %M KB, exit %x" $BIN worker --model $M --listen 127.0.0.1:0 --dtype f32 2>&1 | grep -v "^\s*[0-9]*: \|^\s*at " | tail -3 | cut -c1-700
for tp in 1 2; do
  echo "== tp $tp (default flags)"
  log=$out/tp$tp.log
  extra=""; [ $tp = 2 ] && extra="--tp 2"
  start=$(date +%s.%N)
  RUST_LOG=info $BIN worker --model $M --listen 127.0.0.1:0 $extra > $log 2>&1 &
  pid=$!
  until grep -q "aquila worker listening on" $log || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
  end=$(date +%s.%N)
  addr=$(grep -o "aquila worker listening on [0-9.:]*" $log | awk '{print $5}')
  echo "ready after $(echo "$end - $start" | bc) s at $addr"
  grep -E "loaded|weights in|KV cache" $log | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-250
  # Peak RSS of each aquila process (VmHWM), while serving.
  for p in $(pgrep -f "aquila worker --model $M"); do echo "pid $p VmHWM $(grep VmHWM /proc/$p/status | awk '{print $2/1048576 " GiB"}')"; done
  gw=$out/gw$tp.log
  $BIN gateway --listen 127.0.0.1:0 --worker $addr > $gw 2>&1 &
  gpid=$!
  until grep -q "aquila gateway listening on" $gw; do sleep 0.2; done
  g=$(grep -o "aquila gateway listening on [0-9.:]*" $gw | awk '{print $5}')
  # (until the gateway has seen the worker healthy)
  for _ in $(seq 50); do
    /usr/bin/time -f "generate took %e s" $BIN generate --gateway http://$g --max-new-tokens 16 --temperature 0 "The capital of France is" > $out/gen$tp.txt 2>$out/gen$tp.err && break
    sleep 0.2
  done
  cat $out/gen$tp.err | tail -2; echo "text: $(cat $out/gen$tp.txt | head -c 300)"
  kill $gpid; kill -INT $pid; wait $pid 2>/dev/null
  for p in $(pgrep -f "aquila worker --model $M"); do kill $p; done
  sleep 2
done
cmp $out/gen1.txt $out/gen2.txt && echo "TP1 and TP2 greedy text identical"
