#!/usr/bin/env bash
# Issue 6's gateway benchmarks, on the demo GGUF (one worker, 2 threads):
#   1. Overhead: the same load (16 streams, 32-token prompts, 64 output
#      tokens) sent straight to the worker (`aquila bench --api worker`) and
#      through a gateway, alternated ROUNDS times; output tokens/s of each
#      and their ratio. Gateway, worker and load generator share this
#      machine's cores, so the gateway's CPU time is paid by the worker too.
#   2. 1,000 concurrent streams through the gateway, twice: every request
#      completes or gets RESOURCE_EXHAUSTED (the worker's queue holds 256),
#      and the gateway's peak RSS after each round.
# Prints JSON lines, then a summary.      ROUNDS=4 tests/bench/gateway.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-4}
cargo build --release --locked --bins
aq="${CARGO_TARGET_DIR:-target}/release/aquila"
demo=$($aq fetch-demo)
out=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

source tests/bench/serve.sh

start worker worker --model "$demo" --threads 2 --listen 127.0.0.1:0
worker=$addr
start gateway gateway --listen 127.0.0.1:0 --worker "$worker"
gateway=$addr gateway_pid=$pid
ready "http://$gateway"

load() { # label, target, api, concurrency, requests, output tokens
    RUST_LOG=warn $aq bench --gateway "http://$2" --api "$3" --concurrency "$4" \
        --num-requests "$5" --warmup-requests 8 --prompt-tokens 32 --output-tokens "$6" \
        --vocab-range 1000:20000 --json "$out/$1.json" >/dev/null || true
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["label"]=sys.argv[2]; print(json.dumps(r))' \
        "$out/$1.json" "$1" | tee -a "$out/all.jsonl"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$gateway_pid/stat"; }
# Alternate which goes first: the machine drifts from run to run. The
# gateway's own CPU time over its runs is the steadier figure of its cost.
ticks_before=$(cpu_ticks)
for round in $(seq "$ROUNDS"); do
    if ((round % 2)); then
        load "direct-$round" "$worker" worker 16 48 64
        load "gateway-$round" "$gateway" generate 16 48 64
    else
        load "gateway-$round" "$gateway" generate 16 48 64
        load "direct-$round" "$worker" worker 16 48 64
    fi
done

ticks=$(($(cpu_ticks) - ticks_before))
echo "{\"label\": \"gateway cpu\", \"seconds\": $(python3 -c "print($ticks / $(getconf CLK_TCK))")}" | tee -a "$out/all.jsonl"
peak_kib() { awk '/VmHWM/ {print $2}' "/proc/$gateway_pid/status"; }
echo "{\"label\": \"gateway rss before\", \"vmhwm_kib\": $(peak_kib)}" | tee -a "$out/all.jsonl"
for round in 1 2; do
    load "streams1000-$round" "$gateway" generate 1000 1000 32
    echo "{\"label\": \"gateway rss after 1000 streams, round $round\", \"vmhwm_kib\": $(peak_kib)}" | tee -a "$out/all.jsonl"
done

python3 - "$out/all.jsonl" "$ROUNDS" <<'PYEOF'
import json, sys
rows = {r["label"]: r for r in map(json.loads, open(sys.argv[1]))}
rounds = int(sys.argv[2])
print()
print("| round | direct to worker tok/s | through the gateway tok/s | gateway ÷ direct |")
print("| ---: | ---: | ---: | ---: |")
ratios = []
for i in range(1, rounds + 1):
    d, g = rows[f"direct-{i}"]["output_tokens_per_s"], rows[f"gateway-{i}"]["output_tokens_per_s"]
    ratios.append(g / d)
    print(f"| {i} | {d:.1f} | {g:.1f} | {g / d:.3f} |")
ratios.sort()
print(f"\nratios from {ratios[0]:.3f} to {ratios[-1]:.3f}, median {(ratios[(len(ratios) - 1) // 2] + ratios[len(ratios) // 2]) / 2:.3f}")
for i in (1, 2):
    r = rows[f"streams1000-{i}"]
    print(f"1000 streams, round {i}: {r['succeeded']} completed, failures {r.get('failures', {})}, "
          f"{r.get('unfinished', 0)} unfinished; gateway peak RSS "
          f"{rows[f'gateway rss after 1000 streams, round {i}']['vmhwm_kib'] / 1024:.1f} MiB")
print(f"gateway peak RSS before: {rows['gateway rss before']['vmhwm_kib'] / 1024:.1f} MiB")
tokens = sum(rows[f"gateway-{i}"]["total_output_tokens"] + 8 * 64 for i in range(1, rounds + 1))
cpu = rows["gateway cpu"]["seconds"]
print(f"gateway CPU: {cpu:.2f} s for {tokens} streamed tokens (warm-ups included), "
      f"{cpu / tokens * 1e6:.0f} µs per token")
PYEOF
