#!/usr/bin/env bash
# Failover benchmark: hapair beside keepalived in one run, same topology
# (network namespaces: a switch, two nodes, a client; VIP 10.77.0.100).
# Installs what it needs (keepalived from Debian), builds in release mode,
# prints a table. Options: --quick (1 repetition), --reps N, --no-keepalived.
# Everything it creates is removed at the end of each trial.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "bench/failover.sh: run as root" >&2; exit 2; fi
bash tests/scripts/install-deps.sh --runtime
if ! command -v keepalived >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends keepalived >/dev/null
fi
# keepalived as a service would interfere: this run starts its own, in namespaces.
systemctl disable --now keepalived >/dev/null 2>&1 || true
cargo build --release -p hapair -p hapair-tests --bin hapair --bin failover-bench
export HAPAIR_BIN="$PWD/target/release/hapair"
exec ./target/release/failover-bench "$@"
