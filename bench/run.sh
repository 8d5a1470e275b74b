#!/usr/bin/env bash
# hapair side by side with its peers, on this machine, in one run.
#
#   bash bench/run.sh [--quick] [--reps N] [--targets "native bindfs gluster hapair hapair-strict floor"]
#                     [--out FILE] [--keep] [--selftest]
#
# As root. Installs what it needs (Debian packages), builds hapair and the
# transport floor in release mode (or uses $HAPAIR_BIN and $QUIC_FLOOR_BIN),
# then measures the workloads of /work/shared/BENCHMARKS.md (a: sequential write with end_fsync, b: 4 KiB
# random write + fsync, b with 4 jobs, c: small-file creates/stat/unlink,
# d: cold sequential read) on:
#   native         a directory on the local disk (ext4)
#   bindfs         Debian's bindfs -o big_writes over a directory (FUSE passthrough)
#   gluster        GlusterFS replica 2, FUSE client, both bricks local on 127.0.0.2
#   hapair         hapair mount --mode sync, replicated to hapair mirror running in
#                  a second network namespace over a veth link (10.210.0.0/16)
#   hapair-strict  the same in strict mode (workloads a and b only)
#   floor          workload b only (1 job, and 4 clients at once), by
#                  bench/repl_floor.c: each 4 KiB write is sent in one UDP datagram
#                  over the same veth to a server in the namespace that writes and
#                  fsyncs it, while the client fsyncs its own copy: the best any
#                  replication can do here (no FUSE, no QUIC);
#                  and the transport alone (crates/transport/examples/quic_floor.rs):
#                  the round trip of a 4 KiB message in hapair's QUIC beside plain
#                  UDP, and a bulk transfer's MiB/s and CPU per GiB, on the same veth
# Each workload runs on every target in turn before the next workload, in
# every repetition, so that ratios come from the same stretch of time; the
# turn goes in the listed order in odd repetitions and in reverse in even
# ones, so that no target always follows the same one (what a target
# leaves behind, such as the inodes workload c frees, can slow the next); the
# report (medians, ratios, the issue's targets, the replication cost) is
# printed and saved in the results directory.
# Everything it starts (mounts, gluster volume and daemons, namespaces,
# processes, temp dirs) is removed on exit, also on failure or Ctrl-C; it
# only ever stops processes it started, by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench
PY=/usr/bin/python3

MODE=full REPS="" TARGETS="" OUT="" KEEP=0
usage() { sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --quick) MODE=quick ;;
        --selftest) MODE=selftest ;;
        --reps) REPS=${2:?--reps needs a number}; shift ;;
        --targets) TARGETS=${2:?--targets needs a list}; shift ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) usage ;;
        *) echo "bench/run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$(id -u)" != 0 ]; then
    echo "bench/run.sh: must run as root (mounts, network namespaces, drop_caches)" >&2
    exit 2
fi

# Transport floor: round trips and MiB of the bulk transfer.
case $MODE in
    full)     T_ROUNDS=2000; T_MIB=1024 ;;
    quick)    T_ROUNDS=500;  T_MIB=256 ;;
    selftest) T_ROUNDS=100;  T_MIB=16 ;;
esac
case $MODE in
    full)     SEQ=1G;   B_IOS=2000; C_FILES=10000; : "${REPS:=3}"
              : "${TARGETS:=native bindfs gluster hapair hapair-strict floor}" ;;
    quick)    SEQ=256M; B_IOS=500;  C_FILES=2000;  : "${REPS:=1}"
              : "${TARGETS:=native bindfs gluster hapair hapair-strict floor}" ;;
    selftest) SEQ=16M;  B_IOS=50;   C_FILES=200;   : "${REPS:=1}"
              : "${TARGETS:=native hapair floor}" ;;
