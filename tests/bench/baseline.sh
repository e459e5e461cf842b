#!/usr/bin/env bash
# Single-stream baseline, all engines in one run on this machine (2 threads):
# aquila vs llama.cpp vs Hugging Face transformers, on
#   - the demo GGUF (SmolLM2-135M-Instruct Q4_1): aquila and llama.cpp on the
#     same file, transformers on it dequantized to f32;
#   - the `base` preset (~106M parameters, f32): aquila and transformers on the
#     same safetensors folder, llama.cpp on the same weights as an F32 GGUF.
# Each measurement is the median of 3 runs; prints JSON lines, then a table.
#   tests/bench/baseline.sh            (GEN=128 PT=40 THREADS=2 to change)
set -euo pipefail
cd "$(dirname "$0")/../.."
GEN=${GEN:-128} PT=${PT:-40} THREADS=${THREADS:-2}
. tests/bench/setup.sh

out=$(mktemp)
aquila() { # model, label: median of 3 runs of `aquila bench-model`
  for _ in 1 2 3; do
    RUST_LOG=warn $aq bench-model --model "$1" --threads "$THREADS" --prompt-tokens "$PT" --gen-tokens "$GEN"
  done | "$py" -c '
import json, statistics, sys
runs = [json.loads(l) for l in sys.stdin]
r = runs[0]
for k in ("prompt_tok_per_s", "decode_tok_per_s"):
    r[k] = statistics.median(x[k] for x in runs)
    r[k.replace("_per_s", "_runs")] = [x[k] for x in runs]
r["model"] = sys.argv[1]
print(json.dumps(r))' "$2" | tee -a "$out"
}
peer() { "$py" tests/bench/peers.py "$@" --threads "$THREADS" --gen-tokens "$GEN" 2>/dev/null | tail -1 | tee -a "$out"; }

aquila "$demo" demo
peer llamacpp --gguf "$demo" --prompt-tokens "$PT"
peer transformers --model "$demo"
aquila "$base" base
peer llamacpp --gguf "$base/gguf/model.gguf" --prompt-tokens "$PT"
peer transformers --model "$base"

"$py" - "$out" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def key(r):
    m = r["model"]
    return "demo" if ("SmolLM" in m or m == "demo") else "base"
print()
print("| model | engine | prompt tok/s | decode tok/s | aquila ÷ engine (decode) |")
print("| --- | --- | ---: | ---: | ---: |")
for group in ("demo", "base"):
    rs = [r for r in rows if key(r) == group]
    ours = next(r for r in rs if r["engine"] == "aquila")
    for r in rs:
        ratio = ours["decode_tok_per_s"] / r["decode_tok_per_s"]
        print(f"| {group} | {r['engine']} | {r['prompt_tok_per_s']:.1f} | {r['decode_tok_per_s']:.1f} | {ratio:.2f} |")
PYEOF
