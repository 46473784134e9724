#!/usr/bin/env bash
# Sanitizers and model checks (docs/SANITIZERS.md), run by .ci/run after the tests:
#   1. Miri on the unsafe modules that run on plain memory (fd table, shm mapping and layout)
#      and on sdp-proto's wire parsing;
#   2. loom on the real fd table and on a model of the shm ring protocol and its bells;
#   3. AddressSanitizer: the shm provider's and ops' tests instrumented (leaks included), and
#      an instrumented libsdp.so preloaded (after the ASan runtime) into a subset of the
#      real-process tests, which assert from `sdp stat` that SDP carried the bytes; any ASan
#      report fails the run.
# Installs what it needs (a nightly toolchain with miri and rust-src, through rustup). When
# that cannot be fetched it fails loudly; LIBSDP_SKIP_SANITIZERS=1 skips everything instead.
# Expects the release build of scripts/test.sh (it builds it when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${LIBSDP_SKIP_SANITIZERS:-0}" = 1 ]; then
  echo "sanitizers: SKIPPED (LIBSDP_SKIP_SANITIZERS=1)"
  exit 0
fi

NIGHTLY="${LIBSDP_NIGHTLY:-nightly}"
ROOT="$PWD"
T0=$(date +%s)
TIMES=$(mktemp)
step() {
  times >"$TIMES"
  echo
  echo "=== sanitizers: $* ($(($(date +%s) - T0)) s in; CPU of the steps so far, user sys: $(tail -1 "$TIMES"))"
}
die() {
  echo "sanitizers: FAILED: $*" >&2
  echo "sanitizers: (LIBSDP_SKIP_SANITIZERS=1 skips this step on a machine that cannot run it)" >&2
  exit 1
}

# --- toolchain -------------------------------------------------------------------------------
step "toolchain $NIGHTLY with miri and rust-src"
command -v rustup >/dev/null || die "rustup is not installed: the nightly toolchain comes from it"
if ! rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1; then
  rustup toolchain install "$NIGHTLY" --profile minimal --component miri,rust-src \
    --allow-downgrade || die "cannot install the $NIGHTLY toolchain (rustup error above)"
fi
if ! rustup run "$NIGHTLY" cargo miri --version >/dev/null 2>&1 \
  || ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^rust-src'; then
  rustup component add --toolchain "$NIGHTLY" miri rust-src \
    || die "cannot add miri and rust-src to $NIGHTLY (rustup error above)"
fi
rustup run "$NIGHTLY" rustc --version
rustup run "$NIGHTLY" cargo miri --version
ASAN_RT=$(gcc -print-file-name=libasan.so)
[ -e "$ASAN_RT" ] || die "gcc's AddressSanitizer runtime is missing ($ASAN_RT): apt-get install gcc"

# --- 1. Miri ---------------------------------------------------------------------------------
step "miri"
cargo +"$NIGHTLY" miri setup
# The fd table (with a threaded race test, several schedules), the shm mapping's accessors on an
# anonymous mapping and the layout: the unsafe code that runs on plain memory.
MIRIFLAGS="-Zmiri-many-seeds=0..4" cargo +"$NIGHTLY" miri test -p ops --lib fdtable::
cargo +"$NIGHTLY" miri test -p ib-verbs --lib -- shm::mem:: shm::layout::
# sdp-proto (no unsafe of its own): the wire codecs and the engine's unit tests, the
# byte-exact wire vectors and the scripted state-machine cases.
cargo +"$NIGHTLY" miri test -p sdp-proto --lib
cargo +"$NIGHTLY" miri test -p sdp-proto --test wire_vectors --test state_scripted

# --- 2. loom ---------------------------------------------------------------------------------
step "loom"
RUSTFLAGS="--cfg loom" cargo test --release --manifest-path crates/models/Cargo.toml \
  --target-dir target/loom

# --- 3. AddressSanitizer on real programs ----------------------------------------------------
step "asan: instrumented libsdp.so and shm provider tests"
cargo build --release --workspace
RUSTFLAGS="-Zsanitizer=address -Cforce-frame-pointers=yes" cargo +"$NIGHTLY" build --release \
  -p libsdp --target x86_64-unknown-linux-gnu --target-dir target/asan
# The shm provider's own tests (real memfd mappings, bells, RDMA READ emulation, peers in
# other processes) and the ops unit tests, instrumented whole, with leak detection.
RUSTFLAGS="-Zsanitizer=address -Cforce-frame-pointers=yes" ASAN_OPTIONS=detect_leaks=1 \
  cargo +"$NIGHTLY" test --release -p ib-verbs -p ops --lib --tests \
  --target x86_64-unknown-linux-gnu --target-dir target/asan
ASAN_LIB="$ROOT/target/asan/lib"
mkdir -p "$ASAN_LIB"
cp target/asan/x86_64-unknown-linux-gnu/release/libsdp.so "$ASAN_LIB/libsdp.so"
# The tests find the `sdp` tool next to the library (src/lib.rs sdp_tool).
ln -sf "$ROOT/target/release/sdp" "$ASAN_LIB/sdp"
[ "$(nm -D "$ASAN_LIB/libsdp.so" | grep -c __asan_report_load8)" -gt 0 ] \
  || die "libsdp.so is not instrumented by AddressSanitizer"

ASAN_LOGS=$(mktemp -d /tmp/libsdp-asan.XXXXXX)
export ASAN_OPTIONS="detect_leaks=0:log_path=$ASAN_LOGS/asan"
# The preload really loads both (the runtime first, as it requires).
maps=$(LD_PRELOAD="$ASAN_RT $ASAN_LIB/libsdp.so" cat /proc/self/maps)
grep -q libasan <<<"$maps" && grep -q "$ASAN_LIB/libsdp.so" <<<"$maps" \
  || die "the ASan runtime and libsdp.so are not both mapped under the preload"

