"""Hostile local users against the daemon: they cannot stop it, blind it or read a secret in it.

Each test reproduces a finding of the hostile-user review on the real
daemon, in the netns topology, and checks it no longer holds:

- ~1,000 idle connections to the metrics port ran the daemon (systemd's
  default soft limit: 1024 fds) out of file descriptors: the broker refused
  every client, then the daemon died. Here 2,000, with the daemon under that
  same 1024 limit: it stays up, the rules stay ok, the broker serves.
- A denied user renaming its own copy of a program between connects got a
  fresh rate-limit budget each time and rotated another user's event off
  disk. Here that flood (short in ``make test``, 60 s under ``long``) with
  a small event log generation: the other user's event is still there.
- Secrets on command lines (a corpus of real tools' command lines) reach
  neither events.jsonl nor the daemon's stdout (the journal).
- Every line carries its journald priority (``<N>``) when asked to.

Figures (events written and suppressed per flood, fds, RSS) are printed
with ``-s`` for the README's reliability table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest

from imdsguard.domain import Capture
from imdsguard.events.log import read_events
from imdsguard.firewall.nftables import NftablesBackend
from imdsguard_testing.netns import User, scaled, wait_for
from tests.conftest import require_kernel
from tests.integration.conftest import DaemonHandle
from tests.integration.test_broker import _client_recipe
from tests.unit.events.test_redact import CORPUS, SECRETS

METRICS = ("127.0.0.1", 9721)
IDLE_CONNECTIONS = 2000
FLOOD_SECONDS = 15.0
LONG_FLOOD_SECONDS = 60.0
SMALL_LOG = 100_000  # bytes per event log generation: a flood rotates it within seconds

#: argv: host, port, n, seconds. Opens n idle connections, reopening any the
#: server closes, prints "ready" then a JSON summary when the time is up.
HOLDER = r"""
import json, socket, sys, time
host, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
held, refused, errors = [], 0, 0
def fill():
    global refused, errors
    while len(held) < n:
        try:
            held.append(socket.create_connection((host, port), timeout=2))
        except OSError:
            errors += 1
            if errors > 50 * n:
                return
opened = 0
fill(); opened = len(held)
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    alive = []
    for s in held:
        s.setblocking(False)
        try:
            data = s.recv(100)
        except BlockingIOError:
            alive.append(s); continue
        except OSError:
            data = b""
        refused += 1
        s.close()
    held[:] = alive
    fill()
    time.sleep(0.2)
