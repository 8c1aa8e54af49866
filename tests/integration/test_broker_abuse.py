"""The broker under abuse: a legitimate client keeps its latency, nothing crashes.

The daemon runs the broker (socket in the work directory) for one client
user, ``imdsg-app``. Five other users then, all at once and for a few
seconds, hold 200 idle connections (50 each, under the per-uid cap of 64, so
the broker really holds them all), trickle request heads a byte every 0.5 s,
send junk bytes and send oversized heads (a 16 KiB header, a 4 KiB request
line, 100 header fields); one of them also opens 100 connections at a time
every 0.3 s (over its per-uid cap: 503s; enough to fill the kernel's listen
queue for a moment, which a client must wait out rather than fail).
Meanwhile ``imdsg-app`` fetches its credentials in a loop, as it did before
the abuse for a baseline.

The properties: the median fetch, and the slowest, are at most 100 ms slower
than the baseline's median (a fraction of a millisecond and a millisecond or
two in practice) and every fetch succeeds; the daemon stays up and
``/v1/health`` answers 200; each abuser gets a proper HTTP error
(400/414/431/505, 408 for a head not complete within
``Limits.read_timeout``, 503 when over a cap) or is cut off (an idle
connection is closed after ``read_timeout``), and never anything else.

The limits are the defaults of ``broker.limits`` (the configuration keys,
:class:`imdsguard.config.BrokerLimits`); ``test_broker_server`` shows that
configured and reloaded values take effect.

Abusers are a stdlib-only script run by the system interpreter (readable by
every user); the client uses ``imdsguard.broker.client`` through the recipe
of ``test_broker.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from imdsguard.broker.client import fetch_health
from imdsguard.broker.server import Limits
from imdsguard_testing.netns import User, scaled
from tests.integration.conftest import DaemonHandle
from tests.integration.test_broker import _client_recipe

NOBODY = User(65534, 65534)
NO_NAME = User(65533, 65534)  # a uid without a passwd entry
ABUSE_SECONDS = 10.0
MAX_DELAY_MS = 100.0
WORST_DELAY_MS = 500.0  # one fetch's scheduling hiccup, well short of a 3 s stall

#: argv: socket, seconds, spec JSON {"idle": n, "slow": n, "junk": bool, "oversized": bool}.
#: Prints "ready" once its idle and slow connections are open, then one JSON summary.
ABUSER = r"""
import collections, json, os, random, selectors, socket, sys, threading, time

path, seconds, spec = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
end = time.monotonic() + seconds
outcomes = collections.defaultdict(collections.Counter)  # role -> outcome -> count
lifetimes = collections.defaultdict(list)
lock = threading.Lock()

def note(role, data, opened=None):
    if not data:
        what = "closed"
    elif data.startswith(b"HTTP/1.1 ") and data[9:12].isdigit():
        what = data[9:12].decode()
    else:
        what = "garbage:" + repr(data[:40])
    with lock:
        outcomes[role][what] += 1
        if opened is not None:
            lifetimes[role].append(time.monotonic() - opened)

def read_reply(s):
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return data  # what arrived before the reset is the answer
    except socket.timeout:
        return data or b"timeout"

eagain = collections.Counter()

def connect(s, role):
    # A full listen queue (EAGAIN) is the kernel's, before the broker sees us: insist.
    while True:
        try:
            s.connect(path)
            return
        except BlockingIOError:
            with lock:
                eagain[role] += 1
            time.sleep(0.001)

def one_shot(role, payload, close_write):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        connect(s, role)
        try:
            s.sendall(payload)
            if close_write:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (and closed) before we finished: read the answer
        note(role, read_reply(s))
    except OSError as exc:
        note(role, ("error:" + type(exc).__name__).encode())
    finally:
        s.close()

JUNK = [
    lambda: os.urandom(random.randint(1, 600)) + b"\r\n\r\n",
    lambda: os.urandom(random.randint(1, 600)),  # never a complete head: silently closed
    lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\n\n",
    lambda: b"GET /v1/credentials HTTP/2.0\r\n\r\n",
    lambda: b"GET /v1/credentials HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    lambda: b"\x00" * 200 + b"\r\n\r\n",
]
OVERSIZED = [
    lambda: b"GET /v1/credentials HTTP/1.1\r\nX-Big: " + b"a" * 16384 + b"\r\n\r\n",
    lambda: b"GET /v1/" + b"b" * 4096 + b" HTTP/1.1\r\n\r\n",
    lambda: b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n",
]

def flood(role, makers):
    while time.monotonic() < end:
        i = random.randrange(len(makers))
        one_shot(role, makers[i](), close_write=(role == "junk" and i == 1))
        time.sleep(0.01)

