#!/bin/bash
# The setup rate libsdp's fd model allows at best on this machine: benches/setup-floor.c's
# modes (see its header), each the loop of `sdp bench --only setup_rate` with only the kernel
# work the mode names, run REPS times in turn and compared with kernel TCP.
#
# Usage: benches/setup-floor.sh [REPS] [CONNECTIONS]   (defaults 5 and 8000; needs a C
#        compiler). MODES in the environment picks modes (default: all). Prints per mode the
#        median connections per second and its ratio to `tcp`'s median.
set -euo pipefail
cd "$(dirname "$0")"
REPS=${1:-5}
N=${2:-8000}
MODES=${MODES:-tcp pairs watched model pooled shared}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cc -O2 -pthread -Wall -Werror -o "$WORK/setup-floor" setup-floor.c
PORT=$((20000 + RANDOM % 5000))
for _ in $(seq "$REPS"); do
    for m in $MODES; do
        PORT=$((PORT + 1))
        "$WORK/setup-floor" "$m" "$N" "$PORT" >>"$WORK/out"
    done
done
awk -F'[ =]' '
    !($1 in v) { name[++n] = $1 }
    { v[$1] = v[$1] " " $3 }
    function median(s,   a, k, i, j, t) {
        k = split(s, a, " ")
        for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
    }
    END {
        base = median(v["tcp"])
        for (i = 1; i <= n; i++) {
            m = median(v[name[i]])
            printf "%-8s %8.0f conn/s  %5.2fx tcp   (runs:%s)\n", name[i], m, base ? m / base : 0, v[name[i]]
        }
    }' "$WORK/out"