print(json.dumps({"opened": opened, "refused_or_closed": refused, "errors": errors}), flush=True)
"""

#: argv: dir, seconds, workers. Each worker renames its own copy of curl before
#: every connect to IMDS, so every attempt comes from a new exe path.
FLOODER = r"""
import json, os, subprocess, sys, threading, time
base, seconds, workers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + seconds
counts = []
def worker(w):
    exe, n = os.path.join(base, f"w{w}-0"), 0
    while time.monotonic() < end:
        new = os.path.join(base, f"w{w}-{n + 1}")
        os.rename(exe, new)
        exe = new
        subprocess.run([exe, "-s", "--connect-timeout", "1", "http://169.254.169.254/"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        n += 1
    counts.append(n)
threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"connects": sum(counts)}))
"""

#: Keeps its socket (and itself) a moment after the refusal, so that the NFLOG
#: path (nftables without nft_queue) can still attribute it, as the queue always can.
CONNECT = (
    "import socket, time\n"
    "s = socket.socket()\n"
    "s.settimeout(2)\n"
    "try:\n"
    "    s.connect(('169.254.169.254', 80))\n"
    "except OSError:\n"
    "    pass\n"
    "time.sleep(0.3)\n"
)


def _daemon_facts(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as fh:
        status = dict(line.split(":", 1) for line in fh if ":" in line)
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_kib": int(status["VmRSS"].split()[0]),
        "threads": int(status["Threads"]),
    }


def _python_for(user: User) -> str:
    return os.path.realpath(sys.executable)  # the system interpreter: every user can run it


def test_idle_metrics_connections_do_not_stop_the_daemon_or_the_broker(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    daemon.wrapper = ["prlimit", "--nofile=1024:1024", "--"]  # systemd's default soft limit
    daemon.start_broker(f"metrics:\n  listen: {METRICS[0]}:{METRICS[1]}\n")
    assert daemon.proc is not None
    pid = daemon.proc.pid
    before = _daemon_facts(pid)
    topo = daemon.topo
    holder = topo.popen(
        topo.host,
        ["prlimit", "--nofile=4096:4096", "--", _python_for(test_users["imdsg-denied"]), "-I",
         "-c", HOLDER, METRICS[0], str(METRICS[1]), str(IDLE_CONNECTIONS), "12"],
        user=test_users["imdsg-denied"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "ready", holder.stderr.read()  # type: ignore[union-attr]
    time.sleep(3)  # the daemon's loop ticks many times, the broker accepts, the heartbeat writes
    assert daemon.proc.poll() is None, "the daemon died"
    during = _daemon_facts(pid)
    status = daemon.cli("status", "--json")
    doc = json.loads(status.stdout)
    assert doc["rules"] == {"ipv4": "ok", "ipv6": "ok"}, doc
    app = test_users["imdsg-app"]
    client = _client_recipe(daemon.workdir, app, daemon.config_path)
    got = topo.run(
        topo.host,
        ["env", "-i", *(f"{k}={v}" for k, v in client.env.items()), *client.credentials_argv],
        user=app,
        timeout=30,
    )
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["Version"] == 1
    scrape = topo.http(None, f"http://{METRICS[0]}:{METRICS[1]}/metrics")  # root: its own cap
    assert scrape.ok and "imdsguard_daemon_up 1" in scrape.body, scrape
    summary = json.loads(holder.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert daemon.proc.poll() is None
    names = [e["event"] for e in daemon.logs()]
    assert "broker_accept_failed" not in names
    assert during["fds"] <= before["fds"] + 40, (before, during)
    print(f"\nhostile metrics: {IDLE_CONNECTIONS} idle connections {summary}; daemon before "
          f"{before}, during {during}")  # fmt: skip


def _flood(daemon: DaemonHandle, users: dict[str, User], seconds: float) -> dict[str, Any]:
    daemon.env["IMDSGUARD_EVENTS_MAX_BYTES"] = str(SMALL_LOG)
    daemon.write_config("allow:\n  users: [root]\n")
    daemon.start()
    topo = daemon.topo
    events = os.path.join(daemon.env["IMDSGUARD_LOG_DIR"], "events.jsonl")
    victim, flooder = users["imdsg-app"], users["imdsg-denied"]
    topo.run(topo.host, [_python_for(victim), "-I", "-c", CONNECT], user=victim, check=True)
    wait_for(
        lambda: any(e.get("uid") == victim.uid for e in read_events(events, 50)),
        10,
        "the victim's event",
        daemon.proc,
    )
    base = os.path.join(daemon.workdir, "flood")
    os.makedirs(base)
    workers = 6
    for w in range(workers):
        shutil.copy2(shutil.which("curl") or "/usr/bin/curl", os.path.join(base, f"w{w}-0"))
    os.chown(base, flooder.uid, flooder.gid)
    for name in os.listdir(base):
        os.chown(os.path.join(base, name), flooder.uid, flooder.gid)
    done = topo.run(
        topo.host,
        [_python_for(flooder), "-I", "-c", FLOODER, base, str(seconds), str(workers)],
        user=flooder,
        timeout=seconds + 60,
    )
    assert done.returncode == 0, done.stderr
    connects = json.loads(done.stdout)["connects"]
    time.sleep(6)  # the writer catches up, and a heartbeat publishes its counters
    assert daemon.proc is not None and daemon.proc.poll() is None
    everything = read_events(events, 1_000_000)
    stdout_events = [e for e in daemon.logs() if e.get("event") == "imds_access_blocked"]
    with open(os.path.join(daemon.env["IMDSGUARD_RUN_DIR"], "state.json")) as fh:
        capture = json.load(fh)["components"]["capture"]
    return {
        "connects": connects,
        "victim_events": [e for e in everything if e.get("uid") == victim.uid],
        "flooder_on_disk": sum(1 for e in everything if e.get("uid") == flooder.uid),
        "stdout_events": len(stdout_events),
        "written": capture["events"],
        "suppressed": capture["suppressed"],
        "rotations": int(os.path.exists(events + ".1")),
        "generations_bytes": sum(
            os.path.getsize(p) for p in (events, events + ".1") if os.path.exists(p)
        ),
        "seconds": seconds,
    }


def _check_flood(result: dict[str, Any]) -> None:
    print(f"\nhostile flood: {result | {'victim_events': len(result['victim_events'])}}")
    assert result["victim_events"], "the other user's event was rotated away"
    assert result["connects"] > 300, result  # a real flood, beyond the first burst
    # Bounded: the per-uid budget (300 at once, then 1/s), whatever the exe names.
    limit = 300 + result["seconds"] * 1.0 + 20
    assert result["written"] <= limit + 5, result  # + the victim's and the odd retransmit
    assert result["suppressed"] > 0, result
    # journald gets the same bounded stream as the file.
    assert result["stdout_events"] <= limit + 5, result


def test_exe_renaming_flood_keeps_other_users_events(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    _check_flood(_flood(daemon, test_users, FLOOD_SECONDS))


@pytest.mark.long
def test_exe_renaming_flood_keeps_other_users_events_long(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    _check_flood(_flood(daemon, test_users, LONG_FLOOD_SECONDS))


# The queue holds the packet while the cmdline is read. nftables' NFLOG fallback (a
# kernel without nft_queue, as this development machine's) finds no process once the
# reset closed the socket (0 of 36 attributed), so on nftables this needs nft_queue:
# skipped natively here, run by `make test-vm` on Debian's stock kernel.
@pytest.mark.kernel
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_no_secret_of_the_corpus_reaches_events_or_the_journal(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    if daemon.backend == "nftables":
        require_kernel(
            "nft_queue (CONFIG_NFT_QUEUE)",
            NftablesBackend().capabilities().capture == Capture.QUEUE,
        )
    daemon.env["IMDSGUARD_LOG_PRIORITY_PREFIX"] = "yes"  # and every line carries its priority
    daemon.write_config("allow:\n  users: [root]\n")
    daemon.start()
    user = test_users["imdsg-denied"]
    python = _python_for(user)
    events = os.path.join(daemon.env["IMDSGUARD_LOG_DIR"], "events.jsonl")
    for argv in CORPUS:  # the connecting process carries the tool's command line
        daemon.topo.run(daemon.topo.host, [python, "-I", "-c", CONNECT, *argv], user=user)
    wait_for(
        lambda: len(read_events(events, 1000)) >= len(CORPUS),
        scaled(15),
        "every event",
        daemon.proc,
    )
    logged = read_events(events, 1000)
    assert all(e["attributed"] for e in logged), [e for e in logged if not e["attributed"]][:1]
    with open(events) as fh:
        on_disk = fh.read()
    with open(daemon.log_path) as fh:
        journal = fh.read()
    for secret in SECRETS:
        assert secret not in on_disk, secret[:8]
        assert secret not in journal, secret[:8]
    assert on_disk.count("[redacted]") >= len(CORPUS)
    # Priorities: every line had one (logs() checks), at the right level.
    # Take rules out from under the daemon: its repair is a warning.
    if daemon.backend == "nftables":  # our table is owned: a reload flushes the backstop
        daemon.topo.run(daemon.topo.host, ["nft", "flush", "ruleset"], check=True)
    else:
        daemon.topo.run(daemon.topo.host, ["iptables-legacy", "-F", "OUTPUT"], check=True)
    daemon.wait_log("rules_restored")
    with open(daemon.log_path) as fh:
        raw = {json.loads(ln[3:])["event"]: ln[:3] for ln in fh if ln.endswith("\n")}
    assert raw["daemon_ready"] == "<6>" and raw["imds_access_blocked"] == "<6>", raw
    assert raw["rules_restored"] == "<4>", raw