esac
case $REPS in ''|*[!0-9]*|0) echo "bench/run.sh: --reps must be a positive number" >&2; exit 2 ;; esac
for t in $TARGETS; do
    case $t in native|bindfs|gluster|hapair|hapair-strict|floor) ;;
        *) echo "bench/run.sh: unknown target '$t'" >&2; exit 2 ;; esac
done
has() { case " $TARGETS " in *" $1 "*) return 0 ;; esac; return 1; }
has_hapair() { has hapair || has hapair-strict; }
needs_netns() { has_hapair || has floor; }
T0=$(date +%s)
say() { printf '[bench %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
[ "$MODE" = full ] || say "$(echo "$MODE" | tr a-z A-Z) RUN: small sizes, $REPS repetition(s); figures are indicative only"

# --- what it needs -------------------------------------------------------
declare -A NEED=([fio]=fio [iproute2]=ip [python3]=/usr/bin/python3 [fuse3]=fusermount3 [procps]=ps)
has bindfs && NEED[bindfs]=bindfs
has gluster && NEED[glusterfs-server]=glusterd && NEED[glusterfs-client]=mount.glusterfs
has floor && NEED[gcc]=cc
missing=()
for pkg in "${!NEED[@]}"; do command -v "${NEED[$pkg]}" >/dev/null 2>&1 || missing+=("$pkg"); done
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if has_hapair; then
    if [ -n "${HAPAIR_BIN:-}" ]; then
        BIN=$HAPAIR_BIN
        say "using HAPAIR_BIN=$BIN"
    else
        say "cargo build --release -p hapair"
        (cd "$ROOT" && cargo build --release -q -p hapair)
        BIN=$ROOT/target/release/hapair
    fi
    [ -x "$BIN" ] || { echo "bench/run.sh: $BIN is not executable" >&2; exit 1; }
fi
if has floor; then
    if [ -n "${QUIC_FLOOR_BIN:-}" ]; then
        QUIC_FLOOR=$QUIC_FLOOR_BIN
    else
        say "cargo build --release --example quic_floor -p hapair-transport"
        (cd "$ROOT" && cargo build --release -q --example quic_floor -p hapair-transport)
        QUIC_FLOOR=$ROOT/target/release/examples/quic_floor
    fi
    [ -x "$QUIC_FLOOR" ] || { echo "bench/run.sh: $QUIC_FLOOR is not executable" >&2; exit 1; }
fi

# The revision measured, taken now (before any commit made during the run).
HAPAIR_REV=""
if has_hapair; then
    HAPAIR_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    git -C "$ROOT" diff --quiet HEAD 2>/dev/null || HAPAIR_REV="$HAPAIR_REV (with uncommitted changes)"
    [ -n "${HAPAIR_BIN:-}" ] && HAPAIR_REV="$HAPAIR_REV, binary $BIN"
fi

# --- work area and cleanup ----------------------------------------------
WORK=$(mktemp -d "${BENCH_WORKDIR:-/var/tmp}/hapair-bench.XXXXXX")
RES=$WORK/results LOGS=$WORK/logs
mkdir -p "$RES" "$LOGS"
ID=$$
NS=hpbench$ID                      # network namespace of the mirrors
VETH_H=hpb${ID}h VETH_M=hpb${ID}m  # veth ends: host side, mirror side
SUB=$(( ID % 250 + 1 ))
IP_H=10.210.$SUB.1 IP_M=10.210.$SUB.2
VOL=hpbench$ID                     # gluster volume
GL="gluster --mode=script"
STARTED_PIDS=()                    # every long-running process this run started
MOUNTS=()                          # every mount point this run created
NS_MADE=0 GLUSTERD_STARTED=0 VOL_MADE=0

kill_pid() {  # $1 pid: TERM, wait up to 15 s, then KILL
    local p=$1 i
    kill -0 "$p" 2>/dev/null || return 0
    kill -TERM "$p" 2>/dev/null
    for i in $(seq 150); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
}
is_mounted() { awk -v m="$1" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; }
cleanup() {
    local rc=$? m p i
    set +e
    trap - INT TERM
    [ $rc -ne 0 ] && say "stopping after an error or interruption (exit $rc); cleaning up"
    # hapair mounts unmount themselves on SIGTERM; bindfs runs in the foreground.
    for (( i=${#STARTED_PIDS[@]}-1; i>=0; i-- )); do kill_pid "${STARTED_PIDS[i]}"; done
    for m in "${MOUNTS[@]}"; do
        is_mounted "$m" || continue
        umount "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || umount -l "$m"
    done
    if [ $VOL_MADE = 1 ]; then
        timeout 60 $GL volume stop "$VOL" force >/dev/null 2>&1
        timeout 60 $GL volume delete "$VOL" >/dev/null 2>&1
    fi
    if [ $GLUSTERD_STARTED = 1 ] && [ -s "$WORK/glusterd.pid" ]; then
        kill_pid "$(cat "$WORK/glusterd.pid")"
    fi
    if [ $VOL_MADE = 1 ]; then
        # Bricks, self-heal daemon and client of our volume, if any survived
        # the volume stop: found by our unique volume name, stopped by PID.
        local cmd
        for p in /proc/[0-9]*; do
            cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) || continue
            [[ $cmd == *glusterfs*"$VOL"* ]] && kill_pid "${p#/proc/}"
        done
    fi
    if [ $NS_MADE = 1 ]; then
        ip link del "$VETH_H" 2>/dev/null
        ip netns del "$NS" 2>/dev/null
    fi
    if [ $KEEP = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
wait_for() {  # $1 timeout s, $2 description, rest: command
    local t=$1 what=$2 i; shift 2
    for i in $(seq $(( t * 10 ))); do "$@" && return 0; sleep 0.1; done
    echo "bench/run.sh: timed out after ${t}s waiting for $what" >&2
    return 1
}

# --- targets ---------------------------------------------------------------
declare -A DIR
setup_native() { DIR[native]=$WORK/native; mkdir -p "${DIR[native]}"; }

setup_bindfs() {
    mkdir -p "$WORK/bindfs-src" "$WORK/bindfs"
    bindfs -f -o big_writes "$WORK/bindfs-src" "$WORK/bindfs" 2>"$LOGS/bindfs.log" &
    STARTED_PIDS+=($!); MOUNTS+=("$WORK/bindfs")
    wait_for 20 "the bindfs mount" is_mounted "$WORK/bindfs"
    DIR[bindfs]=$WORK/bindfs
}

setup_gluster() {
    local G=$WORK/gluster
    mkdir -p "$G/b1" "$G/b2" "$WORK/gluster-mnt"
    if ! $GL volume list >/dev/null 2>&1; then
        say "starting glusterd"
        glusterd -p "$WORK/glusterd.pid" --log-file="$LOGS/glusterd.log"
        GLUSTERD_STARTED=1
        wait_for 30 "glusterd" $GL volume list >/dev/null 2>&1
    fi
    # The gluster CLI refuses localhost/127.0.0.1 as brick host: 127.0.0.2 is loopback too.
    $GL volume create "$VOL" replica 2 127.0.0.2:"$G/b1" 127.0.0.2:"$G/b2" force >/dev/null
    VOL_MADE=1
    $GL volume start "$VOL" >/dev/null
    MOUNTS+=("$WORK/gluster-mnt")
    wait_for 30 "the gluster mount" mount -t glusterfs 127.0.0.2:/"$VOL" "$WORK/gluster-mnt"
    DIR[gluster]=$WORK/gluster-mnt
}

setup_netns() {
    ip netns add "$NS"; NS_MADE=1
    ip link add "$VETH_H" type veth peer name "$VETH_M" netns "$NS"
    ip addr add "$IP_H/24" dev "$VETH_H"
    ip link set "$VETH_H" up
    ip -n "$NS" addr add "$IP_M/24" dev "$VETH_M"
    ip -n "$NS" link set "$VETH_M" up
    ip -n "$NS" link set lo up
    if has_hapair || has floor; then
        if [ -n "${BIN:-}" ]; then
            "$BIN" tls init "$WORK/tls" --nodes n1,n2 >/dev/null
        else
            # No hapair target: the cluster's certificates from a build of it.
            (cd "$ROOT" && cargo build --release -q -p hapair)
            "$ROOT/target/release/hapair" tls init "$WORK/tls" --nodes n1,n2 >/dev/null
        fi
    fi
}

FLOOR_PORT=7702
# b with 4 jobs on the floor: 4 clients, each with its own server (a server
# answers one datagram at a time), file and port.
FLOOR4_PORTS=(7710 7711 7712 7713)
floor_listening() { ip netns exec "$NS" ss -Hlun "sport = :$1" | grep -q .; }
setup_floor() {
    cc -O2 -o "$WORK/repl_floor" "$BENCH/repl_floor.c"
    mkdir -p "$WORK/floor" "$WORK/floor-mirror"
    local port i=0
    for port in "$FLOOR_PORT" "${FLOOR4_PORTS[@]}"; do
        ip netns exec "$NS" "$WORK/repl_floor" server "$WORK/floor-mirror/copy$i" "$IP_M" "$port" \
            2>>"$LOGS/floor-server.log" &
        STARTED_PIDS+=($!)
        i=$((i + 1))
    done
    for port in "$FLOOR_PORT" "${FLOOR4_PORTS[@]}"; do
        wait_for 60 "the floor server on port $port" floor_listening "$port"
    done
    DIR[floor]=$WORK/floor
}

declare -A MOUNT_PID MIRROR_PID STATE_DIR
replicating() {
    grep -q '"state": *"replicating"' "$1/status.json" 2>/dev/null &&
        grep -q '"serving": *true' "$1/status.json"
}
setup_hapair() {  # $1 target (hapair | hapair-strict), $2 mode, $3 port
    local t=$1 mode=$2 port=$3 d=$WORK/$1 mir=$WORK/$1-mirror st=$WORK/$1-state
    mkdir -p "$d" "$mir"
    # ip netns exec execs the command itself: $! is the mirror's own PID.
    ip netns exec "$NS" "$BIN" mirror --listen "$IP_M:$port" --tls "$WORK/tls" --node n2 "$mir" \
        2>"$LOGS/$t-mirror.log" &
    MIRROR_PID[$t]=$!; STARTED_PIDS+=($!)
    wait_for 20 "the $t mirror" grep -q "mirror listening" "$LOGS/$t-mirror.log"
    "$BIN" mount --peer "$IP_M:$port" --peer-node n2 --tls "$WORK/tls" --node n1 --mode "$mode" \
        --state-dir "$st" "$d" 2>"$LOGS/$t-mount.log" &
    MOUNT_PID[$t]=$!; STARTED_PIDS+=($!); MOUNTS+=("$d")
    wait_for 30 "the $t mount" is_mounted "$d"
    wait_for 30 "$t to replicate" replicating "$st"
    STATE_DIR[$t]=$st
    DIR[$t]=$d
}

# --- replication cost ------------------------------------------------------
CLK=$(getconf CLK_TCK)
cpu_s() { awk -v clk="$CLK" '{ printf "%.3f", ($14 + $15) / clk }' "/proc/$1/stat"; }
net_bytes() { cat "/sys/class/net/$VETH_H/statistics/$1_bytes"; }
SNAP=()
snap() {  # $1 target
    SNAP=("$(net_bytes tx)" "$(net_bytes rx)" "$(cpu_s "${MOUNT_PID[$1]}")" "$(cpu_s "${MIRROR_PID[$1]}")")
}
cost() {  # $1 target $2 workload $3 rep $4 bytes the application wrote
    local t=$1 tx rx cm cr ok=false
    tx=$(( $(net_bytes tx) - SNAP[0] )); rx=$(( $(net_bytes rx) - SNAP[1] ))
    cm=$(awk -v a="$(cpu_s "${MOUNT_PID[$t]}")" -v b="${SNAP[2]}" 'BEGIN { printf "%.3f", a - b }')
    cr=$(awk -v a="$(cpu_s "${MIRROR_PID[$t]}")" -v b="${SNAP[3]}" 'BEGIN { printf "%.3f", a - b }')
    replicating "${STATE_DIR[$t]}" && ok=true
    [ $ok = true ] || say "WARNING: $t is no longer replicating after $2 (see $LOGS/$t-mount.log)"
    printf '{"target":"%s","workload":"%s","rep":%s,"app_bytes":%s,"wire_tx":%s,"wire_rx":%s,"cpu_mount_s":%s,"cpu_mirror_s":%s,"replicating":%s}\n' \
        "$t" "$2" "$3" "$4" "$tx" "$rx" "$cm" "$cr" "$ok" >> "$RES/cost.jsonl"
}

# --- workloads ---------------------------------------------------------------
FIO="timeout 900 fio --ioengine=psync --output-format=json"
io_bytes() { "$PY" -c 'import json,sys; t=open(sys.argv[1]).read(); print(json.loads(t[t.index("{"):])["jobs"][0]["write"]["io_bytes"])' "$1"; }
is_hapair() { case $1 in hapair|hapair-strict) return 0 ;; esac; return 1; }
begin() { is_hapair "$1" && snap "$1"; return 0; }
end() { is_hapair "$1" && cost "$@"; return 0; }

# Each workload on one target, repetition $2. Every figure of one workload
# is measured for all targets in a row (see the run below), so that a ratio
# compares figures taken minutes apart at most, not a whole repetition apart.
seq_write_read() {  # $1 target, $2 rep: a, then d on the file a wrote
    local t=$1 r=$2 D=${DIR[$1]} O=$RES/$1
    say "[$t] rep $r: a sequential write $SEQ"
    rm -f "$D/seq.dat"; drop_caches
    begin "$t"
    $FIO --name=seqwrite --directory="$D" --filename=seq.dat --rw=write --bs=1M --size="$SEQ" \
        --end_fsync=1 > "$O/seqwrite.$r.json"
    end "$t" seqwrite "$r" "$(io_bytes "$O/seqwrite.$r.json")"
    if [ "$t" != hapair-strict ]; then
        say "[$t] rep $r: d cold sequential read"
        drop_caches
        begin "$t"
        $FIO --name=seqread --directory="$D" --filename=seq.dat --rw=read --bs=1M --size="$SEQ" \
            > "$O/seqread.$r.json"
        end "$t" seqread "$r" 0
    fi
    rm -f "$D/seq.dat"
}

rand_fsync() {  # $1 target, $2 rep, $3 jobs: b
    local t=$1 r=$2 jobs=$3 D=${DIR[$1]} O=$RES/$1 name=randfsync
    [ "$jobs" = 4 ] && name=randfsync4
    if [ "$t" = floor ] && [ "$jobs" = 1 ]; then
        say "[$t] rep $r: b 4 KiB write + fsync, 1 job, with no software in between"
        timeout 300 "$WORK/repl_floor" client "$D/copy" "$IP_M" "$FLOOR_PORT" "$B_IOS" \
            > "$O/randfsync.$r.json"
        return 0
    fi
    if [ "$t" = floor ]; then
        say "[$t] rep $r: b 4 KiB write + fsync, 4 clients at once, with no software in between"
        local i cpids=()
        for i in 0 1 2 3; do
            timeout 300 "$WORK/repl_floor" client "$D/copy4-$i" "$IP_M" "${FLOOR4_PORTS[i]}" \
                "$B_IOS" > "$O/randfsync4-$i.$r.tmp" &
            cpids+=($!)
        done
        for i in "${cpids[@]}"; do wait "$i"; done
        # One fio-like result: the clients' IOPS summed, their latencies'
        # medians.
        "$PY" "$BENCH/report.py" --merge-floor "$O" "$r"
        rm -f "$O"/randfsync4-*."$r".tmp
        return 0
    fi
    say "[$t] rep $r: b 4 KiB write + fsync, $jobs job(s)"
    local args=(--name=$name --directory="$D" --rw=randwrite --bs=4k --size=64M --overwrite=1
                --fsync=1 --number_ios="$B_IOS" --runtime=30 --randrepeat=0
                --numjobs=$jobs --group_reporting)
    # Lay the files out first (not timed, not counted), and make them
    # durable so that the timed part starts from a quiet pipeline.
    $FIO "${args[@]}" --create_only=1 > /dev/null
    sync "$D"/$name.*
    begin "$t"
    $FIO "${args[@]}" > "$O/$name.$r.json"
    end "$t" $name "$r" "$(io_bytes "$O/$name.$r.json")"
    rm -f "$D"/$name.*
}

QUIC_FLOOR_PORT=7704
quic_floor_listening() { ip netns exec "$NS" ss -Hlun "sport = :$QUIC_FLOOR_PORT" | grep -q .; }
transport_floor() {  # $1 rep: the transport alone (quic_floor), on the floor target
    local r=$1 O=$RES/floor p
    say "[floor] rep $r: the transport alone, $T_ROUNDS round trips and $T_MIB MiB"
    ip netns exec "$NS" "$QUIC_FLOOR" server "$WORK/tls" n2 "$IP_M:$QUIC_FLOOR_PORT" \
        2>>"$LOGS/quic-floor-server.log" &
    p=$!; STARTED_PIDS+=($p)
    wait_for 30 "the transport floor server" quic_floor_listening
    timeout 600 "$QUIC_FLOOR" client "$WORK/tls" n1 "$IP_M:$QUIC_FLOOR_PORT" n2 \
        "$T_ROUNDS" "$T_MIB" > "$O/transport.$r.json"
    # The server ends after one client; reap it here, so that its PID can
    # be neither signalled by the cleanup nor reused meanwhile.
    kill_pid "$p"; wait "$p" 2>/dev/null || true
    local keep=() q
    for q in "${STARTED_PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
    STARTED_PIDS=("${keep[@]}")
}

small_files() {  # $1 target, $2 rep: c
    local t=$1 r=$2 D=${DIR[$1]} O=$RES/$1
    say "[$t] rep $r: c $C_FILES small files"
    drop_caches
    begin "$t"
    timeout 1800 "$PY" "$BENCH/smallfiles.py" "$D/small.$r" "$C_FILES" 4096 > "$O/smallfiles.$r.json"
    end "$t" smallfiles "$r" $(( C_FILES * 4096 ))
    rm -rf "$D/small.$r"
}

# Which workloads run on which target: the floor measures b (1 job) only,
# strict mode a and b (1 job).
runs_on() {  # $1 workload, $2 target
    case $1:$2 in
        b1:*) return 0 ;;
        t:floor|b4:floor) return 0 ;;
        t:*|*:floor) return 1 ;;
        b4:hapair-strict|c:hapair-strict) return 1 ;;
    esac
    return 0
}

