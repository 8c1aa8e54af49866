"""Forking ``nft`` vs libnftables in-process, side by side: replace our table, list it.

In a throw-away network namespace, the same rendered table (the default
policy: 21 rules) is replaced 200 times and listed 200 times, each way:
``nft -j -f -`` / ``nft -j list table`` as a child process, and
``Nftables.json_cmd`` through the python3-nftables binding in this process.
Prints medians and p95, and README table rows.

    sudo .venv/bin/python benchmarks/nftcall.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import sys

from imdsguard_testing.bench import not_root
from imdsguard_testing.netns import Topology

PROBE = r"""
import json, statistics, subprocess, sys, time
from imdsguard.config import parse_config
from imdsguard.firewall.nftables import FAMILY, TABLE, Context, render
from imdsguard.policy import build_ruleset

rounds = int(sys.argv[1])
plan = render(build_ruleset(parse_config("allow: {users: [root]}\n")), {})
batch = json.dumps(plan.batch())
ctx = Context()
def timed(fn):
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    out.sort()
    return statistics.median(out), out[int(len(out) * 0.95) - 1]
def fork_replace():
    subprocess.run(["nft", "-j", "-f", "-"], input=batch, text=True, check=True)
def fork_list():
    subprocess.run(["nft", "-j", "list", "table", FAMILY, TABLE], capture_output=True, check=True)
def lib_replace():
    ctx.json(plan.batch()["nftables"], "replace")
def lib_list():
    ctx.table(TABLE)
rules = sum(len(r) for r in plan.rules.values())
for name, fn in (("replace", fork_replace), ("replace", lib_replace),
                 ("list", fork_list), ("list", lib_list)):
    median, p95 = timed(fn)
    how = "fork nft" if fn.__name__.startswith("fork") else "libnftables json_cmd"
    print(f"{name}\t{how}\t{median:.2f}\t{p95:.2f}\t{rules}")
"""


def main() -> int:
    """Run both ways; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    if not_root():
        return 2
    with Topology(prefix="imdsg-bench") as topo:
        out = topo.run(
            topo.host, [sys.executable, "-c", PROBE, str(args.rounds)], timeout=600, check=True
        ).stdout
    print("| operation | how | median | p95 |")
    print("|---|---|---|---|")
    for line in out.splitlines():
        what, how, median, p95, rules = line.split("\t")
        print(f"| {what} ({rules} rules) | {how} | {median} ms | {p95} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
