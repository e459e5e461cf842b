# Sourced by the bench scripts: the peers' venv ($py), the aquila binary
# ($aq), the demo GGUF ($demo) and the `base` preset as safetensors and as an
# F32 GGUF ($base, $base/gguf/model.gguf), each made once and cached.
venv="${AQUILA_PEERS_VENV:-$HOME/.cache/aquila/peers-venv}"
[ -x "$venv/bin/python" ] || tests/bench/setup-peers.sh
py="$venv/bin/python"

cargo build --release --locked --bins
aq="${CARGO_TARGET_DIR:-target}/release/aquila"
demo=$($aq fetch-demo)
base="${AQUILA_CACHE_DIR:-$HOME/.cache/aquila}/bench/base"
[ -f "$base/model.safetensors" ] || $aq make-model --preset base --seed 1 --out "$base"
[ -f "$base/gguf/model.gguf" ] || $aq make-model --preset base --seed 1 --format gguf --gguf-type f32 --out "$base/gguf"
