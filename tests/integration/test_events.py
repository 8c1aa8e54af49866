"""Blocked-attempt events against the real kernel: NFQUEUE capture, attribution, audit mode.

Each test runs the real daemon in the HOST namespace of a throw-away EC2-like
topology, and clients as real users: /usr/bin/curl and /usr/bin/python3.
The daemon starts the capture, then applies the queue rules; on SIGTERM it
swaps in queue-less rules, then stops the capture.

The queue tests run on both backends. The nftables queue path (the default on
AL2023, RHEL 9, Debian and Ubuntu) needs nft_queue, which this development
machine's kernel lacks: natively they are skipped there, and ``make test-vm``
runs them on Debian's stock kernel, where a missing nft_queue is a failure.
The NFLOG tests at the end cover kernels without it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from imdsguard.domain import Capture
from imdsguard.events.log import format_console
from imdsguard.firewall.nftables import NftablesBackend
from imdsguard_testing.netns import IMDS_V4, IMDS_V6, HttpResult, Topology, User, scaled, wait_for
from tests.conftest import require_kernel

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The real daemon: it starts the capture, then applies the queue rules; on
# SIGTERM it swaps in queue-less rules, stops the capture and logs its counters.
RUNNER = ["-m", "imdsguard", "run", "-c"]

#: One connect, held in the queue until the guard has attributed it. The client's own
#: timeout is scaled: under emulation (make test-vm) 40 of these queue up behind each
#: other, and a client that gave up has closed its socket before it is looked up.
PROBE = """import socket
try:
    socket.create_connection(({host!r}, 80), timeout={timeout})
except OSError:
    pass
