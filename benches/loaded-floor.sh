#!/bin/bash
# What sets the p99 of `loaded_p99_64` (`sdp bench --only loaded`) on this machine: the same
# 64-byte ping-pong (server pinned to CPU 0, client to CPU 1; first both preloaded, then both
# on kernel TCP) measured next to four loaders, each an unpinned `sdp bench` child like the bench's own:
#   none      no loader (the unloaded figure);
#   null      a loader with no connections at all: it only wakes every millisecond;
#   tcp       the bench's loader (IDLE idle and BUSY busy connections, 64 bytes on each busy
#             one every millisecond) without the preload: its connections are kernel TCP;
#   sdp       the same loader preloaded, as in the bench.
# If `null` and `tcp` already put the SDP ping's p99 far above twice `none`, the loaded p99 is
# the CPU the loader takes from the ping's CPUs, not the way SDP serves the load.
#
# Usage: benches/loaded-floor.sh [REPS]   (from the project root, after
#        `cargo build --release --workspace`); IDLE and BUSY in the environment override the
#        load (default 1000 and 16). Prints one line per ping-pong and loader: the median p50
#        and p99 (us) over REPS runs of 10,000 round trips each, and p99 as a factor of the
#        same ping-pong's `none`.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-5}
IDLE=${IDLE:-1000}
BUSY=${BUSY:-16}
SO=$PWD/target/release/libsdp.so
SDP=$PWD/target/release/sdp
[ -x "$SDP" ] && [ -f "$SO" ] || {
    echo "loaded-floor: build first: cargo build --release --workspace" >&2
    exit 1
}
# Below the ephemeral range: the loader's own connections must not take the port.
PORT=$((20000 + RANDOM % 5000))  # +1 for each server
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The measured pair's preload ($PING_SO: libsdp, or empty for kernel TCP).
start_server() {
    PORT=$((PORT + 1))
    LD_PRELOAD=$PING_SO __SDP_BENCH_LOADED=server:$PORT taskset -c 0 "$SDP" bench >/dev/null 2>&1 &
    SERVER=$!
    PIDS+=("$SERVER")
    for _ in $(seq 100); do
        ss -ltn | grep -q ":$PORT " && return 0
        sleep 0.1
    done
    echo "loaded-floor: the echo server did not listen on $PORT" >&2
    exit 1
}

# One ping-pong run: prints "p50 p99".
ping() {
    LD_PRELOAD=$PING_SO __SDP_BENCH_LOADED=pingpong:$PORT:10000 taskset -c 1 "$SDP" bench |
        awk -F= '/^p50_us=/{a=$2} /^p99_us=/{b=$2} END{print a, b}'
}

# Starts a loader ($1: with or without the preload, $2: idle, $3: busy) and waits until its
# connections are open.
start_loader() {
    local preload=$1 idle=$2 busy=$3 out=$WORK/loader.out
    : >"$out"
    if [ "$preload" = yes ]; then
        LD_PRELOAD=$SO __SDP_BENCH_LOADED=loader:$PORT:$idle:$busy:1000 "$SDP" bench >"$out" 2>&1 &
    else
        __SDP_BENCH_LOADED=loader:$PORT:$idle:$busy:1000 "$SDP" bench >"$out" 2>&1 &
    fi
    LOADER=$!
    PIDS+=("$LOADER")
    for _ in $(seq 600); do
        grep -q '^ready' "$out" && return 0
        grep -q '^error' "$out" && break
        sleep 0.1
    done
    echo "loaded-floor: the loader did not get ready: $(cat "$out")" >&2
    exit 1
}

median() { sort -g | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }

measure() {
    local name=$1 f=$WORK/$1
    : >"$f"
    for _ in $(seq "$REPS"); do ping >>"$f"; done
    local p50 p99
    p50=$(awk '{print $1}' "$f" | median)
    p99=$(awk '{print $2}' "$f" | median)
    echo "$name $p50 $p99"
}

report() {
    read -r name p50 p99 <<<"$1"
    printf '%-4s ping, %-5s loader: p50 %7.1f us  p99 %7.1f us  p99 %5.2fx unloaded\n' \
        "$2" "$name" "$p50" "$p99" "$(awk -v a="$p99" -v b="$base99" 'BEGIN{print a/b}')"
}
for ping_mode in sdp tcp; do
    if [ $ping_mode = sdp ]; then PING_SO=$SO; else PING_SO=; fi
    start_server
    base=$(measure none)
    read -r _ _ base99 <<<"$base"
    report "$base" $ping_mode
    for loader in null tcp sdp; do
        case $loader in
            null) start_loader no 0 0 ;;
            tcp) start_loader no "$IDLE" "$BUSY" ;;
            sdp) start_loader yes "$IDLE" "$BUSY" ;;
        esac
        report "$(measure $loader)" $ping_mode
        kill "$LOADER" 2>/dev/null || true
        wait "$LOADER" 2>/dev/null || true
    done
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
done
