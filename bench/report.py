#!/usr/bin/python3
"""Summarises one run of bench/run.sh: medians over repetitions, ratios
computed within the run, the issue's targets, and the replication cost.

Usage: report.py RESULTS_DIR        (prints Markdown on stdout)
       report.py --merge-floor DIR REP   (the floor's 4 clients as one result)

RESULTS_DIR holds what run.sh wrote:
  meta.json                 run parameters and machine state
  <target>/<workload>.<rep>.json   fio JSON (a, b, b4, d) or smallfiles.py JSON (c)
  cost.jsonl                one line per hapair workload: wire bytes and CPU
  rss.json                  peak RSS of every hapair process
  steal.jsonl               one line per target, workload and repetition: CPU
                            ticks of the machine and those the host stole
  floor/transport.<rep>.json   quic_floor's figures (the transport alone)
"""
import glob
import json
import math
import os
import statistics
import sys

LABELS = {
    "native": "native ext4",
    "bindfs": "bindfs -o big_writes",
    "gluster": "GlusterFS replica 2",
    "hapair": "hapair sync",
    "hapair-strict": "hapair strict",
    "floor": "replication floor (no software)",
}
ORDER = ["native", "bindfs", "gluster", "hapair", "hapair-strict", "floor"]
NAN = float("nan")
MIB = 1 << 20
GIB = 1 << 30


def load_json(path):
    """fio may print warnings before its JSON: start at the first brace."""
    try:
        with open(path) as f:
            txt = f.read()
    except OSError:
        return None
    i = txt.find("{")
    if i < 0:
        return None
    try:
        return json.loads(txt[i:])
    except ValueError:
        return None


