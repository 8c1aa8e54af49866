"""Denied connections that get through while the host's firewall is reloaded.

What a firewall reload does to our rules, per backend, against the real
daemon in a throw-away EC2-like topology: a denied user loops ``connect()``
to IMDS (one attempt a millisecond at most) while the host's firewall is
reloaded 20 times, 0.3-0.6 s apart, at random (and never before the client
has tried again since the last reload, however slow the machine):

- nftables: ``nft -f`` of a ruleset file that starts with ``flush ruleset``
  (what ``nftables.service`` does on reload and stop on RHEL 9 / AL2023 and
  what most admin configs do);
- iptables: ``iptables-legacy-restore`` of a filter table without our chain
  (the whole table is replaced; x_tables tells nobody).

Prints connections through per 20 reloads and the longest window (first
reload to last connection through it), and README table rows.

    sudo .venv/bin/python benchmarks/flushrace.py [--reloads 20] [--backend nftables]

The test suite (tests/integration/test_flush_race.py) runs the same race.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from imdsguard_testing.bench import guard_work, not_root
from imdsguard_testing.netns import IMDS_V4, Topology, User, scaled

NFT_RULESET = """\
flush ruleset
table inet filter {
    chain input { type filter hook input priority filter; policy accept; }
    chain output { type filter hook output priority filter; policy accept; }
}
"""
IPTABLES_RESTORE = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
"""
RELOAD = {
    "nftables": (["nft", "-f", "-"], NFT_RULESET),
    "iptables": (["iptables-legacy-restore"], IPTABLES_RESTORE),
}

CLIENT = r"""
import socket, sys, threading, time
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
attempts = 0
while True:
    print("S", round(time.monotonic(), 4), flush=True)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect((sys.argv[1], 80))
        print("T", time.monotonic(), flush=True)
    except OSError:
        pass
    finally:
        s.close()
    attempts += 1
    if stop.is_set():
        break
    time.sleep(0.001)
print("E", attempts, flush=True)
"""
"""The denied client: one line per attempt started (``S t``) and per connect that
got through (``T t``), until its stdin closes; then one more attempt and ``E count``."""


class _Client:
    """The denied client in the host namespace, its lines read as they come."""

    def __init__(self, topo: Topology, denied: User) -> None:
        self.started: list[float] = []
        self.through: list[float] = []
        self.attempts = -1
        self._proc = topo.popen(
            topo.host,
            [sys.executable, "-c", CLIENT, IMDS_V4],
            user=denied,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            kind, _, value = line.partition(" ")
            if kind == "S":
                self.started.append(float(value))
            elif kind == "T":
                self.through.append(float(value))
            elif kind == "E":
                self.attempts = int(value)

    def wait_attempt_since(self, since: float, timeout: float) -> None:
        """Return once an attempt started at or after ``since``, or after ``timeout``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self._proc.poll() is None:
            if self.started and self.started[-1] >= since:
                return
            time.sleep(0.01)

    def finish(self, timeout: float) -> None:
        """Tell the client to stop (it makes one more attempt) and collect its figures."""
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        if self.attempts < 0:
            raise RuntimeError(f"the denied client exited {self._proc.returncode} without figures")


@dataclass
class Race:
    """What the denied client saw."""

    attempts: int
    through: list[float]
    reloads: list[float] = field(default_factory=list)  # monotonic start of each reload
    started: list[float] = field(default_factory=list)  # monotonic start of each attempt

    def uncovered(self) -> list[int]:
        """The reloads with no attempt between their start and the next reload's.

        An empty list means the client was trying all through every reload,
        however slow its pace (a loaded or emulated machine): the race was real.
        """
        bounds = [*self.reloads, float("inf")]
        return [
            i
            for i in range(len(self.reloads))
            if not any(bounds[i] <= t < bounds[i + 1] for t in self.started)
        ]

    def median_gap_ms(self) -> float:
        """The client's typical time from one attempt to the next: how finely it samples.

        A window shorter than this can be missed and a longer one is measured
        short by up to this much; infinite with fewer than two attempts.
        """
        gaps = sorted(b - a for a, b in zip(self.started, self.started[1:]))
        return gaps[len(gaps) // 2] * 1000 if gaps else float("inf")

    def windows_ms(self) -> list[float]:
        """Per reload that let something through: its start to the last connection through."""
        last: dict[float, float] = {}
        for t in self.through:
            start = max((r for r in self.reloads if r <= t), default=None)
            if start is not None:
                last[start] = t
        return [(t - start) * 1000 for start, t in sorted(last.items())]


def race(
    topo: Topology,
    backend: str,
    denied: User,
    reloads: int = 20,
    seed: int = 4242,
    between: Callable[[int], None] | None = None,
) -> Race:
    """Reload the host's firewall ``reloads`` times while ``denied`` loops connect().

    ``between(i)`` runs after reload ``i`` (e.g. kill the daemon, restart it).
    """
    rng = random.Random(seed)  # noqa: S311 - reload timing, not secrets
    argv, text = RELOAD[backend]
    client = _Client(topo, denied)
    # However slow the machine (an emulated VM starts Python in seconds), the client
    # is trying before the first reload and again after each one before the next.
    client.wait_attempt_since(0.0, scaled(10))
    starts: list[float] = []
    for i in range(reloads):
        starts.append(time.monotonic())
        topo.run(topo.host, argv, input=text, check=True)
        if between is not None:
            between(i)
        time.sleep(0.3 + rng.uniform(0, 0.3))
        client.wait_attempt_since(starts[-1], scaled(5))
    client.finish(scaled(30))
    return Race(client.attempts, client.through, starts, client.started)


def _bench(backend: str, reloads: int) -> Race:
    work, env, config = guard_work(backend)
    try:
        denied = User(65534, 65534)  # nobody: never allowlisted here
        with Topology(prefix="imdsg-bench") as topo:
            topo.start_imds(work)
            daemon = topo.start_guard(config, env)
            found = race(topo, backend, denied, reloads)
            daemon.terminate()
            daemon.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return found


def main() -> int:
    """Run the race per backend; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--backend", choices=sorted(RELOAD), action="append")
    args = parser.parse_args()
    if not_root():
        return 2
    rows = []
    for backend in args.backend or ["nftables", "iptables"]:
        found = _bench(backend, args.reloads)
        windows = found.windows_ms()
        worst = max(windows, default=0.0)
        print(f"{backend}: {len(found.through)} of {found.attempts} denied connects through "
              f"over {args.reloads} reloads; {len(windows)} reloads opened a window, "
              f"longest {worst:.0f} ms")  # fmt: skip
        rows.append(
            f"| {backend} | {args.reloads} | {found.attempts} | {len(found.through)} "
            f"| {len(windows)} | {worst:.0f} ms |"
        )
    print("| backend | reloads | denied connects tried | through | reloads with a window "
          "| longest window |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
