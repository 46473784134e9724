#!/usr/bin/env bash
# Installs the programs the tests and benchmarks drive (Debian 12). Idempotent; skips apt when
# everything is already present.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=$(grep -hv '^#' tests/APT-PACKAGES 2>/dev/null | tr '\n' ' ')
pkgs="$pkgs sockperf iperf3 redis-server redis-tools curl python3 gcc binutils procps iproute2"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
# The redis package starts a system instance; the tests start their own on their own ports.
if command -v systemctl >/dev/null 2>&1; then systemctl stop redis-server >/dev/null 2>&1 || true; fi
# tests/servers.rs starts its own memcached, nginx, postgres and sshd on their own ports; the
# system instances the packages start are not needed.
if command -v systemctl >/dev/null 2>&1; then
  for s in memcached nginx postgresql ssh; do systemctl stop "$s" >/dev/null 2>&1 || true; done
fi
