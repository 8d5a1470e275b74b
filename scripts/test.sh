#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite (as root: FUSE
# mounts, network namespaces, other users). Every test cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/scripts/install-deps.sh
cargo build --workspace --all-targets
# The end-to-end tests drive the real binary.
export HAPAIR_BIN="$PWD/target/debug/hapair"
cargo test --workspace --no-fail-fast -- --test-threads=2
