"""Idle resource use of the daemon per backend: RSS, CPU, wake-ups, fds.

For each firewall backend, runs the real daemon in a throw-away EC2-like
topology, lets it settle, then watches it idle for ``--seconds`` (30): RSS and
PSS at the end (and the peak), CPU as % of one core (its own, and with the
``nft``/``iptables`` children it waited for), context switches per second over
all its threads (how often it wakes up), fds and threads. Targets: RSS <= 40
MB, CPU near zero.

Then, where the memory goes: RSS after each import the daemon makes, measured
in a fresh interpreter in the same namespace, and python-iptables imported
with and without setuptools' distutils shim (which imdsguard now avoids).
Prints markdown tables.

    sudo .venv/bin/python benchmarks/resources.py [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

from imdsguard_testing.bench import guard_work, not_root
from imdsguard_testing.netns import Topology

RSS_TARGET_MB = 40.0
CPU_TARGET_PCT = 1.0  # "near zero": under 1% of one core
TICKS = os.sysconf("SC_CLK_TCK")

#: RSS after each step, in a fresh interpreter (argv[1]: backend).
IMPORTS = r"""
import json, sys, time
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
steps = [("python", rss())]
def step(name, fn):
    fn()
    steps.append((name, rss()))
step("+ yaml", lambda: __import__("yaml"))
step("+ structlog (asyncio, ssl)", lambda: __import__("structlog"))
step("+ imdsguard.cli, config, policy", lambda: __import__("imdsguard.cli"))
step("+ imdsguard.daemon", lambda: __import__("imdsguard.daemon"))
from imdsguard.config import parse_config
from imdsguard.firewall.detect import make_backend
from imdsguard.policy import build_ruleset
holder = {}
step("+ backend " + sys.argv[1], lambda: holder.update(b=make_backend(sys.argv[1])))
rules = build_ruleset(parse_config("allow: {users: [root]}"))
step("+ first apply and inspect", lambda: (holder["b"].apply(rules), holder["b"].inspect(rules)))
step("+ events capture", lambda: __import__("imdsguard.events.capture"))
print(json.dumps(steps))
"""

#: python-iptables alone, with the distutils shim as before and as imdsguard imports it.
IPTC = r"""
import json, sys
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
import imdsguard.daemon
before = rss()
if sys.argv[1] == "shim":
    import iptc
else:
    from imdsguard.firewall.iptables import IptablesBackend
    IptablesBackend()
print(json.dumps({"before": before, "after": rss(), "setuptools": "setuptools" in sys.modules}))
"""


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in fh if ":" in line)}


def _kib(value: str) -> int:
    return int(value.split(maxsplit=1)[0])


def _cpu_ticks(pid: int) -> tuple[int, int]:
    """(own utime+stime, children's cutime+cstime) in clock ticks."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # After "pid (comm)": state is field 0; utime, stime, cutime, cstime are 11..14.
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def _switches(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = _status_task(pid, tid)
        except FileNotFoundError:
            continue
        total += int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])
    return total


def _status_task(pid: int, tid: str) -> dict[str, str]:
    with open(f"/proc/{pid}/task/{tid}/status") as fh:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in fh if ":" in line)}


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return _kib(line.split(":", 1)[1])
    return 0


