#!/usr/bin/env bash
# The local demo: a directory replicated to its mirror through a hapair mount.
# Installs what it needs, builds hapair, starts a mirror and a mount on this
# machine (loopback), writes files through the mount, shows them on the
# mirror, unmounts, and cleans up after itself (even on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/scripts/install-deps.sh --runtime
cargo build --release -p hapair
BIN=$PWD/target/release/hapair

WORK=$(mktemp -d /tmp/hapair-demo.XXXXXX)
MIRROR_PID="" MOUNT_PID=""
cleanup() {
  set +e
  [ -n "$MOUNT_PID" ] && kill -TERM "$MOUNT_PID" 2>/dev/null && wait "$MOUNT_PID" 2>/dev/null
  grep -q " $WORK/data " /proc/mounts && fusermount3 -uz "$WORK/data"
  [ -n "$MIRROR_PID" ] && kill -TERM "$MIRROR_PID" 2>/dev/null && wait "$MIRROR_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/data" "$WORK/mirror"
PORT=$((20000 + RANDOM % 20000))
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "cluster certificates (hapair tls init)"
"$BIN" tls init "$WORK/tls" --nodes n1,n2
echo "existing data" > "$WORK/data/before.txt"

step "mirror on 127.0.0.1:$PORT, mount over $WORK/data (sync mode)"
"$BIN" mirror --listen 127.0.0.1:$PORT --tls "$WORK/tls" --node n2 "$WORK/mirror" 2>"$WORK/mirror.log" &
MIRROR_PID=$!
"$BIN" mount --peer 127.0.0.1:$PORT --tls "$WORK/tls" --node n1 --state-dir "$WORK/state" "$WORK/data" 2>"$WORK/mount.log" &
MOUNT_PID=$!
for _ in $(seq 100); do grep -q "^hapair:[^ ]* $WORK/data fuse" /proc/mounts && break; sleep 0.1; done
grep " $WORK/data " /proc/mounts
echo "the file that existed before the mount was copied to the mirror:"
cat "$WORK/mirror/before.txt"

step "the application writes through the mount"
mkdir -p "$WORK/data/app/logs"
for i in 1 2 3; do echo "record $i $(date +%T.%N)" >> "$WORK/data/app/logs/journal.log"; done
dd if=/dev/urandom of="$WORK/data/app/blob.bin" bs=1M count=8 status=none conv=fsync
ln -s logs/journal.log "$WORK/data/app/latest"
mv "$WORK/data/before.txt" "$WORK/data/app/renamed.txt"
sync "$WORK/data/app/logs/journal.log"

step "the mirror (fsync returned, so it is on the mirror's disk)"
(cd "$WORK/mirror" && find . -printf '%M %u %s %p %l\n' | sort -k4)
cmp "$WORK/data/app/blob.bin" "$WORK/mirror/app/blob.bin" && echo "blob.bin identical on both sides"
cat "$WORK/mirror/app/logs/journal.log"
echo "status: $(tr -d '\n ' < "$WORK/state/status.json")"

step "unmount (SIGTERM): the directory keeps its data"
kill -TERM "$MOUNT_PID"; wait "$MOUNT_PID"; MOUNT_PID=""
ls -la "$WORK/data/app"
diff -r "$WORK/data" "$WORK/mirror" && echo "data and mirror are identical"
echo; echo "demo finished"
