#!/usr/bin/env bash
# rdma-tests.sh — the tests that need a real RDMA device, run in soft-RoCE guests
# (scripts/rxe-vm.sh). Run by .ci/run after scripts/test.sh; builds nothing: it uses what
# `cargo build --release --workspace` / `cargo test --release --workspace` left in target/release.
#
#   1 guest  (a) rxe works: ibv_devinfo shows rxe0 PORT_ACTIVE, ibv_rc_pingpong and rping run
#            (b) target/release/rdma-selftest (our rdma provider) prints its ok line, if built
#            (c) ib_send_bw over rxe, printed for the record (perftest's exit status is not used:
#                its server sometimes fails to print a report under emulation)
#            (e) the one-guest tests of tests/rdma_guest.rs (target/release/deps/rdma_guest-*)
#   2 guests (d) ibv_rc_pingpong and rping between the guests over their L2 link (RoCEv2),
#                then rdma-selftest across them (its --serve-only / --client two-node mode)
#            (e) the two-guest tests of tests/rdma_guest.rs
#
# Prints one PASS/FAIL line per check and a summary; exits 1 if any check failed.
# A guest that cannot be booted (no qemu, status 125) is a FAIL, never a silent skip;
# LIBSDP_SKIP_RXE=1 skips everything (local runs on machines where qemu cannot be installed).
# env: LIBSDP_RXE_VM_WORK etc. (see scripts/rxe-vm.sh), LIBSDP_RDMA_TESTS_LOG (the guests'
#      consoles, default target/rdma-tests.log), LIBSDP_REQUIRE_RDMA (default 1, passed to the
#      guests: tests/rdma_guest.rs accepts only rdma for the connection between them; 0 also
#      accepts a TCP fallback with its reason).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "${LIBSDP_SKIP_RXE:-0}" = 1 ]; then
  echo "rdma-tests: SKIP all (LIBSDP_SKIP_RXE=1): nothing was tested on RDMA"
  exit 0
fi
LOG=${LIBSDP_RDMA_TESTS_LOG:-$ROOT/target/rdma-tests.log}
# A guest boot's limit: the one-guest tests take about 3 minutes of an emulated CPU when the
# host is quiet, and a loaded 2-core host stretches that.
export LIBSDP_RXE_VM_TIMEOUT=${LIBSDP_RXE_VM_TIMEOUT:-720}
mkdir -p "$(dirname "$LOG")"; : > "$LOG"
FAILED=0
say() { echo "rdma-tests: $*"; }
secs() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }

# ---------------------------------------------------------------------------------------------
# The guest side, busybox sh. Every check prints "RDMA-TEST PASS|FAIL|INFO name: detail".
# Every step has a timeout: a hang costs that step, not the whole budget.
GUEST_LIB='
pass() { echo "RDMA-TEST PASS $*"; }
fail() { echo "RDMA-TEST FAIL $*"; FAILS=$((FAILS+1)); }
info() { echo "RDMA-TEST INFO $*"; }
FAILS=0
ip() { /usr/sbin/ip "$@"; }
SELFTEST=target/release/rdma-selftest
# retry CMD...: a client, again while its server is not up yet (20 s)
retry() { i=0; while [ $i -lt 40 ]; do "$@" && return 0; sleep 0.5; i=$((i+1)); done; return 1; }
# run_selftest NAME ARGS...: requires the "rdma-selftest ok" line and exit status 0
run_selftest() {
  name=$1; shift
  t0=$(cut -d" " -f1 /proc/uptime)
  timeout 300 "$SELFTEST" "$@" > /tmp/st.out 2>&1; rc=$?
  info "$name: ran $(awk -v a=$t0 -v b=$(cut -d" " -f1 /proc/uptime) "BEGIN {print b - a}")s in the guest"
  sed "s/^/    /" /tmp/st.out
  ok=$(grep "^rdma-selftest ok" /tmp/st.out | tail -1)
  if [ $rc -eq 0 ] && [ -n "$ok" ]; then pass "$name: ${ok#rdma-selftest ok }"
  elif [ $rc -eq 77 ]; then fail "$name: exit 77 (no device) although rxe0 is up"
  else fail "$name: exit $rc, ok line: ${ok:-missing}"; fi
}
# run_rust_tests FILTER: the ignored tests of tests/rdma_guest.rs matching FILTER (newest build)
run_rust_tests() {
  T=$(ls -t target/release/deps/rdma_guest-* 2>/dev/null | grep -v "\.d$" | head -1)
  if [ -z "$T" ]; then
    fail "rdma_guest.rs $1: no target/release/deps/rdma_guest-* (cargo test --release --workspace builds it)"
    return
  fi
  timeout 600 "$T" --ignored --nocapture --test-threads=1 "$1" > /tmp/rg.out 2>&1; rc=$?
  grep -o "RDMA-TEST .*" /tmp/rg.out
  result=$(grep "^test result" /tmp/rg.out)
  if [ $rc -eq 0 ] && echo "$result" | grep -q " [1-9][0-9]* passed"; then pass "rdma_guest.rs $1: $result"
  else
    sed "s/^/    /" /tmp/rg.out
    # The panics again as check lines: a CI log cut to its check lines still says why.
    grep -A4 "panicked at" /tmp/rg.out | grep -v -E "^ *[0-9]+: |^ +at |^stack backtrace|^note: |^--$" |
      head -40 | while IFS= read -r l; do info "rdma_guest.rs $1 panic: $l"; done
    fail "rdma_guest.rs $1: exit $rc: ${result:-no result}"
  fi
}
'