"""


@dataclass
class Guard:
    """The capture running in HOST, its stdout and its event log."""

    topo: Topology
    workdir: str
    env: dict[str, str]
    proc: subprocess.Popen[Any] | None = None
    stdout_path: str = ""
    backend: str = "iptables"
    source: str = "nfqueue"  # where the capture must read: nfqueue, or nflog without nft_queue

    @property
    def events_path(self) -> str:
        return os.path.join(self.env["IMDSGUARD_LOG_DIR"], "events.jsonl")

    def start(self, config: str) -> Guard:
        cfg = os.path.join(self.workdir, "config.yaml")
        with open(cfg, "w") as fh:
            fh.write(f"firewall:\n  backend: {self.backend}\n" + config)
        self.stdout_path = os.path.join(self.workdir, f"guard-{time.monotonic_ns()}.log")
        self.proc = self.topo.popen(
            self.topo.host,
            [sys.executable, *RUNNER, cfg],
            env=self.env,
            cwd=REPO,
            stdout=open(self.stdout_path, "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: "daemon_ready" in self.stdout(), 15, "the daemon to start", self.proc)
        (started,) = [e for e in self.stdout_events() if e.get("event") == "capture_started"]
        assert (self.backend, started["source"]) == (self.backend, self.source), started
        return self

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=scaled(15)) == 0, self.stdout()
        (stopped,) = [e for e in self.stdout_events() if e.get("event") == "daemon_stopped"]
        capture: dict[str, Any] = stopped["components"]["capture"]
        return capture

    def stdout(self) -> str:
        with open(self.stdout_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    def stdout_events(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.stdout().splitlines() if ln.startswith("{")]

    def events_text(self) -> str:
        with open(self.events_path, "rb") as fh:
            return fh.read().decode("ascii")  # the log is ASCII only: this fails otherwise

    def events(self) -> list[dict[str, Any]]:
        try:
            with open(self.events_path, encoding="ascii") as fh:
                return [json.loads(line) for line in fh]
        except FileNotFoundError:
            return []

    def wait_events(self, count: int, timeout: float = 5, settle: float = 0.3) -> list[Any]:
        wait_for(lambda: len(self.events()) >= count, timeout, f"{count} event(s)", self.proc)
        time.sleep(scaled(settle))  # anything extra (a duplicate) would show up now
        return self.events()


@pytest.fixture
def guard(topo: Topology, workdir: str) -> Iterator[Guard]:
    env = dict(os.environ)
    for key in ("run", "state", "log"):
        path = os.path.join(workdir, key)
        os.makedirs(path, exist_ok=True)
        env[f"IMDSGUARD_{key.upper()}_DIR"] = path
    handle = Guard(topo, workdir, env)
    yield handle
    if handle.proc is not None and handle.proc.poll() is None:
        handle.proc.kill()
        handle.proc.wait()


@pytest.fixture(params=["iptables", "nftables"])
def queued(guard: Guard, request: Any) -> Guard:
    """The guard on each backend, capturing from the queue (nftables: needs nft_queue)."""
    guard.backend = str(request.param)
    if guard.backend == "nftables":
        # A check-only nft batch (nft -c): nothing is changed in any namespace.
        require_kernel(
            "nft_queue (CONFIG_NFT_QUEUE)",
            NftablesBackend().capabilities().capture == Capture.QUEUE,
        )
    return guard


@pytest.fixture
def denied(test_users: dict[str, User]) -> User:
    return test_users["imdsg-denied"]


def _user_name(user: User) -> str:
    import pwd

    return pwd.getpwuid(user.uid).pw_name


def _token(guard: Guard, user: User, base: str) -> HttpResult:
    """An IMDSv2 token PUT as ``user`` (it must succeed: audit mode passes it)."""
    token = guard.topo.http(
        user,
        f"{base}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    assert token.ok and token.body, token
    return token


@pytest.mark.usefixtures("queued")
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_denied_curl_from_bash_is_one_attributed_event(
    guard: Guard, denied: User, v6: bool
) -> None:
    guard.start("allow:\n  users: [root]\n")
    url = f"http://[{IMDS_V6}]/latest/meta-data/" if v6 else f"http://{IMDS_V4}/latest/meta-data/"
    curl = ["/usr/bin/curl", "-sS", "--max-time", "3", url]
    script = 'echo "bash=$$"; "$@"; echo "rc=$?"'
    out = guard.topo.run(guard.topo.host, ["/bin/bash", "-c", script, "bash", *curl], user=denied)
    bash_pid = int(out.stdout.split("bash=")[1].split()[0])
    assert "rc=7" in out.stdout, out  # reject: a TCP reset at once
    (event,) = guard.wait_events(1)
    assert event["event"] == "imds_access_blocked"
    assert (event["mode"], event["family"]) == ("enforce", "ipv6" if v6 else "ipv4")
    assert (event["dst"], event["dport"]) == (IMDS_V6 if v6 else IMDS_V4, 80)
    assert (event["uid"], event["gid"], event["user"]) == (
        denied.uid,
        denied.gid,
        _user_name(denied),
    )
    assert event["attributed"] is True
    assert event["ppid"] == bash_pid and event["pid"] not in (None, bash_pid)
    assert (event["exe"], event["comm"], event["cmdline"]) == ("/usr/bin/curl", "curl", curl)
    assert event["ancestors"][0] == {"pid": bash_pid, "comm": "bash", "exe": "/usr/bin/bash"}
    assert event["ancestors"][-1]["pid"] == 1
    assert (event["attempts"], event["imds_version"]) == (1, "unknown")
    assert "unit" in event and "container" in event
    # The same event went to stdout (journald) as one JSON line.
    (line,) = [e for e in guard.stdout_events() if e.get("event") == "imds_access_blocked"]
    assert {k: line[k] for k in ("pid", "uid", "exe", "cmdline", "ancestors")} == {
        k: event[k] for k in ("pid", "uid", "exe", "cmdline", "ancestors")
    }


@pytest.mark.usefixtures("queued")
def test_burst_of_short_lived_processes_is_fully_attributed(
    guard: Guard, denied: User, workdir: str
) -> None:
    guard.start("allow:\n  users: [root]\n")
    code = PROBE.format(host=IMDS_V4, timeout=scaled(3))
    procs = [
        guard.topo.popen(guard.topo.host, ["/usr/bin/python3", "-c", code], user=denied)
        for _ in range(40)
    ]
    pids = {p.pid for p in procs}  # ip netns exec and setpriv exec: the same pid
    for proc in procs:
        assert proc.wait(timeout=scaled(30)) == 0
    events = guard.wait_events(40, timeout=15)
    assert len(events) == 40
    assert all(e["attributed"] for e in events), [e for e in events if not e["attributed"]]
    assert {e["pid"] for e in events} == pids
    python = os.path.realpath("/usr/bin/python3")
    assert {e["exe"] for e in events} == {python}
    assert {e["uid"] for e in events} == {denied.uid}
    stats = guard.stop()
    assert (stats["events"], stats["attributed"], stats["suppressed"]) == (40, 40, 0)


@pytest.mark.usefixtures("queued")
def test_drop_folds_syn_retransmits_into_one_event(guard: Guard, denied: User) -> None:
    guard.start("action: drop\nallow:\n  users: [root]\n")
    result = guard.topo.http(denied, f"http://{IMDS_V4}/latest/meta-data/", timeout=4)
    assert result.rc == 28, result  # timed out: dropped
    (event,) = guard.wait_events(1, timeout=10, settle=3.0)
    assert event["attempts"] > 1
    assert event["attributed"] and event["exe"] == "/usr/bin/curl"


@pytest.mark.usefixtures("queued")
def test_audit_mode_passes_traffic_and_tells_v1_from_v2(guard: Guard, denied: User) -> None:
    guard.start("mode: audit\nallow:\n  users: [root]\n")
    base = f"http://{IMDS_V4}"
    v1 = guard.topo.http(denied, f"{base}/latest/meta-data/instance-id")
    assert v1.ok, v1
    token = _token(guard, denied, base)
    v2 = guard.topo.http(
        denied,
        f"{base}/latest/meta-data/instance-id",
        headers={"X-aws-ec2-metadata-token": token.body},
    )
    assert v2.ok, v2
    v6 = guard.topo.imds_get(denied, "/latest/meta-data/instance-id", v2=False, v6=True)
    assert v6.ok, v6
    events = guard.wait_events(4, timeout=5, settle=1.5)
    assert [e["event"] for e in events] == ["imds_access_audited"] * 4
    seen = [(e["family"], e["cmdline"][-1].rsplit("/", 1)[-1], e["imds_version"]) for e in events]
    assert seen == [
        ("ipv4", "instance-id", "v1"),
        ("ipv4", "token", "v2"),
        ("ipv4", "instance-id", "v2"),
        ("ipv6", "instance-id", "v1"),
    ]
    assert all(e["attributed"] and e["uid"] == denied.uid for e in events)
    assert all(e["mode"] == "audit" and e["attempts"] == 1 for e in events)
    # The token was on curl's command line: it must not reach any log.
    assert token.body not in guard.events_text()
    assert token.body not in guard.stdout()


@pytest.mark.usefixtures("queued")
def test_hostile_argv_cannot_forge_lines_or_escape_the_terminal(
    guard: Guard, denied: User, workdir: str
) -> None:
    guard.start("allow:\n  users: [root]\n")
    # comm comes from the script's file name: put escapes there too.
    script = os.path.join(workdir, "x\n\x1b[31mEVIL")
    with open(script, "w") as fh:
        fh.write("#!/usr/bin/python3\n" + PROBE.format(host=IMDS_V4, timeout=scaled(3)))
    os.chmod(script, 0o755)  # noqa: S103 - the test user runs it
    hostile = [
        'a\n{"event":"imds_access_blocked","user":"root","pid":1}',
        "\x1b[2J\x1b]0;owned\x07\x1b[31mred",
        "\u202eevil\r",
    ]
    proc = guard.topo.run(guard.topo.host, [script, *hostile], user=denied)
    assert proc.returncode == 0, proc
    (event,) = guard.wait_events(1)
    assert event["cmdline"] == ["/usr/bin/python3", script, *hostile]
    assert event["comm"] == "x\n\x1b[31mEVIL"[:15]
    for text in (guard.events_text().encode(), guard.stdout().encode()):
        assert b"\x1b" not in text and b"\r" not in text
        blocked = [ln for ln in text.splitlines() if b"imds_access_blocked" in ln]
        assert len(blocked) == 1  # no forged second line
        assert json.loads(blocked[0])["cmdline"] == event["cmdline"]
    line = format_console(event)
    assert all(ch.isprintable() for ch in line), line
    assert "\\x1b[2J" in line and "\\n" in line and "\\u202e" in line


@pytest.mark.usefixtures("queued")
def test_fail_closed_without_the_capture(guard: Guard, denied: User, workdir: str) -> None:
    guard.start("allow:\n  users: [root]\n")
    assert guard.proc is not None
    guard.proc.send_signal(signal.SIGKILL)
    guard.proc.wait()
    imds_log = os.path.join(workdir, "imds.log")
    before = os.path.getsize(imds_log) if os.path.exists(imds_log) else 0
    for url in (f"http://{IMDS_V4}/latest/meta-data/", f"http://[{IMDS_V6}]/latest/meta-data/"):
        result = guard.topo.http(denied, url, timeout=2)
        assert result.rc != 0 and result.status == 0, result  # held packets are dropped
    after = os.path.getsize(imds_log) if os.path.exists(imds_log) else 0
    assert after == before  # nothing reached IMDS
    assert guard.topo.http(User(0, 0), f"http://{IMDS_V4}/latest/meta-data/").ok  # allowlisted


@pytest.mark.usefixtures("queued")
def test_a_second_capture_is_refused(guard: Guard) -> None:
    guard.start("allow:\n  users: [root]\n")
    code = (
        "from imdsguard.events.capture import Capture\n"
        "from imdsguard.events.log import EventLog\n"
        "import structlog\n"
        "c = Capture(queue_num=5421, mode='enforce', action='reject',\n"
        "            event_log=EventLog('/nonexistent/e'), logger=structlog.get_logger())\n"
        "c.start()\n"
    )
    out = guard.topo.run(guard.topo.host, [sys.executable, "-c", code], cwd=REPO)
    assert out.returncode != 0
    assert "QueueBusyError" in out.stderr and "already bound" in out.stderr, out.stderr


# --- nftables without nft_queue: the NFLOG capture ---------------------------------------
#
# This development machine's kernel is one (``CONFIG_NFT_QUEUE`` is not set), as
# some cloud and container kernels are. There the rules log a copy of each denied packet to an
# NFLOG group and deny it at once; the capture reads the copy. The kernel puts
# the socket owner's uid and gid in each copy, so every attempt is logged with
# its user; the process is found while its socket exists: always when the
# client waits (``action: drop``, audit mode), rarely with ``reject``, where a
# refused client closes its socket within microseconds.


@pytest.fixture
def no_nft_queue(guard: Guard) -> None:
    # A check-only nft batch (nft -c): nothing is changed in any namespace.
    if NftablesBackend().capabilities().capture == Capture.QUEUE:
        pytest.skip("this kernel has nft_queue: the NFLOG fallback is not used here")
    guard.backend, guard.source = "nftables", "nflog"


@pytest.mark.usefixtures("no_nft_queue")
def test_denied_curl_is_logged_with_its_user(guard: Guard, denied: User) -> None:
    guard.start("allow:\n  users: [root]\n")
    url = f"http://{IMDS_V4}/latest/meta-data/"
    result = guard.topo.http(denied, url, timeout=3)
    assert result.rc == 7, result  # reject: refused at once, not held
    (event,) = guard.wait_events(1)
    assert event["event"] == "imds_access_blocked" and event["mode"] == "enforce"
    assert (event["dst"], event["dport"], event["family"]) == (IMDS_V4, 80, "ipv4")
    assert (event["uid"], event["gid"], event["user"]) == (
        denied.uid,
        denied.gid,
        _user_name(denied),
    )
    print(f"\n[nflog] reject, curl: attributed={event['attributed']}")
    if event["attributed"]:  # found while curl still had its socket
        assert event["exe"] == "/usr/bin/curl" and event["ancestors"][-1]["pid"] == 1
    config = os.path.join(guard.workdir, "config.yaml")
    out = guard.topo.run(
        guard.topo.host,
        [sys.executable, "-m", "imdsguard", "status", "--json", "-c", config],
        env=guard.env,
        cwd=REPO,
    )
    status = json.loads(out.stdout)
    assert status["attribution"]["available"] is True, status["attribution"]
    assert "nft_queue" in status["attribution"]["reason"], status["attribution"]
    assert status["blocked"]["total"] == 1


@pytest.mark.usefixtures("no_nft_queue")
def test_a_waiting_client_is_fully_attributed_and_its_syns_folded(
    guard: Guard, denied: User
) -> None:
    guard.start("action: drop\nallow:\n  users: [root]\n")
    result = guard.topo.http(denied, f"http://{IMDS_V4}/latest/meta-data/", timeout=4)
    assert result.rc == 28, result  # dropped: timed out
    (event,) = guard.wait_events(1, timeout=10, settle=3.0)
    assert event["attempts"] > 1
    assert event["attributed"] and event["exe"] == "/usr/bin/curl"
    assert event["uid"] == denied.uid


@pytest.mark.usefixtures("no_nft_queue")
def test_burst_of_short_lived_processes_one_event_each(guard: Guard, denied: User) -> None:
    guard.start("allow:\n  users: [root]\n")
    procs = [
        guard.topo.popen(
            guard.topo.host,
            ["/usr/bin/python3", "-c", PROBE.format(host=IMDS_V4, timeout=scaled(3))],
            user=denied,
        )
        for _ in range(40)
    ]
    for proc in procs:
        assert proc.wait(timeout=scaled(30)) == 0
    events = guard.wait_events(40, timeout=15)
    assert len(events) == 40
    assert {e["uid"] for e in events} == {denied.uid}  # from the kernel: always
    found = [e for e in events if e["attributed"]]
    assert {e["pid"] for e in found} <= {p.pid for p in procs}
    print(f"\n[nflog] reject, 40 short-lived processes: {len(found)}/40 with their process")


@pytest.mark.usefixtures("no_nft_queue")
def test_audit_mode_tells_v1_from_v2(guard: Guard, denied: User) -> None:
    guard.start("mode: audit\nallow:\n  users: [root]\n")
    base = f"http://{IMDS_V4}"
    assert guard.topo.http(denied, f"{base}/latest/meta-data/instance-id").ok
    token = _token(guard, denied, base)
    events = guard.wait_events(2, timeout=5, settle=1.5)
    assert [(e["event"], e["imds_version"]) for e in events] == [
        ("imds_access_audited", "v1"),
        ("imds_access_audited", "v2"),
    ]
    # The user from the kernel, always; the process while curl still had its socket
    # (a local request is over in about a millisecond: usually, not on a loaded host).
    assert all(e["uid"] == denied.uid and e["user"] == _user_name(denied) for e in events)
    print(f"\n[nflog] audit: {sum(e['attributed'] for e in events)}/2 with their process")
    assert token.body not in guard.events_text()


@pytest.mark.usefixtures("no_nft_queue")
def test_still_closed_when_the_daemon_dies(guard: Guard, denied: User) -> None:
    guard.start("allow:\n  users: [root]\n")
    assert guard.proc is not None
    guard.proc.send_signal(signal.SIGKILL)
    guard.proc.wait()
    assert guard.topo.http(denied, f"http://{IMDS_V4}/latest/meta-data/", timeout=2).rc == 7
    assert guard.topo.http(User(0, 0), f"http://{IMDS_V4}/latest/meta-data/").ok
