"""Daemon memory under a sustained flood of blocked attempts (capture on, either backend).

In a throw-away EC2-like topology, runs the real daemon (enforce, reject,
root allowlisted) and lets it settle; its idle RSS is the median of a few
samples. Then ``--clients`` processes as ``nobody`` (denied) each open a new
TCP connection to 169.254.169.254 in a loop for ``--seconds`` (60), with
``--sleep`` (5 ms) between attempts: every attempt is a new socket, so each
one is queued, attributed and refused. The daemon's RSS is sampled every
second. The memory slope (MiB per minute) is the least-squares fit over the
flood after a warm-up (``--warmup``, 10 s): each refused socket stays in the
capture's flow table for 5 s (to fold retransmits), so RSS first climbs to
the steady-state table size; after that it must be flat. The slope over the
whole flood, warm-up included, is printed too. Events
logged versus suppressed by the per-(uid, exe) rate limit come from the
capture's counters in the daemon's final ``daemon_stopped`` log line.
``--backend nftables`` on a kernel without ``nft_queue`` floods the NFLOG
capture instead (nothing held: each attempt is refused at once).

Prints the figures and a markdown table row for docs/benchmarks.md. Exit status 1
when the slope exceeds ``--max-slope`` (1 MiB/min) or an attempt got through.

    sudo .venv/bin/python benchmarks/flood.py [--seconds 60] [--clients 4] [--sleep 0.005]
        [--backend iptables|nftables]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from _proc import rss_kib

from imdsguard_testing.bench import guard_work, not_root
from imdsguard_testing.netns import IMDS_V4, Topology, User

NOBODY = User(65534, 65534)

#: argv: seconds, sleep. Connects to IMDS in a loop; prints one JSON line of counts.
CLIENT = r"""
import collections, json, socket, sys, time
end = time.monotonic() + float(sys.argv[1])
gap = float(sys.argv[2])
counts = collections.Counter()
while time.monotonic() < end:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((sys.argv[3], 80))
        counts["connected"] += 1  # must never happen: nobody is denied
    except ConnectionRefusedError:
        counts["refused"] += 1
    except socket.timeout:
        counts["timeout"] += 1
    except OSError as exc:
        counts[type(exc).__name__] += 1
    finally:
        s.close()
    time.sleep(gap)