def burst():
    # Bursts of connections, to fill the kernel's listen queue: over the per-uid cap they get 503.
    while time.monotonic() < end:
        socks = []
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            connect(s, "burst")
            socks.append(s)
        time.sleep(0.05)
        for s in socks:
            s.setblocking(False)
            try:
                data = s.recv(4096)
            except BlockingIOError:
                data = None  # accepted and held, like any idle connection
            except ConnectionResetError:
                data = b""
            if data is None:
                with lock:
                    outcomes["burst"]["held"] += 1
            else:
                note("burst", data)
            s.close()
        time.sleep(0.25)

SLOW_HEAD = b"GET /v1/credentials HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 4096

def hold():
    # Idle connections and slow senders in one selector loop; reopened as the broker cuts them off.
    sel = selectors.DefaultSelector()
    def open_one(role):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        connect(s, role)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [role, time.monotonic(), 0, time.monotonic()])
    for _ in range(spec.get("idle", 0)):
        open_one("idle")
    for _ in range(spec.get("slow", 0)):
        open_one("slow")
    print("ready", flush=True)
    while time.monotonic() < end:
        for key, _ in sel.select(0.05):
            role, opened = key.data[0], key.data[1]
            try:
                data = key.fileobj.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            sel.unregister(key.fileobj)
            key.fileobj.close()
            note(role, data, opened)
            if time.monotonic() < end:
                open_one(role)
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            state = key.data
            if state[0] == "slow" and now - state[3] >= 0.5:
                state[3] = now
                try:
                    key.fileobj.send(SLOW_HEAD[state[2]:state[2] + 1])
                    state[2] += 1
                except OSError:
                    pass  # cut off: the read side tells
    for key in list(sel.get_map().values()):
        key.fileobj.close()

threads = [threading.Thread(target=hold)]
if spec.get("junk"):
    threads.append(threading.Thread(target=flood, args=("junk", JUNK)))
if spec.get("oversized"):
    threads.append(threading.Thread(target=flood, args=("oversized", OVERSIZED)))