step "asan: canary (an instrumented Rust library's heap overflow must be reported)"
CANARY=$(mktemp -d /tmp/libsdp-asan-canary.XXXXXX)
cat >"$CANARY/canary.rs" <<'EOF'
// Reads one byte past a heap buffer when loaded with SDP_ASAN_CANARY set.
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = canary;
extern "C" fn canary() {
    if std::env::var_os("SDP_ASAN_CANARY").is_some() {
        let v = vec![1u8; 8];
        let x = unsafe { std::ptr::read_volatile(v.as_ptr().add(8)) };
        std::process::exit(i32::from(x) + 3);
    }
}
EOF
rustc +"$NIGHTLY" --edition 2024 -O --crate-type cdylib -Zsanitizer=address \
  -o "$CANARY/libcanary.so" "$CANARY/canary.rs"
set +e
SDP_ASAN_CANARY=1 ASAN_OPTIONS="detect_leaks=0:log_path=$CANARY/asan" \
  LD_PRELOAD="$ASAN_RT $CANARY/libcanary.so" /bin/true
rc=$?
set -e
grep -qs heap-buffer-overflow "$CANARY"/asan.* && [ "$rc" -ne 0 ] \
  || die "ASan did not report the canary's overflow (exit $rc): reports would be missed"
rm -rf "$CANARY"
echo "canary reported (exit $rc)"

step "asan: real-process tests with the instrumented libsdp.so"
# Data path, readiness, fork/dup, many connections and a 64 MiB transfer; each test compares
# with kernel TCP and asserts from `sdp stat` that SDP (shm) carried the bytes. (The tests that
# must see the bytes inside a few seconds, sockperf/iperf3/http.server, are left out: ASan's
# slowdown on a loaded machine breaks their windows; sockperf runs below with a wider one.)
ASAN_TESTS=(
  read_write_readv_writev_send_recv_sendto_recvfrom_sendmsg_recvmsg msg_peek msg_waitall
  msg_dontwait sendfile_from_a_file splice_file_to_socket_and_socket_to_pipe
  epoll_level_triggered epoll_edge_triggered poll_reports_in_out_rdhup
  select_reports_read_write_and_eof shutdown_wr_gives_the_peer_eof_and_rdhup
  dup_dup2_and_closing_one_copy_keeps_the_connection
  fork_child_uses_the_inherited_socket_after_the_parent_closed_it
  prefork_server_three_workers_share_a_listener_for_20_clients
  transfer_64_mib_both_directions_at_once two_hundred_concurrent_connections_echo
  nonblocking_connect_einprogress_writable_so_error_0 eintr_without_sa_restart_and_restart_with_it
  one_thread_connects_to_its_own_listener_then_accepts
)
LIBSDP_SO="$ASAN_LIB/libsdp.so" LIBSDP_PRELOAD_FIRST="$ASAN_RT" \
  cargo test --release --test semantics -- "${ASAN_TESTS[@]}"
step "asan: sockperf ping-pong, both ends instrumented"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SP_LOG=$(mktemp -d /tmp/libsdp-asan-sockperf.XXXXXX)
LD_PRELOAD="$ASAN_RT $ASAN_LIB/libsdp.so" sockperf sr --tcp -i 127.0.0.1 -p "$PORT" \
  >"$SP_LOG/server" 2>&1 &
SRV=$!
for _ in $(seq 300); do
  ss -Hltn "sport = :$PORT" | grep -q . && break
  sleep 0.1
done
LD_PRELOAD="$ASAN_RT $ASAN_LIB/libsdp.so" sockperf pp --tcp -i 127.0.0.1 -p "$PORT" -m 64 -t 4 \
  >"$SP_LOG/client" 2>&1 &
CLI=$!
# While the client runs: both ends' connection on shm with bytes counted (sdp stat).
carried=0
while kill -0 "$CLI" 2>/dev/null; do
  if target/release/sdp stat --json | python3 -c '
import json, sys
pids = {int(p) for p in sys.argv[1:]}
rows = [json.loads(l) for l in sys.stdin if l.strip()]
rows = [r for r in rows if "fd" in r]  # per-process summaries have no fd
conns = [r for r in rows if r["pid"] in pids and r["remote"] not in ("", "-")]
ok = len(conns) >= 2 and all(r["transport"] == "shm" for r in conns) \
    and all(r["bytes_tx"] > 0 and r["bytes_rx"] > 0 for r in conns)
sys.exit(0 if ok else 1)' "$SRV" "$CLI"; then
    carried=1
    break
  fi
  sleep 0.2
done
set +e
wait "$CLI"
rc=$?
set -e
kill "$SRV" 2>/dev/null || true
wait "$SRV" 2>/dev/null || true
[ "$rc" -eq 0 ] && grep -q "percentile 50.000" "$SP_LOG/client" \
  || { cat "$SP_LOG/client" >&2; die "sockperf pp under ASan failed (exit $rc)"; }
[ "$carried" = 1 ] || die "sockperf under ASan: sdp stat never showed both ends on shm with bytes"
rm -rf "$SP_LOG"
echo "sockperf: SDP (shm) carried the bytes both ways"

if compgen -G "$ASAN_LOGS/asan.*" >/dev/null; then
  cat "$ASAN_LOGS"/asan.* >&2
  die "AddressSanitizer reported errors (above)"
fi
rm -rf "$ASAN_LOGS"
echo "asan: no report"

step "done: miri, loom and asan passed"
rm -f "$TIMES"
