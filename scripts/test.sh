#!/usr/bin/env bash
# The project's test command (README): builds libsdp.so and the `sdp` tool, then runs every
# test of the workspace against them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
cargo test --release --workspace
