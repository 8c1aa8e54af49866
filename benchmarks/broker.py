"""Broker benchmark: credential fetch latency via the broker vs directly from IMDS.

In a throw-away EC2-like topology (simulated IMDS in VPC, tokens required,
request log on), runs the guard with the broker enabled in HOST, then:

1. 50 concurrent client processes fetch credentials from the broker 10
   times each; the simulated IMDS's request log says how many requests
   reached IMDS from the broker's start to the end of the burst (target: 3
   or fewer: one token, one role listing, one credentials document).
2. One client process measures, interleaved so both see the same machine,
   a broker fetch (connect to the Unix socket, GET /v1/credentials) and a
   direct IMDSv2 fetch (PUT token, then GET the credentials, each on a new
   connection, as curl, shell scripts and :class:`imdsguard.imds.ImdsClient`
   do it) by an allowlisted user. Target: broker at least 3x faster at p50.
   Each call starts after a 5 ms pause (not timed): the simulated IMDS is a
   Python process on the same two vCPUs, and the work it does after a
   direct fetch has answered (closing, logging) would otherwise land in the
   next broker call's time (0.46 instead of 0.13 ms here); real IMDS is off
   the host.
   (A keep-alive variant is not measured: the simulated IMDS writes headers
   and body separately, so Nagle plus delayed ACKs add 40 ms per request on
   a reused connection, which says nothing about real IMDS.)

Prints the figures and a markdown table row for docs/benchmarks.md.

    sudo .venv/bin/python benchmarks/broker.py [--samples 500] [--clients 50] [--per-client 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from imdsguard_testing.netns import Topology, guard_env, wait_for

CREDS = "/latest/meta-data/iam/security-credentials/imdsguard-demo-role"

BURST_CLIENT = """
import json, os, sys, time
from imdsguard.broker.client import fetch_credentials
sock, go, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
while not os.path.exists(go):
    time.sleep(0.001)
out = []
for _ in range(n):
    t = time.perf_counter()
    fetch_credentials(sock)
    out.append(time.perf_counter() - t)
print(json.dumps(out))
"""

LATENCY_CLIENT = """
import json, sys, time
from imdsguard.broker.client import fetch_credentials
from imdsguard.imds import ImdsClient
sock, url, path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
imds = ImdsClient(url)

def broker():
    fetch_credentials(sock)

def direct_new_connections():
    imds.drop_token()
    imds.get_bytes(path)  # PUT token + GET, each on a new TCP connection

funcs = {"broker": broker, "direct": direct_new_connections}
for f in funcs.values():  # warm up imports, caches, neighbour entries
    for _ in range(5):
        f()
times = {k: [] for k in funcs}
for _ in range(n):
    for name, f in funcs.items():
        time.sleep(0.005)  # quiet: the previous call's trailing work is done
        t = time.perf_counter()
        f()
        times[name].append(time.perf_counter() - t)