print(json.dumps(counts))
"""


def slope_mib_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return 0.0
    ts = [t for t, _ in samples]
    ys = [kib / 1024 for _, kib in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return 0.0
    cov = sum((t - mt) * (y - my) for t, y in zip(ts, ys))
    return cov / var * 60


def _stopped_counters(log_path: str) -> dict[str, Any]:
    with open(log_path) as fh:
        for line in fh:
            if line.startswith("{") and '"daemon_stopped"' in line:
                doc = json.loads(line)
                return dict(doc.get("components", {}).get("capture", {}))
    return {}


def _event_lines(path: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    if not os.path.exists(path):
        return counts
    with open(path) as fh:
        for line in fh:
            try:
                name = json.loads(line).get("event", "?")
            except ValueError:
                name = "unreadable"
            counts[name] = counts.get(name, 0) + 1
    return counts


def run(
    seconds: float,
    clients: int,
    gap: float,
    settle: float,
    after: float,
    warmup: float,
    backend: str = "iptables",
) -> dict[str, Any]:
    """One flood against a fresh daemon; the figures."""
    work, env, config = guard_work(backend, prefix="imdsg-flood-", shared=True)
    os.chmod(config, 0o644)
    log_path = os.path.join(work, "daemon.log")
    python = os.path.realpath(sys.executable)  # the system interpreter: nobody can run it
    try:
        with Topology(prefix="imdsg-bench") as topo, open(log_path, "w") as log:
            topo.start_imds(work)
            daemon = topo.start_guard(config, env, log)
            state_path = os.path.join(env["IMDSGUARD_RUN_DIR"], "state.json")
            with open(state_path) as fh:
                capture = json.load(fh).get("components", {}).get("capture")
            if not capture or not capture.get("running"):
                raise RuntimeError(f"the capture is not running: {capture}")
            pid = daemon.pid  # `ip netns exec` execs the daemon: same pid
            time.sleep(settle)
            idle = []
            for _ in range(5):
                idle.append(rss_kib(pid))
                time.sleep(0.2)
            procs = [
                topo.popen(
                    topo.host,
                    [python, "-I", "-c", CLIENT, str(seconds), str(gap), IMDS_V4],
                    user=NOBODY,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(clients)
            ]
            start = time.monotonic()
            samples: list[tuple[float, int]] = []
            while any(p.poll() is None for p in procs):
                samples.append((time.monotonic() - start, rss_kib(pid)))
                time.sleep(max(0.0, len(samples) - (time.monotonic() - start)))
            flood_s = time.monotonic() - start
            totals: dict[str, int] = {}
            for p in procs:
                out, _ = p.communicate(timeout=30)
                for k, v in json.loads(out).items():
                    totals[k] = totals.get(k, 0) + int(v)
            settled = []
            end = time.monotonic() + after
            while time.monotonic() < end:
                settled.append(rss_kib(pid))
                time.sleep(1.0)
            alive = daemon.poll() is None
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=20)
            log.flush()
            counters = _stopped_counters(log_path)
            events_file = os.path.join(env["IMDSGUARD_LOG_DIR"], "events.jsonl")
            lines = _event_lines(events_file)
            topo.run(
                topo.host, [sys.executable, "-m", "imdsguard", "remove", "-c", config], env=env
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steady = [s for s in samples if s[0] >= warmup]
    attempts = sum(totals.values())
    return {
        "seconds": flood_s,
        "clients": clients,
        "attempts": attempts,
        "attempts_per_s": attempts / flood_s if flood_s else 0.0,
        "outcomes": totals,
        "idle_rss_mib": statistics.median(idle) / 1024,
        "rss_start_mib": samples[0][1] / 1024 if samples else 0.0,
        "rss_end_mib": samples[-1][1] / 1024 if samples else 0.0,
        "rss_peak_mib": max(kib for _, kib in samples) / 1024 if samples else 0.0,
        "rss_after_mib": settled[-1] / 1024 if settled else None,
        "slope_all": slope_mib_per_min(samples),
        "slope": slope_mib_per_min(steady),
        "rss_warm_mib": steady[0][1] / 1024 if steady else None,
        "samples": len(samples),
        "series_mib": [round(kib / 1024, 1) for t, kib in samples if round(t) % 10 == 0],
        "daemon_alive": alive,
        "capture": {
            k: counters.get(k)
            for k in (
                "packets",
                "events",
                "suppressed",
                "dropped",
                "errors",
                "attributed",
                "source",
            )
        },
        "held_us_avg": (counters.get("held_us_total", 0) / counters["packets"])
        if counters.get("packets")
        else None,
        "held_us_max": counters.get("held_us_max"),
        "event_lines": lines,
    }


def main() -> int:
    """Run the benchmark; print the figures and a docs/benchmarks.md table row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="flood length (default 60)")
    parser.add_argument("--clients", type=int, default=4, help="flooding processes (default 4)")
    parser.add_argument("--sleep", type=float, default=0.005, help="between attempts (5 ms)")
    parser.add_argument("--settle", type=float, default=3.0, help="idle before (default 3 s)")
    parser.add_argument("--after", type=float, default=5.0, help="watch after (default 5 s)")
    parser.add_argument("--warmup", type=float, default=10.0, help="left out of the slope (10 s)")
    parser.add_argument("--max-slope", type=float, default=1.0, help="MiB/min (default 1)")
    parser.add_argument("--backend", choices=("iptables", "nftables"), default="iptables")
    args = parser.parse_args()
    if not_root():
        return 2
    if not (1 <= args.clients <= 16 and 1 <= args.seconds <= 600 and args.sleep >= 0.001):
        print("bounded on purpose: 1-16 clients, 1-600 s, sleep >= 1 ms", file=sys.stderr)
        return 2
    warmup = min(args.warmup, args.seconds / 2)
    r = run(args.seconds, args.clients, args.sleep, args.settle, args.after, warmup, args.backend)
    cap = r["capture"]
    print(f"\nFlood of blocked attempts, {args.backend} backend, capture on "
          f"({cap.get('source', 'nfqueue')}, {r['clients']} clients):\n")  # fmt: skip
    print(f"  attempts:        {r['attempts']} in {r['seconds']:.1f} s "
          f"({r['attempts_per_s']:.0f}/s), outcomes {r['outcomes']}")  # fmt: skip
    print(f"  idle RSS before: {r['idle_rss_mib']:.1f} MiB")
    print(f"  RSS in flood:    {r['rss_start_mib']:.1f} -> {r['rss_end_mib']:.1f} MiB "
          f"(peak {r['rss_peak_mib']:.1f}, {r['samples']} samples), "
          f"after {args.after:g} s idle: {r['rss_after_mib']:.1f} MiB")  # fmt: skip
    print(f"  RSS every 10 s:  {' '.join(str(v) for v in r['series_mib'])} MiB")
    print(f"  memory slope:    {r['slope']:+.3f} MiB/min after {warmup:g} s of warm-up "
          f"(at {r['rss_warm_mib']:.1f} MiB), {r['slope_all']:+.3f} MiB/min over the whole "
          "flood")  # fmt: skip
    print(f"  capture:         {cap['packets']} packets, {cap['events']} events logged, "
          f"{cap['suppressed']} suppressed (rate limit), {cap['dropped']} dropped, "
          f"{cap['errors']} errors")  # fmt: skip
    if r["held_us_avg"] is not None and cap.get("source") != "nflog":
        print(f"  held per packet: {r['held_us_avg'] / 1000:.2f} ms avg, "
              f"{r['held_us_max'] / 1000:.1f} ms max")  # fmt: skip
    print(f"  event log lines: {r['event_lines']}")
    print(f"  daemon alive:    {r['daemon_alive']}\n")
    print("| flood | attempts | idle RSS before | RSS start → end (peak) "
          "| memory slope after warm-up (whole flood) | events logged / suppressed |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print(f"| {args.backend}, {r['seconds']:.0f} s, {r['clients']} clients | {r['attempts']} "
          f"({r['attempts_per_s']:.0f}/s) | {r['idle_rss_mib']:.1f} MiB "
          f"| {r['rss_start_mib']:.1f} → {r['rss_end_mib']:.1f} ({r['rss_peak_mib']:.1f}) MiB "
          f"| {r['slope']:+.2f} ({r['slope_all']:+.2f}) MiB/min "
          f"| {cap['events']} / {cap['suppressed']} |")  # fmt: skip
    ok = (
        r["daemon_alive"]
        and not r["outcomes"].get("connected")
        and abs(r["slope"]) <= args.max_slope
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