# CPU time the host took from this machine (steal, in a virtual machine)
# while each target ran: a noisy neighbour shows here, not only in the figures.
cpu_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $9 }' /proc/stat; }
measure() {  # $1 workload, $2 target, $3 rep
    local t0 s0 t1 s1
    mkdir -p "$RES/$2"
    read -r t0 s0 < <(cpu_ticks)
    case $1 in
        ad) seq_write_read "$2" "$3" ;;
        b1) rand_fsync "$2" "$3" 1 ;;
        b4) rand_fsync "$2" "$3" 4 ;;
        c)  small_files "$2" "$3" ;;
        t)  transport_floor "$3" ;;
    esac
    read -r t1 s1 < <(cpu_ticks)
    printf '{"target":"%s","workload":"%s","rep":%s,"ticks":%s,"steal":%s}\n' \
        "$2" "$1" "$3" $((t1 - t0)) $((s1 - s0)) >> "$RES/steal.jsonl"
}

# --- the run ------------------------------------------------------------------
say "work directory $WORK ($(stat -f -c %T "$WORK"), $(df --output=source "$WORK" | tail -1))"
setup_native
has bindfs && setup_bindfs
has gluster && setup_gluster
needs_netns && setup_netns
has hapair && setup_hapair hapair sync 7700
has hapair-strict && setup_hapair hapair-strict strict 7701
has floor && setup_floor
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
say "load average before: $LOAD_BEFORE"
REVERSED=$(printf '%s\n' $TARGETS | tac | tr '\n' ' ')
for r in $(seq "$REPS"); do
    if [ $((r % 2)) = 1 ]; then ORDER=$TARGETS; else ORDER=$REVERSED; fi
    for w in ad b1 b4 c t; do
        for t in $ORDER; do
            if runs_on "$w" "$t"; then measure "$w" "$t" "$r"; fi
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# Peak memory of every hapair process over the whole run.
{
    sep=""
    printf '{'
    for t in "${!MOUNT_PID[@]}"; do
        for role in mount mirror; do
            if [ $role = mount ]; then p=${MOUNT_PID[$t]}; else p=${MIRROR_PID[$t]}; fi
            kib=$(awk '/^VmHWM:/ { print $2 }' "/proc/$p/status")
            printf '%s"%s %s":%s' "$sep" "$t" "$role" "$kib"; sep=,
        done
    done
    printf '}\n'
} > "$RES/rss.json"