def med(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else NAN


def reps(d, wl):
    out = []
    for p in sorted(glob.glob(os.path.join(d, f"{wl}.*.json"))):
        x = load_json(p)
        if x is not None:
            out.append(x)
    return out


def pct(section, key, q):
    try:
        return section[key]["percentile"][q] / 1000.0
    except (KeyError, TypeError):
        return NAN


def fio_job(x):
    try:
        return x["jobs"][0]
    except (KeyError, IndexError, TypeError):
        return None


def seqwrite_mibs(j):
    # Includes the final fsync (end_fsync=1): bytes over the job's runtime.
    rt = j.get("job_runtime", 0)
    return j["write"]["io_bytes"] / MIB / (rt / 1000.0) if rt else NAN


def summarise_target(d):
    r = {}
    sw = [j for j in map(fio_job, reps(d, "seqwrite")) if j]
    sr = [j for j in map(fio_job, reps(d, "seqread")) if j]
    rw = [j for j in map(fio_job, reps(d, "randfsync")) if j]
    rw4 = [j for j in map(fio_job, reps(d, "randfsync4")) if j]
    sf = reps(d, "smallfiles")
    r["a"] = [seqwrite_mibs(j) for j in sw]
    r["d"] = [j["read"]["bw_bytes"] / MIB for j in sr]
    r["b"] = [j["write"]["iops"] for j in rw]
    r["b_p50"] = [pct(j.get("sync"), "lat_ns", "50.000000") for j in rw]
    r["b_p99"] = [pct(j.get("sync"), "lat_ns", "99.000000") for j in rw]
    r["b4"] = [j["write"]["iops"] for j in rw4]
    r["b4_p50"] = [pct(j.get("sync"), "lat_ns", "50.000000") for j in rw4]
    r["c_create"] = [x["create_fps"] for x in sf]
    r["c_stat"] = [x["stat_fps"] for x in sf]
    r["c_unlink"] = [x["unlink_fps"] for x in sf]
    r["c_sync_s"] = [x["sync_s"] for x in sf]
    return r


def transport_figures(root):
    """Medians of quic_floor's figures over the repetitions, or None."""
    xs = reps(os.path.join(root, "floor"), "transport")
    if not xs:
        return None
    def m(f):
        vals = []
        for x in xs:
            try:
                vals.append(float(f(x)))
            except (KeyError, TypeError, ValueError):
                pass
        return med(vals)
    return {
        "udp50": m(lambda x: x["udp_rtt_us"]["p50"]),
        "udp99": m(lambda x: x["udp_rtt_us"]["p99"]),
        "quic50": m(lambda x: x["quic_rtt_us"]["p50"]),
        "quic99": m(lambda x: x["quic_rtt_us"]["p99"]),
        "mibs": m(lambda x: x["bulk_mib_s"]),
        "cpu_tx": m(lambda x: x["bulk_cpu_s_per_gib"]["client"]),
        "cpu_rx": m(lambda x: x["bulk_cpu_s_per_gib"]["server"]),
    }


def fmt(x, nd=0):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def cell(vals, nd=0):
    """Median, with every repetition in brackets when there are several."""
    m = med(vals)
    if len(vals) > 1:
        return f"{fmt(m, nd)} [{', '.join(fmt(v, nd) for v in vals)}]"
    return fmt(m, nd)


COLS = [
    ("a", "a seq write MiB/s (end_fsync)"),
    ("d", "d cold seq read MiB/s"),
    ("b", "b 4k write+fsync IOPS"),
    ("b_lat", "b fsync p50/p99 µs"),
    ("b4", "b 4 jobs IOPS (total)"),
    ("c_create", "c creates/s"),
    ("c_stat", "c stat/s"),
    ("c_unlink", "c unlink/s"),
]


def ratio(a, b):
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return NAN
    return a / b


def steal_by_target(root):
    """{target: [steal % of each repetition, over all its workloads]} from
    steal.jsonl, if any."""
    try:
        with open(os.path.join(root, "steal.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return {}
    sums = {}
    for r in rows:
        k = (r.get("target"), r.get("rep", 0))
        ticks, stolen = sums.get(k, (0, 0))
        sums[k] = (ticks + r.get("ticks", 0), stolen + r.get("steal", 0))
    out = {}
    for (t, _), (ticks, stolen) in sorted(sums.items(), key=lambda kv: kv[0][1]):
        if ticks > 0:
            out.setdefault(t, []).append(100.0 * stolen / ticks)
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: report.py RESULTS_DIR")
    root = sys.argv[1]
    meta = load_json(os.path.join(root, "meta.json")) or {}
    targets = [t for t in ORDER if os.path.isdir(os.path.join(root, t))]
    res = {t: summarise_target(os.path.join(root, t)) for t in targets}
    m = {t: {k: med(v) for k, v in res[t].items()} for t in targets}
    out = []
    p = out.append

    mode = meta.get("mode", "?")
    p(f"## hapair bench — {meta.get('date', '?')}, {mode} run")
    if mode != "full":
        p("")
        p(f"**{mode.upper()} RUN**: smaller sizes and {meta.get('reps', '?')} repetition(s); "
          "the figures are indicative only, not comparable with BENCHMARKS.md.")
    p("")
    p(f"- sizes: a/d {meta.get('seq_size', '?')}, b {meta.get('b_ios', '?')} I/Os per job, "
      f"c {meta.get('c_files', '?')} files of {meta.get('c_size', '?')} B; "
      f"{meta.get('reps', '?')} repetition(s), each workload on every target in turn (in reverse in even repetitions), medians shown")
    for k in ("kernel", "fio", "gluster", "hapair", "cpus", "load_before", "load_after"):
        if k in meta:
            p(f"- {k.replace('_', ' ')}: {meta[k]}")
    steal = steal_by_target(root)
    if steal:
        p("- CPU time the host took from this machine while each target ran "
          "(steal, % of the machine's CPU time, each repetition): "
          + "; ".join(f"{LABELS.get(t, t)} " + ", ".join(fmt(x, 1) for x in steal[t])
                      for t in ORDER if t in steal))
    p("")
    p("### Absolute figures (median [each repetition])")
    p("")
    p("| target | " + " | ".join(c[1] for c in COLS) + " |")
    p("|---|" + "---|" * len(COLS))
    for t in targets:
        r = res[t]
        cells = []
        for k, _ in COLS:
            if k == "b_lat":
                cells.append(f"{fmt(med(r['b_p50']))} / {fmt(med(r['b_p99']))}")
            else:
                cells.append(cell(r[k]))
        p(f"| {LABELS[t]} | " + " | ".join(cells) + " |")
    p("")

    # Ratios within this run.
    pairs = [("hapair", "native"), ("hapair", "gluster"), ("hapair", "bindfs"),
             ("hapair-strict", "native"), ("hapair-strict", "hapair"),
             ("hapair", "floor"), ("floor", "native"), ("floor", "gluster")]
    keys = ["a", "d", "b", "b4", "c_create", "c_stat", "c_unlink"]
    p("### Ratios (same run)")
    p("")
    p("| ratio | " + " | ".join(dict(COLS)[k] for k in keys) + " |")
    p("|---|" + "---|" * len(keys))
    for x, y in pairs:
        if x in m and y in m:
            p(f"| {LABELS[x]} / {LABELS[y]} | "
              + " | ".join(fmt(ratio(m[x][k], m[y][k]), 2) for k in keys) + " |")
    p("")

    # The targets.
    h = m.get("hapair", {})
    def get(t, k):
        return m.get(t, {}).get(k, NAN)
    rss = load_json(os.path.join(root, "rss.json")) or {}
    peak_kib = max([v for v in rss.values() if isinstance(v, (int, float))] or [NAN])
    checks = [
        ("a ≥ 0.40 × native", ratio(h.get("a"), get("native", "a")), 0.40),
        ("a ≥ 1.5 × GlusterFS", ratio(h.get("a"), get("gluster", "a")), 1.5),
        ("b ≥ 3 × GlusterFS", ratio(h.get("b"), get("gluster", "b")), 3.0),
        ("b ≥ 0.40 × native", ratio(h.get("b"), get("native", "b")), 0.40),
        ("b 4 jobs ≥ 2 × b 1 job", ratio(h.get("b4"), h.get("b")), 2.0),
        ("c creates ≥ 5 × GlusterFS", ratio(h.get("c_create"), get("gluster", "c_create")), 5.0),
        ("c creates ≥ 0.8 × bindfs", ratio(h.get("c_create"), get("bindfs", "c_create")), 0.8),
        ("c stat ≥ bindfs", ratio(h.get("c_stat"), get("bindfs", "c_stat")), 1.0),
        ("d cold read ≥ bindfs", ratio(h.get("d"), get("bindfs", "d")), 1.0),
        ("strict a ≥ 0.30 × native", ratio(get("hapair-strict", "a"), get("native", "a")), 0.30),
    ]
    p("### Targets of issue 3 (hapair sync unless said)")
    p("")
    p("| target | measured | holds |")
    p("|---|---|---|")
    for name, v, lim in checks:
        ok = "–" if math.isnan(v) else ("yes" if v >= lim else "**no**")
        p(f"| {name} | {fmt(v, 2)} | {ok} |")
    mem_ok = "–" if math.isnan(peak_kib) else ("yes" if peak_kib <= 128 * 1024 else "**no**")
    p(f"| peak RSS of every hapair process ≤ 128 MiB | {fmt(peak_kib / 1024, 1)} MiB | {mem_ok} |")
    p("")
    if "floor" in m:
        fb = get("floor", "b")
        p("### Workload b against the replication floor (same run)")
        p("")
        p("The floor (bench/repl_floor.c) replicates each 4 KiB write + fsync over the "
          "same veth and disk with no FUSE, no QUIC and no threads: one UDP datagram each "
          "way. No replicated mount can beat it here; a b target above it cannot hold on "
          "this machine.")
        p("")
        p("| figure | value |")
        p("|---|---|")
        p(f"| floor IOPS | {fmt(fb)} |")
        p(f"| floor / native | {fmt(ratio(fb, get('native', 'b')), 2)} (target for hapair: 0.40) |")
        p(f"| floor / GlusterFS | {fmt(ratio(fb, get('gluster', 'b')), 2)} (target for hapair: 3) |")
        p(f"| hapair sync / floor | {fmt(ratio(h.get('b'), fb), 2)} |")
        p(f"| floor, 4 clients at once / 1 client | {fmt(ratio(get('floor', 'b4'), fb), 2)} "
          f"(target for hapair's 4 jobs / 1 job: 2; hapair: "
          f"{fmt(ratio(h.get('b4'), h.get('b')), 2)}) |")
        p("")
    tr = transport_figures(root)
    if tr:
        na, nb = get("native", "a"), get("native", "b")
        p("### The transport alone (same veth, same run)")
        p("")
        p("crates/transport/examples/quic_floor.rs: a 4 KiB message and a 60-byte answer, "
          "in hapair's QUIC (mutual TLS, one stream, everything on one runtime thread at "
          "each end) and in plain UDP datagrams; then a bulk transfer in 1 MiB frames, "
          "with nothing written to disk.")
        p("")
        p("| figure | value |")
        p("|---|---|")
        p(f"| round trip p50 / p99, UDP | {fmt(tr['udp50'])} / {fmt(tr['udp99'])} µs |")
        p(f"| round trip p50 / p99, QUIC | {fmt(tr['quic50'])} / {fmt(tr['quic99'])} µs "
          f"(QUIC adds {fmt(tr['quic50'] - tr['udp50'])} µs at p50) |")
        p(f"| bulk transfer | {fmt(tr['mibs'])} MiB/s, {fmt(tr['cpu_tx'], 2)} + "
          f"{fmt(tr['cpu_rx'], 2)} CPU s per GiB (sender + receiver) |")
        p(f"| bulk transfer / native a | {fmt(ratio(tr['mibs'], na), 2)} "
          f"(target for hapair's a, which also writes both copies: 0.40) |")
        # What b can reach at best: the floor's operation, plus what QUIC adds
        # to its round trip, plus the FUSE work that cannot overlap the
        # mirror's part (the write reaching the mount and the fsync's answer
        # reaching the application: half of what bindfs adds to native).
        fb, bb = get("floor", "b"), get("bindfs", "b")
        if not any(math.isnan(x) or x <= 0 for x in (fb, bb, nb)):
            t = 1e6 / fb + (tr["quic50"] - tr["udp50"]) + 0.5 * (1e6 / bb - 1e6 / nb)
            bound = 1e6 / t
            p(f"| bound on b: floor + QUIC's extra round trip + half of FUSE's cost "
              f"(bindfs − native) | {fmt(bound)} IOPS, {fmt(ratio(bound, nb), 2)} × native "
              f"(target: 0.40), {fmt(ratio(bound, get('gluster', 'b')), 2)} × GlusterFS "
              f"(target: 3) |")
        p("")

    # Replication cost.
    costs = []
    try:
        with open(os.path.join(root, "cost.jsonl")) as f:
            costs = [json.loads(line) for line in f if line.strip()]
    except OSError:
        pass
    if costs:
        p("### Replication cost (hapair processes; wire = both directions on the veth)")
        p("")
        p("| mode | workload | app bytes written | wire bytes / app byte | "
          "CPU s mount + mirror | CPU s per GiB written | still replicating |")
        p("|---|---|---|---|---|---|---|")
        names = {"seqwrite": "a", "seqread": "d", "randfsync": "b",
                 "randfsync4": "b 4 jobs", "smallfiles": "c"}
        for t in ("hapair", "hapair-strict"):
            for wl in ("seqwrite", "seqread", "randfsync", "randfsync4", "smallfiles"):
                rows = [c for c in costs if c["target"] == t and c["workload"] == wl]
                if not rows:
                    continue
                app = med([c["app_bytes"] for c in rows])
                wire = med([c["wire_tx"] + c["wire_rx"] for c in rows])
                cpu_m = med([c["cpu_mount_s"] for c in rows])
                cpu_r = med([c["cpu_mirror_s"] for c in rows])
                per_gib = ratio(cpu_m + cpu_r, app / GIB) if app else NAN
                ok = all(c.get("replicating", False) for c in rows)
                p(f"| {t.replace('hapair-', '').replace('hapair', 'sync')} | {names[wl]} | "
                  f"{fmt(app / MIB, 1)} MiB | {fmt(ratio(wire, app), 3) if app else fmt(wire / MIB, 2) + ' MiB total'} | "
                  f"{fmt(cpu_m, 2)} + {fmt(cpu_r, 2)} | {fmt(per_gib, 2)} | "
                  f"{'yes' if ok else '**no: degraded, figure invalid**'} |")
        p("")
    if rss:
        p("Peak RSS (VmHWM) over the whole bench: " + ", ".join(
            f"{k} {fmt(v / 1024, 1)} MiB" for k, v in sorted(rss.items())))
        p("")
    print("\n".join(out))


def merge_floor(o, r):
    """The floor's 4 clients of repetition r as one fio-like result: their
    IOPS summed, the medians of their latency percentiles."""
    jobs = [load_json(os.path.join(o, f"randfsync4-{i}.{r}.tmp")) for i in range(4)]
    jobs = [fio_job(j) for j in jobs]
    if any(j is None for j in jobs):
        sys.exit(f"report.py: a floor client of repetition {r} left no result in {o}")
    lat = {q: statistics.median(j["sync"]["lat_ns"]["percentile"][q] for j in jobs)
           for q in ("50.000000", "99.000000")}
    merged = {"jobs": [{
        "jobname": "repl_floor x4",
        "job_runtime": max(j["job_runtime"] for j in jobs),
        "write": {"iops": sum(j["write"]["iops"] for j in jobs),
                  "io_bytes": sum(j["write"]["io_bytes"] for j in jobs)},
        "sync": {"lat_ns": {"percentile": lat}},
    }]}
    with open(os.path.join(o, f"randfsync4.{r}.json"), "w") as f:
        json.dump(merged, f)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--merge-floor":
        merge_floor(sys.argv[2], sys.argv[3])
    else:
        main()
