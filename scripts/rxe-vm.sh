#!/usr/bin/env bash
# rxe-vm.sh — run a command in a throwaway qemu guest (software emulation, no KVM needed) that
# has a real soft-RoCE device: the stock Debian kernel's rdma_rxe driver and Debian's rdma-core
# user space. This is how libsdp's rdma transport is tested on machines without RDMA hardware.
#
# usage: scripts/rxe-vm.sh [-s DIR] [-2] [--prepare] [--] COMMAND...
#   -s DIR     shared read-write with the guest at /mnt/host over 9p (default: the project root);
#              COMMAND runs there (a shell command line, run by busybox sh).
#   -2         boot TWO guests joined by a private L2 link (a qemu unix-datagram socket pair):
#              guest N has 192.168.77.N/24 on eth0 and rxe0 on eth0, so RDMA between them is
#              real RoCEv2 over the link. COMMAND runs in both; it tells them apart by
#              $RXE_VM_NODE (1 or 2), $RXE_VM_ADDR (own address) and $RXE_VM_PEER.
#              Without -2: one guest, rxe0 on a dummy netdev with 192.168.77.1 (no NIC at all).
#   --prepare  only install qemu and build the cached guest; boot nothing.
# Exit status: COMMAND's (with -2: guest 1's if nonzero, else guest 2's); 125 when a guest did
# not boot or did not report a status (timeout, crash).
# In the guest: busybox, ip, rdma, ibv_* and rping tools, perftest (ib_*_bw/lat), sockperf,
# iperf3, libibverbs + librdmacm + the rxe provider; glibc and libgcc_s, so a program built on
# the host (Debian 12) runs there unchanged. Output goes to the serial console, shown here
# with a [vmN] prefix. Never assert timings in the guest: it runs ~9x slower than the host.
# env: LIBSDP_RXE_VM_WORK (cache, default /tmp/libsdp-rxe-vm), LIBSDP_RXE_VM_TIMEOUT (s, per
#      boot, default 300), LIBSDP_RXE_VM_MEM (MiB, default 1024), LIBSDP_RXE_VM_SMP (vCPUs per
#      guest, default 2 for one guest and 1 each for two).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARE=$ROOT PAIR=0 PREPARE=0
while [ $# -gt 0 ]; do
  case $1 in
    -s) SHARE=$(realpath "$2"); shift 2 ;;
    -2) PAIR=1; shift ;;
    --prepare) PREPARE=1; shift ;;
    --) shift; break ;;
    -*) echo "rxe-vm: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $PREPARE -eq 0 ] && [ $# -eq 0 ]; then
  echo "rxe-vm: no command given (usage: $0 [-s DIR] [-2] [--] COMMAND...)" >&2; exit 2
fi
W=${LIBSDP_RXE_VM_WORK:-/tmp/libsdp-rxe-vm}
TIMEOUT=${LIBSDP_RXE_VM_TIMEOUT:-300}
MEM=${LIBSDP_RXE_VM_MEM:-1024}
if [ $PAIR -eq 1 ]; then SMP=${LIBSDP_RXE_VM_SMP:-1}; else SMP=${LIBSDP_RXE_VM_SMP:-2}; fi
log() { echo "rxe-vm: $(date +%T) $*" >&2; }
fail_vm() { log "$*"; exit 125; }
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo

# ---- 1. host tools ---------------------------------------------------------------------------
# qemu-system-x86 comes from bookworm-backports: Debian 12 images may carry the backports
# qemu-utils, whose qemu-system-common conflicts with bookworm's qemu-system-x86.
install_qemu() {
  log "installing qemu-system-x86 (bookworm-backports)"
  if ! apt-cache policy qemu-system-x86 2>/dev/null | grep -q bpo; then
    # the backports suite from the machine's own Debian mirror
    local uri
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$uri" ] || fail_vm "cannot find this machine's Debian mirror in the apt sources"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
      | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
    $SUDO apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 >/dev/null
}
command -v qemu-system-x86_64 >/dev/null || install_qemu || fail_vm "cannot install qemu-system-x86"
command -v qemu-system-x86_64 >/dev/null || fail_vm "qemu-system-x86_64 missing after install"
for t in cpio:cpio gzip:gzip ldconfig:libc-bin; do
  command -v "${t%%:*}" >/dev/null || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    --no-install-recommends "${t#*:}" >/dev/null || fail_vm "cannot install ${t#*:}"