print(json.dumps(times))
"""


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _count(path: str) -> int:
    try:
        with open(path) as fh:
            return sum(1 for line in fh if line.strip())
    except FileNotFoundError:
        return 0


def run(samples: int, clients: int, per_client: int) -> dict[str, Any]:
    """Set up, measure, tear down; the figures."""
    work = tempfile.mkdtemp(prefix="imdsguard-bench-broker-")
    os.chmod(work, 0o755)  # noqa: S103 - nothing secret in it
    request_log = os.path.join(work, "imds-requests.log")
    sock = os.path.join(work, "run", "broker.sock")
    config = os.path.join(work, "config.yaml")
    env = guard_env(work)
    with open(config, "w") as fh:
        fh.write(
            "firewall: {backend: iptables}\n"
            "allow: {users: [root]}\n"  # root may also reach IMDS directly, for the comparison
            f"broker:\n  enabled: true\n  socket: {sock}\n  clients: {{users: [root]}}\n"
            "logging: {format: json}\n"
        )
    os.chmod(config, 0o644)
    try:
        with Topology(prefix="imdsg-bench") as topo:
            topo.start_imds(work, "--http-tokens", "required", "--request-log", request_log)
            before = _count(request_log)
            daemon_log = open(os.path.join(work, "daemon.log"), "w")  # noqa: SIM115
            daemon = topo.start_guard(config, env, daemon_log)
            wait_for(lambda: os.path.exists(sock), 10, "the broker socket", daemon)

            # 1. The burst: N client processes, M fetches each, all released at once.
            go = os.path.join(work, "go")
            procs = [
                topo.popen(
                    topo.host,
                    [sys.executable, "-c", BURST_CLIENT, sock, go, str(per_client)],
                    env=env,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(clients)
            ]
            time.sleep(0.5)  # let the interpreters start
            start = time.perf_counter()
            open(go, "w").close()  # the start signal
            burst: list[float] = []
            for proc in procs:
                out, _ = proc.communicate(timeout=120)
                if proc.returncode != 0:
                    raise SystemExit(f"a burst client failed (exit {proc.returncode})")
                burst += json.loads(out)
            burst_wall = time.perf_counter() - start
            time.sleep(0.2)
            imds_requests = _count(request_log) - before

            # 2. Latency, interleaved.
            result = topo.run(
                topo.host,
                [
                    sys.executable, "-c", LATENCY_CLIENT,
                    sock, "http://169.254.169.254", CREDS, str(samples),
                ],
                env=env,
                timeout=600,
                check=True,
            )  # fmt: skip
            times: dict[str, list[float]] = json.loads(result.stdout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ms = {k: {"p50": _pct(v, 50) * 1000, "p99": _pct(v, 99) * 1000} for k, v in times.items()}
    return {
        "samples": samples,
        "latency_ms": ms,
        "speedup_p50": ms["direct"]["p50"] / ms["broker"]["p50"],
        "speedup_p99": ms["direct"]["p99"] / ms["broker"]["p99"],
        "burst": {
            "clients": clients,
            "per_client": per_client,
            "fetches": len(burst),
            "wall_s": burst_wall,
            "p50_ms": statistics.median(burst) * 1000,
            "p99_ms": _pct(burst, 99) * 1000,
            "imds_requests": imds_requests,
        },
    }


def main() -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=500, help="latency samples per method")
    parser.add_argument("--clients", type=int, default=50, help="concurrent burst clients")
    parser.add_argument("--per-client", type=int, default=10, help="fetches per burst client")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/broker.py needs root (network namespaces)", file=sys.stderr)
        return 2
    if not 1 <= args.samples <= 100_000 or not 1 <= args.clients <= 500:
        print("--samples 1..100000, --clients 1..500", file=sys.stderr)
        return 2
    r = run(args.samples, args.clients, args.per_client)
    lat, burst = r["latency_ms"], r["burst"]
    print(f"latency over {r['samples']} interleaved samples each (ms):")
    names = {"broker": "broker (Unix socket, cached)", "direct": "direct IMDSv2 (PUT + GET)"}
    for key, label in names.items():
        print(f"  {label:<30} p50 {lat[key]['p50']:7.3f}   p99 {lat[key]['p99']:7.3f}")
    print(
        f"broker is {r['speedup_p50']:.1f}x faster at p50, {r['speedup_p99']:.1f}x at p99 "
        "(target: 3x at p50)"
    )
    print(
        f"burst: {burst['clients']} clients x {burst['per_client']} fetches = {burst['fetches']} "
        f"in {burst['wall_s']:.2f}s (p50 {burst['p50_ms']:.2f} ms, p99 {burst['p99_ms']:.2f} ms); "
        f"IMDS requests from broker start to end of burst: {burst['imds_requests']}"
    )
    print()
    print(
        "| broker p50 / p99 (ms) | direct IMDSv2 PUT+GET p50 / p99 (ms) | speedup p50 "
        f"| IMDS requests for {burst['clients']}x{burst['per_client']} fetches |"
    )
    print("|---|---|---|---|")
    print(
        f"| {lat['broker']['p50']:.2f} / {lat['broker']['p99']:.2f} "
        f"| {lat['direct']['p50']:.2f} / {lat['direct']['p99']:.2f} "
        f"| {r['speedup_p50']:.1f}x | {burst['imds_requests']} |"
    )
    ok = r["speedup_p50"] >= 3 and burst["imds_requests"] <= 3
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