def _idle(backend: str, seconds: float, settle: float) -> dict[str, Any]:
    work, env, config = guard_work(backend, shared=True)
    try:
        with Topology(prefix="imdsg-bench") as topo:
            launched = time.monotonic()
            daemon = topo.start_guard(config, env)
            ready_s = time.monotonic() - launched
            time.sleep(settle)
            pid = daemon.pid  # `ip netns exec` execs the daemon: same pid
            own0, kids0 = _cpu_ticks(pid)
            sw0, t0 = _switches(pid), time.monotonic()
            peak = 0
            while time.monotonic() - t0 < seconds:
                peak = max(peak, _kib(_status(pid)["VmRSS"]))
                time.sleep(0.5)
            own1, kids1 = _cpu_ticks(pid)
            sw1, elapsed = _switches(pid), time.monotonic() - t0
            status = _status(pid)
            result = {
                "backend": backend,
                "ready_s": ready_s,
                "rss_mb": _kib(status["VmRSS"]) / 1024,
                "rss_peak_mb": max(peak, _kib(status["VmRSS"])) / 1024,
                "pss_mb": _pss_kib(pid) / 1024,
                "cpu_pct": 100.0 * (own1 - own0) / TICKS / elapsed,
                "cpu_children_pct": 100.0 * (kids1 - kids0) / TICKS / elapsed,
                "wakeups_s": (sw1 - sw0) / elapsed,
                "fds": len(os.listdir(f"/proc/{pid}/fd")),
                "threads": int(status["Threads"]),
                "seconds": elapsed,
            }
            imports = json.loads(
                topo.run(
                    topo.host, [sys.executable, "-c", IMPORTS, backend], timeout=60, check=True
                ).stdout
            )
            result["imports"] = imports
            if backend == "iptables":
                result["iptc"] = {
                    how: json.loads(
                        topo.run(
                            topo.host, [sys.executable, "-c", IPTC, how], timeout=60, check=True
                        ).stdout
                    )
                    for how in ("shim", "imdsguard")
                }
            daemon.terminate()
            daemon.wait(timeout=15)
            topo.run(topo.host, [sys.executable, "-m", "imdsguard", "remove"], env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    """Run the benchmark; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="idle window (default 30)")
    parser.add_argument("--settle", type=float, default=3.0, help="wait after READY (default 3)")
    parser.add_argument("--backend", action="append", choices=["iptables", "nftables"])
    args = parser.parse_args()
    if not_root():
        return 2
    results = [
        _idle(b, args.seconds, args.settle) for b in args.backend or ["iptables", "nftables"]
    ]
    ok = True
    print(f"\nIdle for {args.seconds:.0f} s after READY (+{args.settle:.0f} s to settle):\n")
    print(
        "| backend | RSS | PSS | RSS peak | CPU (% of one core) | + children | wake-ups/s "
        "| fds | threads | ready after | targets |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rss_ok = r["rss_mb"] <= RSS_TARGET_MB
        cpu_ok = r["cpu_pct"] + r["cpu_children_pct"] < CPU_TARGET_PCT
        ok &= rss_ok
        verdict = f"RSS {'met' if rss_ok else 'MISSED'}, CPU {'met' if cpu_ok else 'missed'}"
        print(
            f"| {r['backend']} | {r['rss_mb']:.1f} MB | {r['pss_mb']:.1f} MB "
            f"| {r['rss_peak_mb']:.1f} MB | {r['cpu_pct']:.2f}% | {r['cpu_children_pct']:.2f}% "
            f"| {r['wakeups_s']:.1f} | {r['fds']} | {r['threads']} | {r['ready_s']:.2f} s "
            f"| {verdict} |"
        )
    print(
        f"\nTargets: RSS <= {RSS_TARGET_MB:.0f} MB (the exit code), CPU with children "
        f"< {CPU_TARGET_PCT}% of one core (reported)."
    )
    for r in results:
        print(f"\nWhere {r['backend']}'s RSS comes from (fresh interpreter, step by step):\n")
        print("| step | RSS | added |")
        print("|---|---|---|")
        previous = None
        for name, kib in r["imports"]:
            added = "" if previous is None else f"+{(kib - previous) / 1024:.1f} MB"
            print(f"| {name} | {kib / 1024:.1f} MB | {added} |")
            previous = kib
        if "iptc" in r:
            print("\npython-iptables import, after imdsguard.daemon:\n")
            print("| how | RSS added | setuptools loaded |")
            print("|---|---|---|")
            labels = {
                "shim": "plain `import iptc` (setuptools' distutils shim)",
                "imdsguard": "IptablesBackend() (distutils blocked during import)",
            }
            for how, m in r["iptc"].items():
                print(
                    f"| {labels[how]} | +{(m['after'] - m['before']) / 1024:.1f} MB "
                    f"| {m['setuptools']} |"
                )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
