#!/usr/bin/env bash
# The main job end to end: build, then an unmodified sockperf server and client talk over SDP
# (shm transport) under libsdp, `sdp stat` is shown while they run to prove it, and the same
# pair runs again on plain kernel TCP for a side-by-side latency comparison.
#
#   bash scripts/demo.sh            # DEMO_SECS=5 by default: the client's -t
#
# Exits nonzero if `sdp stat` did not show both ends of the connection on shm, or if a run
# fails. Everything it starts is killed on the way out (trap).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${DEMO_SECS:-5}

say() { printf '\n== %s\n' "$*"; }

say "build (cargo build --release --workspace)"
cargo build --release --workspace
SDP=$PWD/target/release/sdp

if ! command -v sockperf >/dev/null 2>&1; then
  say "installing sockperf (apt-get)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq sockperf ||
    { $SUDO apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq sockperf; }
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# TCP sockets on a local port, from /proc/net/tcp*: state 0A is LISTEN, "" any state.
on_port() { # port state
  local hex
  hex=$(printf ':%04X ' "$1")
  awk -v h="$hex" -v st="$2" 'FNR>1 && (st=="" || $4==st) && index($2" ", h) {f=1} END {exit !f}' \
    /proc/net/tcp /proc/net/tcp6
}
listening() { on_port "$1" 0A; }
# A random loopback port below the ephemeral range that no socket uses (not even in
# TIME_WAIT: sockperf binds without SO_REUSEADDR).
random_port() {
  local p
  while :; do
    p=$((10000 + RANDOM % 22000))
    on_port "$p" "" || { echo "$p"; return; }
  done
}
wait_listening() { # port pid
  local i
  for i in $(seq 500); do
    listening "$1" && return 0
    kill -0 "$2" 2>/dev/null || { echo "server exited before listening on $1" >&2; return 1; }
    sleep 0.01
  done
  echo "server did not listen on $1 in 5 s" >&2
  return 1
}

# avg and p50 (microseconds) from a sockperf ping-pong log.
avg_of() { grep -o 'avg-latency=[0-9.]*' "$1" | head -1 | cut -d= -f2; }
p50_of() { awk '/percentile 50.000 =/ {print $NF; exit}' "$1"; }

# ---- with libsdp ----
port=$(random_port)
say "with libsdp: sdp run -- sockperf sr --tcp -i 127.0.0.1 -p $port"
"$SDP" run -- sockperf sr --tcp -i 127.0.0.1 -p "$port" >"$tmp/srv-sdp.log" 2>&1 &
srv=$!; pids+=("$srv")
wait_listening "$port" "$srv"

say "with libsdp: sdp run -- sockperf pp --tcp -i 127.0.0.1 -p $port -m 64 -t $SECS"
"$SDP" run -- sockperf pp --tcp -i 127.0.0.1 -p "$port" -m 64 -t "$SECS" >"$tmp/cli-sdp.log" 2>&1 &
cli=$!; pids+=("$cli")

# sockperf's client sleeps about two seconds after connecting before it measures; look at
# the statistics while the ping-pong runs.
sleep 3
say "sdp stat while the client runs"
"$SDP" stat | { IFS= read -r head; echo "$head"; grep -E "[.:]$port( |$)" || true; }
"$SDP" stat --json >"$tmp/stat.json"
rows=$(grep -E "\"(local|remote)\":\"127\.0\.0\.1:$port\"" "$tmp/stat.json" | grep -v '"remote":"-"' || true)
shm_client=$(echo "$rows" | grep '"role":"client"' | grep -c '"transport":"shm"' || true)
shm_server=$(echo "$rows" | grep '"role":"server"' | grep -c '"transport":"shm"' || true)

wait "$cli" || { echo "sockperf client (libsdp) failed:" >&2; tail -5 "$tmp/cli-sdp.log" >&2; exit 1; }
kill "$srv" 2>/dev/null || true

if [ "$shm_client" -lt 1 ] || [ "$shm_server" -lt 1 ]; then
  echo "FAIL: sdp stat did not show the connection on shm (client rows on shm: $shm_client, server rows on shm: $shm_server):" >&2
  echo "${rows:-(no connected socket on port $port)}" >&2
  exit 1
fi
echo "ok: both ends of 127.0.0.1:$port are on shm (SDP)"

# ---- without libsdp ----
port=$(random_port)
say "kernel TCP: sockperf sr --tcp -i 127.0.0.1 -p $port; sockperf pp ... -t $SECS"
sockperf sr --tcp -i 127.0.0.1 -p "$port" >"$tmp/srv-tcp.log" 2>&1 &
srv=$!; pids+=("$srv")
wait_listening "$port" "$srv"
sockperf pp --tcp -i 127.0.0.1 -p "$port" -m 64 -t "$SECS" >"$tmp/cli-tcp.log" 2>&1 ||
  { echo "sockperf client (kernel TCP) failed:" >&2; tail -5 "$tmp/cli-tcp.log" >&2; exit 1; }
kill "$srv" 2>/dev/null || true

sa=$(avg_of "$tmp/cli-sdp.log"); sp=$(p50_of "$tmp/cli-sdp.log")
ta=$(avg_of "$tmp/cli-tcp.log"); tp=$(p50_of "$tmp/cli-tcp.log")
if [ -z "$sa" ] || [ -z "$sp" ] || [ -z "$ta" ] || [ -z "$tp" ]; then
  echo "FAIL: no latency figures in sockperf's output" >&2
  exit 1
fi
say "sockperf ping-pong, 64-byte messages, one-way latency in microseconds"
awk -v sa="$sa" -v sp="$sp" -v ta="$ta" -v tp="$tp" 'BEGIN {
  printf "%-8s %14s %14s %20s\n", "", "libsdp (SDP)", "kernel TCP", "ratio libsdp/tcp"
  printf "%-8s %14.3f %14.3f %20.3f\n", "avg", sa, ta, sa / ta
  printf "%-8s %14.3f %14.3f %20.3f\n", "p50", sp, tp, sp / tp
}'
