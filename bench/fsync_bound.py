#!/usr/bin/env python3
"""What a replicated 4 KiB write + fsync can reach at best on this disk.

    python3 bench/fsync_bound.py [DIR] [--reps N] [--ios N]

Interleaves, REPS times, two loops of IOS operations on 64 MiB files in DIR
(default /var/tmp):
  native      pwrite 4 KiB at a random block, fsync (workload b, one copy);
  two copies  the same write into two files (the primary's and the mirror's
              copy, on the same disk as in the bench), then both fsynced at
              once (a helper thread syncs the second), the op ending when
              both are done: a replication with no FUSE, no network and no
              software cost at all.
Prints IOPS and the ratio of each repetition and the median ratio. The
Python loop adds the same few tens of microseconds to each op of both
loops, which brings the ratio closer to 1: the true bound is at or below
what this prints. Removes its files on exit.
"""
import argparse, os, random, statistics, sys, threading, time

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("dir", nargs="?", default="/var/tmp")
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--ios", type=int, default=2000)
a = ap.parse_args()
if a.reps < 1 or a.ios < 1:
    sys.exit("fsync_bound.py: --reps and --ios must be positive")

BLOCKS = (64 << 20) // 4096
paths = [os.path.join(a.dir, f"fsync-bound.{os.getpid()}.{i}") for i in (0, 1)]
fds = []
try:
    for p in paths:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fds.append(fd)
        for off in range(0, 64 << 20, 1 << 20):
            os.pwrite(fd, os.urandom(1 << 20), off)
        os.fsync(fd)
    A, B = fds
    buf = os.urandom(4096)
    go, done = threading.Semaphore(0), threading.Semaphore(0)
    stop = False
    errors = []

    def helper():
        while True:
            go.acquire()
            if stop:
                return
            try:
                os.fsync(B)
            except OSError as e:
                errors.append(e)
            done.release()

    t = threading.Thread(target=helper, daemon=True)
    t.start()

    def native(n):
        t0 = time.perf_counter()
        for _ in range(n):
            os.pwrite(A, buf, random.randrange(BLOCKS) * 4096)
            os.fsync(A)
        return n / (time.perf_counter() - t0)

    def two_copies(n):
        t0 = time.perf_counter()
        for _ in range(n):
            off = random.randrange(BLOCKS) * 4096
            os.pwrite(A, buf, off)
            os.pwrite(B, buf, off)
            go.release()
            os.fsync(A)
            done.acquire()
        if errors:
            raise errors[0]
        return n / (time.perf_counter() - t0)

    ratios = []
    for r in range(1, a.reps + 1):
        n, c = native(a.ios), two_copies(a.ios)
        ratios.append(c / n)
        print(f"rep {r}: native {n:.0f} IOPS, two copies {c:.0f} IOPS, ratio {c / n:.2f}")
    print(f"median ratio two copies / native: {statistics.median(ratios):.2f}")
    stop = True
    go.release()
    t.join(timeout=10)
finally:
    for fd in fds:
        os.close(fd)
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
