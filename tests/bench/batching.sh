#!/usr/bin/env bash
# Issue 3's throughput check, all in one run on this machine (2 threads):
# aggregate output tokens/s through the gateway (`aquila serve` + `aquila
# bench`) at 1 and 16 concurrent streams, next to llama.cpp decoding 1 and 16
# sequences together on the same weights (tests/bench/peers.py
# llamacpp-parallel). Greedy, ignore_eos, 32-token prompts. Two figures per
# engine: aggregate output tokens/s over the whole run (for aquila, the
# prefills of arriving requests included), and decode only (llama.cpp's
# timing excludes its prefill; for aquila, streams ÷ mean inter-token latency).
#   - base: `make-model --preset base --seed 1` (f32); llama.cpp on the same
#     weights as an F32 GGUF. aquila twice: with its default f32 KV cache,
#     and with `--kv-cache-dtype bf16`, a 16-bit cache like llama.cpp's
#     default (f16), which halves what attention reads.
#   - demo: the SmolLM2-135M-Instruct Q4_1 GGUF, the same file for both.
# Prints JSON lines, then a table.   GEN=128 THREADS=2 tests/bench/batching.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
GEN=${GEN:-128} THREADS=${THREADS:-2} PT=32
. tests/bench/setup.sh

out=$(mktemp -d)
aquila() { # model, label, extra serve flags...
    local port
    port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    RUST_LOG=warn $aq serve --model "$1" --threads "$THREADS" --listen "127.0.0.1:$port" --worker-listen 127.0.0.1:0 "${@:3}" &
    local pid=$!
    # Ready when a one-token request completes (the gateway answers
    # UNAVAILABLE until its worker is up).
    until $aq generate --gateway "http://127.0.0.1:$port" --max-new-tokens 1 hi >/dev/null 2>&1; do
        kill -0 $pid || { echo "serve exited" >&2; exit 1; }
        sleep 0.5
    done
    for c in 1 16; do
        RUST_LOG=warn $aq bench --gateway "http://127.0.0.1:$port" --prompt-tokens $PT \
            --output-tokens "$GEN" --vocab-range 1000:20000 --concurrency $c \
            --num-requests $((c == 1 ? 6 : 48)) --warmup-requests $((c == 1 ? 1 : 16)) \
            --json "$out/$2-$c.json" >/dev/null
        "$py" -c 'import json,sys; r=json.load(open(sys.argv[1])); r["label"]=sys.argv[2]; print(json.dumps(r))' \
            "$out/$2-$c.json" "aquila $2 x$c" | tee -a "$out/all.jsonl"
    done
    kill $pid
    wait $pid || true
}
peer() { # gguf, label
    for p in 1 16; do
        "$py" tests/bench/peers.py llamacpp-parallel --gguf "$1" --parallel $p --threads "$THREADS" \
            --prompt-tokens $PT --gen-tokens "$GEN" --repeats 2 2>/dev/null | tail -1 |
            "$py" -c 'import json,sys; r=json.loads(sys.stdin.read()); r["label"]=sys.argv[1]; print(json.dumps(r))' \
                "llama.cpp $2 x$p" | tee -a "$out/all.jsonl"
    done
}

aquila "$base" base
aquila "$base" base-bf16kv --kv-cache-dtype bf16
peer "$base/gguf/model.gguf" base
aquila "$demo" demo
peer "$demo" demo

"$py" - "$out/all.jsonl" <<'PYEOF'
import json, sys
rows = {r["label"]: r for r in map(json.loads, open(sys.argv[1]))}
def wall(label):
    """Aggregate output tokens/s over the run (aquila: prefills included)."""
    r = rows[label]
    return r["decode_tok_per_s"] if label.startswith("llama") else r["output_tokens_per_s"]
def decode(label, streams):
    """Decode-only tokens/s: llama.cpp's own figure; for aquila the streams
    divided by the mean inter-token latency (prefills excluded, as llama.cpp's)."""
    r = rows[label]
    return r["decode_tok_per_s"] if label.startswith("llama") else streams * 1000 / r["itl_ms"]["mean"]
print()
print("| model | engine | 1 stream tok/s | 16 streams tok/s | 16 ÷ 1 | decode only: 1 / 16 streams | 16 ÷ 1 |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for model, engine, key in (
    ("base", "aquila", "aquila base"),
    ("base", "aquila, bf16 KV cache", "aquila base-bf16kv"),
    ("base", "llama.cpp (f16 KV cache)", "llama.cpp base"),
    ("demo", "aquila", "aquila demo"),
    ("demo", "llama.cpp (f16 KV cache)", "llama.cpp demo"),
):
    one, many = wall(f"{key} x1"), wall(f"{key} x16")
    d1, d16 = decode(f"{key} x1", 1), decode(f"{key} x16", 16)
    print(f"| {model} | {engine} | {one:.1f} | {many:.1f} | {many / one:.1f}× | {d1:.1f} / {d16:.1f} | {d16 / d1:.1f}× |")
PYEOF
