#!/usr/bin/env bash
# Runs hapair's end-to-end tests: installs their tools, builds the binary,
# then runs the test package. Extra arguments go to `cargo test`, e.g.
#   tests/scripts/run-e2e.sh --test crash
#   tests/scripts/run-e2e.sh --test replicate -- replicate_basic_sync
# Must run as root (FUSE, network namespaces, chown).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/scripts/install-deps.sh
cargo build -p hapair
export HAPAIR_BIN="${HAPAIR_BIN:-$PWD/target/debug/hapair}"
exec cargo test -p hapair-tests "$@"