GUEST_ONE='
# (a) rxe itself
if timeout 30 ibv_devinfo -d rxe0 > /tmp/devinfo 2>&1 && grep -q PORT_ACTIVE /tmp/devinfo; then
  pass "rxe-devinfo: rxe0 $(grep -o "link_layer:.*" /tmp/devinfo | tr -s "\t " " ")"
else cat /tmp/devinfo; fail "rxe-devinfo: rxe0 missing or not PORT_ACTIVE"; fi
timeout 60 ibv_rc_pingpong -d rxe0 -g 1 -n 100 > /tmp/pp-server 2>&1 & S=$!
if retry timeout 60 ibv_rc_pingpong -d rxe0 -g 1 -n 100 "$RXE_VM_ADDR" > /tmp/pp-client 2>&1 && wait $S; then
  pass "rxe-rc-pingpong: $(grep iters /tmp/pp-client)"
else cat /tmp/pp-server /tmp/pp-client; fail "rxe-rc-pingpong"; fi
timeout 60 rping -s -a "$RXE_VM_ADDR" -C 5 > /tmp/rp-server 2>&1 & S=$!
if retry timeout 60 rping -c -a "$RXE_VM_ADDR" -C 5 -v > /tmp/rp-client 2>&1 && wait $S &&
   [ "$(grep -c "ping data" /tmp/rp-client)" = 5 ]; then
  pass "rxe-rping: 5 rdma_cm pings"
else cat /tmp/rp-server /tmp/rp-client; fail "rxe-rping"; fi

# (b) our rdma provider
if [ -x "$SELFTEST" ]; then run_selftest rdma-selftest
else info "rdma-selftest: $SELFTEST not built, not run"; fi

# (c) for the record: perftest send bandwidth (exit status not used, see rdma-tests.sh)
timeout 90 ib_send_bw -d rxe0 -x 1 -F -s 65536 -n 300 > /tmp/bw-server 2>&1 & S=$!
i=0; while :; do   # again only while the server is not up: its exit status means little
  timeout 90 ib_send_bw -d rxe0 -x 1 -F -s 65536 -n 300 "$RXE_VM_ADDR" > /tmp/bw-client 2>&1
  grep -q "Couldn.t connect" /tmp/bw-client && [ $i -lt 40 ] || break
  i=$((i+1)); sleep 0.5
done
wait $S
line=$(grep -A1 "#bytes" /tmp/bw-client | tail -1 | tr -s " ")
if [ -n "$line" ]; then info "ib_send_bw: #bytes #iterations BW-peak BW-average[MB/sec] MsgRate[Mpps]:$line"
else cat /tmp/bw-client; info "ib_send_bw: no report"; fi

# (e) the in-guest Rust tests
run_rust_tests one_guest
exit $FAILS
'

GUEST_TWO='
# (d) RoCEv2 between two guests over their L2 link; node 2 serves, node 1 connects
if [ "$RXE_VM_NODE" = 2 ]; then
  timeout 60 ibv_rc_pingpong -d rxe0 -g 1 -n 100 > /tmp/pp 2>&1 || { cat /tmp/pp; fail "pair-rc-pingpong (server side)"; }
  timeout 60 rping -s -a "$RXE_VM_ADDR" -C 5 > /tmp/rp 2>&1 || { cat /tmp/rp; fail "pair-rping (server side)"; }
else
  if retry timeout 60 ibv_rc_pingpong -d rxe0 -g 1 -n 100 "$RXE_VM_PEER" > /tmp/pp 2>&1; then
    pass "pair-rc-pingpong: vm1 -> vm2: $(grep iters /tmp/pp)"
  else cat /tmp/pp; fail "pair-rc-pingpong: vm1 -> vm2"; fi
  if retry timeout 60 rping -c -a "$RXE_VM_PEER" -C 5 -v > /tmp/rp 2>&1 &&
     [ "$(grep -c "ping data" /tmp/rp)" = 5 ]; then pass "pair-rping: vm1 -> vm2, 5 rdma_cm pings"
  else cat /tmp/rp; fail "pair-rping: vm1 -> vm2"; fi
