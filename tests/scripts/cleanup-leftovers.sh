#!/usr/bin/env bash
# Removes what an interrupted test run (e.g. a killed `cargo test`, which
# runs no destructors) may have left: FUSE mounts under /tmp/hapair-test-*,
# network namespaces named hpt-*, hc*-* (cluster tests) and hpd-* (the demo),
# and the temp directories. It stops no
# processes: a leftover hapair process ends when its mount or namespace
# goes away, or must be stopped by its PID by whoever started it.
# Do not run it while tests are running.
set -uo pipefail
# Unmount deepest first.
awk '($2 ~ "^/tmp/hapair-test-" || $2 ~ "^/tmp/hapair-demo-") && $3 ~ /^fuse/ {print $2}' /proc/mounts | sort -r | while read -r m; do
    m=$(printf '%b' "$m")
    fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || echo "could not unmount $m" >&2
done
ip netns list 2>/dev/null | awk '$1 ~ /^(hpt-|hc(s|n1|n2|w|c)-[0-9]+$|hpd-)/ {print $1}' | while read -r ns; do
    ip netns del "$ns" || echo "could not delete netns $ns" >&2
done
ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^hph[0-9]/ {split($2, a, "@"); print a[1]}' | while read -r l; do
    ip link del "$l" 2>/dev/null
done
if [ -z "$(awk '$2 ~ "^/tmp/hapair-test-"' /proc/mounts)" ]; then
    rm -rf /tmp/hapair-test-*
fi