GLUSTER_V="" FIO_V=$(fio --version)
has gluster && GLUSTER_V=$(gluster --version | head -1)
"$PY" - "$RES/meta.json" <<EOF
import json, sys
json.dump({
    "date": "$(date -u +%Y-%m-%dT%H:%MZ)", "mode": "$MODE", "reps": $REPS,
    "seq_size": "$SEQ", "b_ios": $B_IOS, "c_files": $C_FILES, "c_size": 4096,
    "kernel": "$(uname -r)", "fio": "$FIO_V", "gluster": "$GLUSTER_V",
    "hapair": "$HAPAIR_REV", "cpus": "$(nproc)",
    "load_before": "$LOAD_BEFORE", "load_after": "$LOAD_AFTER",
}, open(sys.argv[1], "w"), indent=1)
EOF
"$PY" "$BENCH/report.py" "$RES" > "$RES/report.md"
echo
cat "$RES/report.md"
if [ -n "$OUT" ]; then cp "$RES/report.md" "$OUT"; say "report saved to $OUT"; fi
say "done in $(( $(date +%s) - T0 )) s"
if [ "$MODE" = selftest ]; then
    # The bench itself works: every target produced every figure it should.
    "$PY" - "$RES" <<'EOF'
import glob, os, sys
res = sys.argv[1]
want = ["seqwrite", "seqread", "randfsync", "randfsync4", "smallfiles"]
bad = [f"{t}/{w}" for t in ("native", "hapair") for w in want
       if not glob.glob(os.path.join(res, t, f"{w}.1.json"))]
if not glob.glob(os.path.join(res, "floor", "randfsync.1.json")):
    bad.append("floor/randfsync")
for w in ("transport", "randfsync4"):
    if not glob.glob(os.path.join(res, "floor", f"{w}.1.json")):
        bad.append(f"floor/{w}")
if bad:
    sys.exit(f"selftest: missing results: {bad}")
print("selftest: every workload produced results on native and hapair, and b, b with 4 jobs and the transport on floor")
EOF
fi
