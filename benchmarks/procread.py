"""Cost of reading one process for an event: ``read_process`` plus its ancestors.

What the event path does per attributed attempt once the socket's owner is
known (the packet is held meanwhile). Runs against this host's real /proc:
the benchmark's own process tree (a shell pipeline a few levels deep), no
root needed. Prints the median and p95 per call.

    .venv/bin/python benchmarks/procread.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from imdsguard.events.procfs import ancestors, read_process


def main() -> int:
    """Time ``read_process(pid)`` + ``ancestors`` for this process, ``--rounds`` times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    pid = os.getpid()
    times = []
    depth = 0
    for _ in range(args.rounds):
        start = time.perf_counter()
        info = read_process(pid)
        assert info is not None
        depth = len(ancestors(info))
        times.append(time.perf_counter() - start)
    times.sort()
    p50 = statistics.median(times) * 1e6
    p95 = times[int(len(times) * 0.95)] * 1e6
    print(f"read_process + ancestors ({depth} ancestors), {args.rounds} rounds: "
          f"p50 {p50:.0f} us, p95 {p95:.0f} us")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
