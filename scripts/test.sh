#!/usr/bin/env bash
# The project's test command (README): builds libsdp.so and the `sdp` tool, runs every test of
# the workspace against them, then the rdma transport in soft-RoCE qemu guests
# (scripts/rdma-tests.sh, ~3 min) and the sanitizers and model checks (scripts/sanitizers.sh,
# ~5 min). LIBSDP_SKIP_RXE=1 / LIBSDP_SKIP_SANITIZERS=1 skip the last two on a workstation.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
cargo test --release --workspace
bash scripts/rdma-tests.sh
bash scripts/sanitizers.sh