if spec.get("burst"):
    threads.append(threading.Thread(target=burst))
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({
    "outcomes": {role: dict(c) for role, c in outcomes.items()},
    "lifetime_median": {role: sorted(v)[len(v) // 2] for role, v in lifetimes.items() if v},
    "eagain": dict(eagain),
}), flush=True)
"""

#: argv: socket, count, gap (s). Prints {"ms": [ms or null (failed), ...], "errors": [...]}.
LEGIT = """
import json, sys, time
from imdsguard.broker.client import fetch_credentials
from imdsguard.errors import BrokerError
times, errors = [], []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    try:
        doc = fetch_credentials(sys.argv[1], timeout=5)
        assert doc["Version"] == 1
        times.append(round((time.perf_counter() - start) * 1000, 3))
    except BrokerError as exc:
        times.append(None)
        errors.append(str(exc))
    time.sleep(float(sys.argv[3]))
print(json.dumps({"ms": times, "errors": errors}))
"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _sample_connections(daemon: DaemonHandle, held: list[int], stop: threading.Event) -> None:
    """Connections the broker holds, from the health the daemon publishes every 5 s."""
    path = os.path.join(daemon.env["IMDSGUARD_RUN_DIR"], "state.json")
    since = time.time()
    while not stop.wait(0.25):
        try:
            with open(path) as fh:
                state = json.load(fh)
        except (OSError, ValueError):
            continue
        if state.get("updated", 0) > since:  # published while the abuse runs
            held.append(int(state["components"]["broker"]["connections"]))


@pytest.mark.parametrize("backend", ["iptables"])  # the broker does not depend on the backend
def test_abuse_does_not_delay_a_legitimate_client(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    sock = daemon.start_broker()
    app = test_users["imdsg-app"]
    client = _client_recipe(daemon.workdir, app, daemon.config_path)
    topo = daemon.topo

    def legit(count: int) -> list[float]:
        proc = topo.run(
            topo.host,
            ["env", "-i", *(f"{k}={v}" for k, v in client.env.items()),
             client.python, "-c", LEGIT, sock, str(count), "0.05"],
            user=app,
            timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert not result["errors"], result["errors"][:3]
        return [float(ms) for ms in result["ms"]]

    legit(5)  # warm: imports, page cache
    baseline = legit(40)

    abusers: list[tuple[str, subprocess.Popen[str]]] = []
    python = os.path.realpath(sys.executable)  # the system interpreter: every user can run it
    plan: list[tuple[str, User, dict[str, Any]]] = [
        ("imdsg-denied", test_users["imdsg-denied"], {"idle": 50, "slow": 6, "junk": True}),
        ("imdsg-byuid", test_users["imdsg-byuid"], {"idle": 50, "slow": 6, "oversized": True}),
        ("imdsg-member", test_users["imdsg-member"], {"idle": 50, "junk": True}),
        ("nobody", NOBODY, {"idle": 50, "oversized": True}),
        ("uid 65533", NO_NAME, {"burst": True}),  # its own uid: its 503s crowd out no idle one
    ]
    held: list[int] = []
    stop_sampling = threading.Event()
    sampler = threading.Thread(
        target=_sample_connections, args=(daemon, held, stop_sampling), daemon=True
    )
    try:
        for name, user, spec in plan:
            proc = topo.popen(
                topo.host,
                [python, "-I", "-c", ABUSER, sock, str(ABUSE_SECONDS), json.dumps(spec)],
                user=user,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            abusers.append((name, proc))
        for name, proc in abusers:
            assert proc.stdout is not None and proc.stderr is not None
            if proc.stdout.readline().strip() != "ready":
                proc.kill()
                pytest.fail(f"abuser {name} did not get going: {proc.stderr.read()}")
        sampler.start()
        time.sleep(scaled(1.0))  # the floods are under way
        started = time.monotonic()
        under = legit(60)
        measured_s = time.monotonic() - started
        summaries = {}
        for name, proc in abusers:
            out, err = proc.communicate(timeout=scaled(15))
            assert proc.returncode == 0, f"{name}: {err}"
            summaries[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        stop_sampling.set()
        if sampler.is_alive():
            sampler.join()
        for _, proc in abusers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    figures = {
        "baseline_median_ms": round(statistics.median(baseline), 3),
        "baseline_p95_ms": round(_percentile(baseline, 0.95), 3),
        "abuse_median_ms": round(statistics.median(under), 3),
        "abuse_p95_ms": round(_percentile(under, 0.95), 3),
        "abuse_max_ms": round(max(under), 3),
        "worst_delay_ms": round(max(under) - statistics.median(baseline), 3),
        "measured_s": round(measured_s, 1),
        "broker_connections_seen": max(held, default=None),
    }
    print(f"\n[broker-abuse] {figures}")
    for name, summary in summaries.items():
        print(f"[broker-abuse] {name}: {summary}")

    # The legitimate client: served every time; its median and its 95th percentile at
    # most 100 ms slower than the baseline's median. Its slowest fetch gets 500 ms: on
    # a loaded 2-core machine the baseline itself (no abuse) had a 51 ms p95 and one
    # abused fetch took 134 ms, while a broker stalled by a slow or idle client makes
    # its victims wait out the 3 s read timeout.
    base = statistics.median(baseline)
    assert statistics.median(under) - base < scaled(MAX_DELAY_MS), figures
    assert _percentile(under, 0.95) - base < scaled(MAX_DELAY_MS), figures
    assert figures["worst_delay_ms"] < scaled(WORST_DELAY_MS), figures
    # Nothing crashed: the daemon runs, health answers 200 and is ok.
    assert daemon.proc.poll() is None
    status, health = fetch_health(sock)
    assert status == 200 and health["status"] == "ok", health
    loop_errors = [e for e in daemon.logs() if e.get("event") == "broker_loop_error"]
    assert not loop_errors, loop_errors[:3]

    # Abusers got proper errors or were cut off, never anything else.
    allowed = {
        "idle": {"closed", "503"},
        "slow": {"408", "closed", "503"},
        # 408 too: random bytes that are all CR/LF (about 2 in 100,000 of the
        # first kind) are blank lines the parser skips, so the head is incomplete.
        "junk": {"400", "408", "413", "414", "431", "505", "closed", "503"},
        "oversized": {"414", "431", "closed", "503"},
        "burst": {"held", "503", "closed"},
    }
    seen: dict[str, dict[str, int]] = {}
    for name, summary in summaries.items():
        for role, outcomes in summary["outcomes"].items():
            unexpected = {k: v for k, v in outcomes.items() if k not in allowed[role]}
            assert not unexpected, (name, role, unexpected)
            for what, n in outcomes.items():
                seen.setdefault(role, {}).setdefault(what, 0)
                seen[role][what] += n
    assert seen["idle"].get("closed", 0) >= 150, seen["idle"]  # cut off after read_timeout
    assert seen["slow"].get("408", 0) >= 6, seen["slow"]
    assert seen["junk"].get("400", 0) >= 10 and seen["junk"].get("closed", 0) >= 1, seen["junk"]
    assert seen["oversized"].get("431", 0) >= 5, seen["oversized"]
    assert seen["oversized"].get("414", 0) >= 2, seen["oversized"]
    assert seen["burst"].get("503", 0) >= 100, seen["burst"]  # over the per-uid cap
    read_timeout = Limits().read_timeout
    for name, summary in summaries.items():
        for role in ("idle", "slow"):
            lifetime = summary["lifetime_median"].get(role)
            if lifetime is not None:  # cut off at the deadline for the whole head
                assert read_timeout - 0.2 < lifetime < read_timeout + scaled(2), (
                    name,
                    role,
                    lifetime,
                )
    # The broker really held the 200 idle connections (plus the slow ones) at once.
    assert held and max(held) >= 200, held
