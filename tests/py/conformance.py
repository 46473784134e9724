"""CPython's own tests of sockets and of the protocols built on them, run in this process by
CPython's test runner (regrtest), then this process's `sdp stat` counters.

    python3 conformance.py <sdp tool> <regrtest arguments...>

Prints regrtest's report, then one line `sdp: offloaded=<n> <reason>=<n> ...` with the
connections this process set up, by outcome (tests/conformance.rs runs it with and without
the preload and compares)."""

import json
import os
import subprocess
import sys

from test.libregrtest import main


def counters(sdp):
    out = subprocess.run([sdp, "stat", "--json"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("process") == os.getpid():
            return {k: v for k, v in row.items() if isinstance(v, int) and k != "process"}
    return {}


sdp = sys.argv[1]
sys.argv = ["regrtest"] + sys.argv[2:]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
sys.stdout.flush()
c = counters(sdp)
print("sdp: " + " ".join(f"{k}={v}" for k, v in sorted(c.items()) if v or k == "offloaded"))
sys.stdout.flush()
os._exit(code)
