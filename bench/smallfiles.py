#!/usr/bin/python3
"""Workload c of BENCHMARKS.md: N x (open O_CREAT, write SIZE bytes, close)
spread over 100 directories, then stat every file, then unlink everything.

Usage: smallfiles.py DIR N SIZE
Prints one JSON object: the rate of each phase (files per second) and the
time of the sync(2) that follows the creates (reported, not counted in the
create rate, as in the reference figures).
"""
import json
import os
import sys
import time

DIRS = 100


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: smallfiles.py DIR N SIZE")
    top, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if n < DIRS or size < 0:
        sys.exit(f"smallfiles.py: N must be at least {DIRS} and SIZE non-negative")
    os.makedirs(top, exist_ok=True)
    buf = os.urandom(size)
    t0 = time.perf_counter()
    for i in range(n):
        sub = os.path.join(top, "d%02d" % (i % DIRS))
        if i < DIRS:
            os.mkdir(sub)
        fd = os.open(os.path.join(sub, "f%06d" % i), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            if os.write(fd, buf) != size:
                sys.exit("smallfiles.py: short write")
        finally:
            os.close(fd)
    t1 = time.perf_counter()
    os.sync()
    t2 = time.perf_counter()
    count = 0
    for root, _dirs, files in os.walk(top):
        for f in files:
            os.stat(os.path.join(root, f))
            count += 1
    t3 = time.perf_counter()
    if count != n:
        sys.exit(f"smallfiles.py: found {count} files, expected {n}")
    for root, dirs, files in os.walk(top, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    t4 = time.perf_counter()
    print(json.dumps({
        "files": n,
        "size": size,
        "create_s": t1 - t0,
        "create_fps": n / (t1 - t0),
        "sync_s": t2 - t1,
        "stat_fps": count / (t3 - t2),
        "unlink_fps": n / (t4 - t3),
    }))


if __name__ == "__main__":
    main()
