#!/usr/bin/env bash
# The local demo: a two-node hapair cluster in network namespaces (a switch,
# two nodes, a witness, a client). Installs what it needs, builds hapair,
# and runs `hapair demo`: a client writes fsynced records through the VIP,
# the primary's daemon is killed with SIGKILL, the secondary takes over,
# the old primary returns and is resynced, the service is swapped back, and
# every acknowledged record is checked on both nodes. It removes everything
# it created, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/scripts/install-deps.sh --runtime
cargo build --release -p hapair
exec ./target/release/hapair demo "$@"