done

# ---- 2. guest packages: downloaded (never installed on the host), unpacked into $W/x ----------
GUEST_DEBS="busybox-static iproute2 libibverbs1 ibverbs-providers ibverbs-utils librdmacm1
  rdmacm-utils perftest sockperf iperf3 libiperf0 libsctp1 libssl3 libstdc++6 libgcc-s1
  libibumad3 libpci3 libnl-3-200 libnl-route-3-200 libmnl0 libelf1 libbpf1 libcap2 libbsd0 libmd0
  libxtables12 libdb5.3 libselinux1 libpcre2-8-0 zlib1g libzstd1"
mkdir -p "$W"; chmod 755 "$W"   # apt's download user must be able to write there
X=$W/x
if [ ! -f "$X/.done" ]; then
  log "downloading the guest kernel and user space"
  kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
  KPKG=$(kpkg)
  [ -n "$KPKG" ] || { $SUDO apt-get update -qq; KPKG=$(kpkg); }
  [ -n "$KPKG" ] || fail_vm "apt knows no linux-image-amd64"
  rm -rf "$W/debs" "$X"; mkdir -p "$W/debs" "$X"; chmod 755 "$W/debs"
  # shellcheck disable=SC2086
  (cd "$W/debs" && apt-get download -qq "$KPKG" $GUEST_DEBS 2>&1 | grep -v 'unsandboxed' || true)
  for d in "$W"/debs/*.deb; do dpkg-deb -x "$d" "$X"; done
  ls "$X"/boot/vmlinuz-* >/dev/null 2>&1 || fail_vm "guest kernel download failed"
  rm -rf "$W/debs"
  touch "$X/.done"
fi
KVER=$(ls "$X/lib/modules" | head -1)
VMLINUZ=$X/boot/vmlinuz-$KVER

# ---- 3. the guest's root (an initramfs), cached; rebuilt when this script changes ------------
KEY=$(cat "$0" | sha256sum | cut -c1-16)-$KVER
BASE=$W/base-$KEY.cpio.gz
build_base() {
  log "building the guest initramfs for $KVER"
  local R=$W/root lp=$X/usr/lib/x86_64-linux-gnu:$X/lib/x86_64-linux-gnu
  rm -rf "$R"
  mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,proc,sys,dev,tmp,run,etc,mnt/host,root}
  mkdir -p "$R/usr/lib/x86_64-linux-gnu/libibverbs" "$R/etc/libibverbs.d"
  cp "$X/bin/busybox" "$R/bin/busybox"
  local a; for a in $("$X/bin/busybox" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
  # a program and every library it needs (resolved against the downloaded packages first)
  ship() {
    cp -L "$1" "$R/usr/bin/"
    LD_LIBRARY_PATH=$lp ldd "$1" | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' |
      while read -r l; do
        case $l in
          */ld-linux-x86-64.so.2) cp -L "$l" "$R/lib64/" ;;
          *) [ -e "$R/lib/x86_64-linux-gnu/$(basename "$l")" ] || cp -L "$l" "$R/lib/x86_64-linux-gnu/" ;;
        esac
      done
  }
  local b
  for b in ibv_devinfo ibv_devices ibv_rc_pingpong ibv_ud_pingpong rping ucmatose rdma_server \
           rdma_client rdma ib_send_bw ib_send_lat ib_write_bw ib_write_lat ib_read_bw sockperf iperf3; do
    [ -x "$X/usr/bin/$b" ] || fail_vm "guest package for $b missing in $X"
    ship "$X/usr/bin/$b"
  done
  ship "$X/bin/ip"   # (sbin/ip is an absolute symlink: it would name the host's)
  mv "$R/usr/bin/ip" "$R/usr/bin/rdma" "$R/usr/sbin/"
  # glibc dlopens libgcc_s for thread cancellation; the rxe provider is dlopened by libibverbs
  cp -L "$X/lib/x86_64-linux-gnu/libgcc_s.so.1" "$R/lib/x86_64-linux-gnu/"
  cp "$X/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so" "$R/usr/lib/x86_64-linux-gnu/libibverbs/"
  cp "$X/etc/libibverbs.d/rxe.driver" "$R/etc/libibverbs.d/"
  ln -sf libibverbs.so.1 "$R/lib/x86_64-linux-gnu/libibverbs.so"
  ln -sf librdmacm.so.1 "$R/lib/x86_64-linux-gnu/librdmacm.so"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$R/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
  printf '127.0.0.1 localhost\n192.168.77.1 vm1\n192.168.77.2 vm2\n' > "$R/etc/hosts"
  ldconfig -r "$R" 2>/dev/null || true   # an ld.so.cache, as on a real system

  # kernel modules: the closure of what we load, via each module's "depends=" modinfo field,
  # in load order (dependencies first), stored uncompressed; the list goes to /modules.list
  local mdir=$X/lib/modules/$KVER
  declare -A path=() seen=()
  local f n
  while read -r f; do n=$(basename "$f"); n=${n%%.ko*}; path[${n//-/_}]=$f; done \
    < <(find "$mdir/kernel" -name '*.ko*')
  : > "$R/modules.list"
  modinfo_of() {
    case $1 in *.xz) xz -dc "$1" ;; *.zst) zstd -qdc "$1" ;; *) cat "$1" ;; esac
  }
  visit() {
    local m=$1 d
    [ -z "${seen[$m]:-}" ] || return 0
    seen[$m]=1
    [ -n "${path[$m]:-}" ] || return 0   # built into the kernel
    for d in $(modinfo_of "${path[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do
      visit "${d//-/_}"
    done
    local rel=${path[$m]#"$mdir"/} out
    out=$R/lib/modules/$KVER/${rel%%.ko*}.ko
    mkdir -p "$(dirname "$out")"
    modinfo_of "${path[$m]}" > "$out"
    echo "${rel%%.ko*}.ko" >> "$R/modules.list"
  }
  for n in crc32_generic rdma_rxe ib_uverbs rdma_ucm virtio_pci virtio_net 9pnet_virtio 9p dummy; do
    visit "$n"
  done

  cat > "$R/init" <<'INIT'
#!/bin/sh
# PID 1 of the guest: mount, load modules, bring up rxe0, run /cmd.sh, report its status
# through the isa-debug-exit port, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
ip() { /usr/sbin/ip "$@"; }   # busybox sh prefers its own applets over $PATH
say() { echo "rxe-vm: $*"; }
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /dev/shm; mount -t tmpfs tmpfs /run
echo 3 > /proc/sys/kernel/printk
ulimit -l unlimited   # RDMA memory registration pins pages
while read -r m; do insmod "/lib/modules/$(uname -r)/$m" || say "insmod $m failed"; done < /modules.list
. /vm.conf
hostname "vm$RXE_VM_NODE"
ip link set lo up
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host0 /mnt/host || say "no 9p share"
if [ "$RXE_VM_PAIR" = 1 ]; then DEV=eth0; else DEV=dummy0; ip link show dummy0 >/dev/null 2>&1 || ip link add dummy0 type dummy; fi
ip addr add "$RXE_VM_ADDR/24" dev $DEV; ip link set $DEV up
rdma link add rxe0 type rxe netdev $DEV || say "rdma link add failed"
# rxe0 is usable once its IPv4-mapped GID (index 1) exists
i=0; while [ $i -lt 100 ] && ! grep -q ffff /sys/class/infiniband/rxe0/ports/1/gids/1 2>/dev/null; do
  sleep 0.1; i=$((i+1)); done
if [ "$RXE_VM_PAIR" = 1 ]; then   # both guests up and linked before the command runs
  i=0; while [ $i -lt 120 ] && ! ping -c1 -W1 "$RXE_VM_PEER" >/dev/null 2>&1; do i=$((i+1)); done
  [ $i -lt 120 ] || say "peer $RXE_VM_PEER unreachable"
fi
say "guest $RXE_VM_NODE ready at $(cut -d' ' -f1 /proc/uptime)s uptime: $(rdma link show 2>&1 | head -1)"
export RXE_VM_NODE RXE_VM_ADDR RXE_VM_PEER RXE_VM_PAIR
cd /mnt/host 2>/dev/null || cd /tmp
sh /cmd.sh; RC=$?
say "guest $RXE_VM_NODE command exit status $RC at $(cut -d' ' -f1 /proc/uptime)s uptime"
cd /; sync; umount /mnt/host 2>/dev/null
# isa-debug-exit: qemu exits with (value << 1) | 1
printf "\\$(printf %o $((RC & 127)))" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
poweroff -f
INIT
  chmod +x "$R/init"
  rm -f "$W"/base-*.cpio.gz
  (cd "$R" && find . | cpio -o -H newc --quiet) | gzip -1 > "$BASE.tmp"
  mv "$BASE.tmp" "$BASE"
  log "initramfs $(du -h "$BASE" | cut -f1) (compressed)"
}
[ -f "$BASE" ] || build_base
[ $PREPARE -eq 0 ] || { log "guest ready in $W"; exit 0; }

# ---- 4. boot -----------------------------------------------------------------------------------
O=$(mktemp -d "${TMPDIR:-/tmp}/rxe-vm.XXXXXX")
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$O"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
printf '%s\n' "$*" > "$O/cmd.sh"

# boot_guest N: starts guest N in the background; its qemu exit code lands in $O/qemu-N.rc
boot_guest() {
  local n=$1 peer=$(( 3 - $1 )) net d
  mkdir -p "$O/g$n"
  printf 'RXE_VM_NODE=%s\nRXE_VM_ADDR=192.168.77.%s\nRXE_VM_PEER=192.168.77.%s\nRXE_VM_PAIR=%s\n' \
    "$n" "$n" "$peer" "$PAIR" > "$O/g$n/vm.conf"
  cp "$O/cmd.sh" "$O/g$n/cmd.sh"
  (cd "$O/g$n" && printf 'cmd.sh\nvm.conf\n' | cpio -o -H newc --quiet | gzip -1 > overlay.cpio.gz)
  cat "$BASE" "$O/g$n/overlay.cpio.gz" > "$O/g$n/initrd.gz"
  if [ $PAIR -eq 1 ]; then
    # one unix datagram socket per guest, each sending to the other's: an L2 cable
    net=(-netdev "dgram,id=l0,local.type=unix,local.path=$O/link-$n.sock,remote.type=unix,remote.path=$O/link-$peer.sock"
         -device "virtio-net-pci,netdev=l0,mac=52:54:00:77:00:0$n,romfile=")   # no iPXE: we boot -kernel
  else
    net=(-nic none)
  fi
  (
    set +e
    timeout -k 10 "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -smp "$SMP" -m "$MEM" \
      -nographic -no-reboot -kernel "$VMLINUZ" -initrd "$O/g$n/initrd.gz" \
      -append "console=ttyS0 quiet loglevel=3 panic=-1" "${net[@]}" \
      -fsdev "local,id=fs0,path=$SHARE,security_model=none" -device virtio-9p-pci,fsdev=fs0,mount_tag=host0 \
      -device isa-debug-exit,iobase=0xf4,iosize=0x04 </dev/null > "$O/g$n/console"
    echo $? > "$O/qemu-$n.rc"
  ) &
  PIDS+=($!)
  # the console, live, without terminal escapes, prefixed with the guest's name
  d=$!
  (tail -q -n +1 -s 0.2 --pid="$d" -F "$O/g$n/console" 2>/dev/null |
     sed -u 's/\r//g; s/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g; /^SeaBIOS\|^Booting from ROM/d; s/^/[vm'"$n"'] /') &
  PIDS+=($!)
}

# status N: the guest's command status from its qemu exit code
status() {
  local q; q=$(cat "$O/qemu-$1.rc" 2>/dev/null || echo none)
  if [ "$q" = 124 ] || [ "$q" = 137 ]; then log "guest $1 timed out after ${TIMEOUT}s"; echo 125
  elif [ "$q" != none ] && [ $((q & 1)) -eq 1 ]; then echo $((q >> 1))
  else log "guest $1 ended without a status (qemu exit $q)"; echo 125; fi
}

T0=$(date +%s.%N)
log "booting $([ $PAIR -eq 1 ] && echo 'two guests' || echo 'one guest') ($KVER, tcg, ${SMP} vCPU)"
boot_guest 1
[ $PAIR -eq 0 ] || boot_guest 2
wait "${PIDS[@]}" || true   # the guests, then the console followers (they end with them)
RC=$(status 1)
if [ $PAIR -eq 1 ]; then
  RC2=$(status 2)
  if [ "$RC" = 125 ] || [ "$RC2" = 125 ]; then RC=125; elif [ "$RC" = 0 ]; then RC=$RC2; fi
fi
log "done in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')s, exit status $RC"
exit "$RC"