fi
# rdma-selftest across the two guests, when the binary has its two-node mode (--serve-only in
# its usage): vm2 serves one client (and prints the ok line), vm1 is that client (exit 0). The
# one-guest run already moves the full volume; here 8 MiB each way (same on both sides): the
# emulated link is slow (64 MiB took 130 s under load).
PAIR_PORT=18600 PAIR_BYTES=8388608
if [ -x "$SELFTEST" ] && "$SELFTEST" --usage-probe 2>&1 | grep -q -- "--serve-only"; then
  if [ "$RXE_VM_NODE" = 2 ]; then
    run_selftest "pair-rdma-selftest server vm2" --addr "$RXE_VM_ADDR" --port $PAIR_PORT \
      --bytes $PAIR_BYTES --serve-only
  else
    # again while vm2 is not listening yet: a quick failure before any ping-pong
    i=0
    while :; do
      t0=$(cut -d" " -f1 /proc/uptime)
      timeout 300 "$SELFTEST" --client "$RXE_VM_PEER:$PAIR_PORT" --bytes $PAIR_BYTES > /tmp/stc 2>&1; rc=$?
      took=$(awk -v a=$t0 -v b=$(cut -d" " -f1 /proc/uptime) "BEGIN {print int(b - a)}")
      [ $rc -ne 0 ] && ! grep -q ping-pongs /tmp/stc && [ "$took" -lt 15 ] && [ $i -lt 30 ] || break
      i=$((i+1)); sleep 1
    done
    sed "s/^/    /" /tmp/stc
    if [ $rc -eq 0 ]; then pass "pair-rdma-selftest client vm1: exit 0 after ${took}s: $(grep ping-pongs /tmp/stc)"
    else fail "pair-rdma-selftest client vm1: exit $rc"; fi
  fi
elif [ "$RXE_VM_NODE" = 1 ]; then
  info "pair-rdma-selftest: $SELFTEST not built or without its two-node mode (--serve-only): not run"
fi
# (e) the in-guest Rust tests across the link (both guests run them: vm2 serves, vm1 connects)
run_rust_tests pair_
exit $FAILS
'

# ---------------------------------------------------------------------------------------------
# run_guests NAME RXE-VM-ARGS...: one rxe-vm.sh run, its console in $LOG, its PASS/FAIL lines
# shown; a boot failure (125) is a FAIL.
run_guests() {
  local name=$1 t0 rc; shift
  t0=$(date +%s.%N)
  say "$name: booting"
  echo "===== $name" >> "$LOG"
  bash scripts/rxe-vm.sh "$@" >> "$LOG" 2>&1; rc=$?
  # this run's check lines, with the guest that printed them
  sed -n "/^===== $name\$/,\$p" "$LOG" | grep 'RDMA-TEST ' | sed 's/^\(\[vm[12]\]\) RDMA-TEST \([A-Z]*\) /\2 \1 /; s/^/  /'
  if [ $rc -eq 125 ]; then
    say "FAIL $name: the guest did not boot or report a status (see $LOG)"
    sed -n "/^===== $name\$/,\$p" "$LOG" | tail -20 | sed 's/^/    /'
    FAILED=$((FAILED+1))
  elif [ $rc -ne 0 ]; then
    say "FAIL $name: $rc check(s) failed (guest consoles: $LOG)"
    FAILED=$((FAILED+1))
  else
    say "PASS $name"
  fi
  say "$name: $(secs "$t0")s (boot included)"
}

T0=$(date +%s.%N)
t=$(date +%s.%N)
if bash scripts/rxe-vm.sh --prepare >> "$LOG" 2>&1; then
  say "guest prepared in $(secs "$t")s (qemu install and guest download on first use, cached after)"
else
  say "FAIL prepare: cannot install qemu or build the guest (see $LOG); LIBSDP_SKIP_RXE=1 skips"
  tail -20 "$LOG" | sed 's/^/    /'
  exit 1
fi
# the guests see none of this environment: pass on what the in-guest tests read
REQUIRE_RDMA=1; [ "${LIBSDP_REQUIRE_RDMA:-1}" = 0 ] && REQUIRE_RDMA=0
GUEST_ENV="export LIBSDP_REQUIRE_RDMA=$REQUIRE_RDMA"
GUEST_LIB="$GUEST_ENV
$GUEST_LIB"
run_guests "one-guest" -- "$GUEST_LIB$GUEST_ONE"
run_guests "two-guests" -2 -- "$GUEST_LIB$GUEST_TWO"
if [ $FAILED -eq 0 ]; then say "PASS all RDMA tests in $(secs "$T0")s"; exit 0; fi
say "FAIL: $FAILED of 2 guest runs failed, in $(secs "$T0")s"
exit 1
