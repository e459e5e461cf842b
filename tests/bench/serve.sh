# Sourced by the bench scripts that start servers: start() and ready().
# Needs $aq (the aquila binary) and a $pids array; the caller's EXIT trap
# kills what $pids holds. LOGS=DIR keeps each server's log there (default:
# a temporary directory).
serve_logs=${LOGS:-$(mktemp -d)}

# Starts `aquila ARGS` in the background (its pid in $pid, appended to
# $pids) and sets $addr to the address it reports for LABEL ("worker",
# "gateway"). Not in a subshell: $pids must grow.
start() { # label, args...
    local label=$1 log
    shift
    log=$(mktemp -p "$serve_logs")
    RUST_LOG=warn $aq "$@" >"$log" 2>&1 &
    pid=$!
    pids+=("$pid")
    until grep -q "aquila $label listening on" "$log"; do
        kill -0 "$pid" 2>/dev/null || { echo "aquila $* exited:" >&2; cat "$log" >&2; exit 1; }
        sleep 0.2
    done
    addr=$(grep "aquila $label listening on" "$log" | awk '{print $NF}')
}

# Waits until a one-token request through the gateway at URL succeeds (the
# gateway has seen a worker healthy).
ready() { # url
    until $aq generate --gateway "$1" --max-new-tokens 1 hi >/dev/null 2>&1; do sleep 0.5; done
}
