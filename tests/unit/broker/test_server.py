"""The broker's socket server against the simulated IMDS on loopback.

The broker runs in this process; clients are this process too (or, as
root, child processes under other uids), so peer matching is exercised
with real kernel credentials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import structlog

from imdsguard.broker.cache import RefreshPolicy
from imdsguard.broker.checks import InlineChecker
from imdsguard.broker.client import credentials_main, fetch_credentials, fetch_health
from imdsguard.broker.peer import Decision, Peer
from imdsguard.broker.server import Broker, Limits
from imdsguard.config import parse_config
from imdsguard.errors import BrokerError
from imdsguard.imds import ImdsClient
from imdsguard_testing.imds_sim import ImdsSimulator, SimConfig

REPO = str(Path(__file__).resolve().parents[3])
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (other uids)")


class Logs:
    """structlog output captured as JSON lines, debug included, no redaction."""

    def __init__(self) -> None:
        self.buf = io.StringIO()
        self.logger = structlog.wrap_logger(
            structlog.WriteLogger(self.buf),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso"),
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        )

    def text(self) -> str:
        return self.buf.getvalue()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(line) for line in self.text().splitlines()]
        return [e for e in out if name is None or e["event"] == name]


@pytest.fixture
def logs() -> Logs:
    return Logs()


@pytest.fixture
def sim() -> Iterator[tuple[ImdsSimulator, str]]:
    simulator = ImdsSimulator(SimConfig(http_tokens="required"))
    [(host, port)] = simulator.serve([("127.0.0.1", 0)])
    yield simulator, f"http://{host}:{port}"
    simulator.shutdown()


StartBroker = Callable[..., Broker]


@pytest.fixture
def start_broker(
    tmp_path: Path, sim: tuple[ImdsSimulator, str], logs: Logs
) -> Iterator[StartBroker]:
    brokers: list[Broker] = []

    def start(
        clients: str | None = None,
        limits: Limits | None = None,
        refresh: RefreshPolicy | None = None,
        socket_path: str | None = None,
        url: str | None = None,
        limits_yaml: str = "",
    ) -> Broker:
        path = socket_path or str(tmp_path / "run" / "broker.sock")
        clients = clients if clients is not None else f"users: [{os.geteuid()}]"
        config = parse_config(
            f"broker:\n  enabled: true\n  socket: {path}\n  clients: {{{clients}}}\n"
            + (f"  limits: {{{limits_yaml}}}\n" if limits_yaml else "")
            + f"imds:\n  url: {url or sim[1]}\n",
            str(tmp_path / "config.yaml"),
        )
        broker = Broker(
            config,
            logs.logger,
            imds=ImdsClient(config.imds_url, timeout=0.5),
            limits=limits,
            refresh=refresh,
        )
        broker.start()
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.stop()


def raw(path: str, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a new connection; the status, headers and body of the answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError):
            s.sendall(data)  # the server may answer (and close) before reading it all
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            # Closed by the server with our input unread (a refusal sent early):
            # what arrived before the reset is the answer.
            if not reply:
                raise
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(path: str, route: str = "/v1/credentials") -> tuple[int, Any]:
    status, _, body = raw(path, f"GET {route} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return status, json.loads(body) if body else None


def sock_of(broker: Broker) -> str:
    return broker.config.broker.socket


# -- routes


def test_credentials_served_to_an_allowed_user(
    start_broker: StartBroker, sim: tuple[ImdsSimulator, str], logs: Logs
) -> None:
    broker = start_broker()
    status, headers, body = raw(sock_of(broker), b"GET /v1/credentials HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert headers["Connection"] == "close"
    doc = json.loads(body)
    current = sim[0].current_credentials()
    assert doc == {
        "Version": 1,
        "AccessKeyId": current["AccessKeyId"],
        "SecretAccessKey": current["SecretAccessKey"],
        "SessionToken": current["Token"],
        "Expiration": current["Expiration"],
    }
    [line] = logs.events("broker_request")
    assert line["status"] == 200
    assert line["uid"] == os.geteuid()
    assert line["pid"] == os.getpid()
    assert line["exe"] == os.path.realpath(sys.executable)
    assert line["allowed_as"] == f"user:{os.geteuid()}" or line["allowed_as"].startswith("user:")


def test_allowed_by_group_and_by_exe(start_broker: StartBroker, tmp_path: Path) -> None:
    by_group = start_broker(f"groups: [{os.getegid()}]")
    assert get(sock_of(by_group))[0] == 200
    python = os.path.realpath(sys.executable)
    by_exe = start_broker(f"exes: [{python}]", socket_path=str(tmp_path / "exe" / "b.sock"))
    status, doc = get(sock_of(by_exe))
    if os.stat(python).st_uid == 0 and not os.stat(python).st_mode & 0o022:
        assert status == 200, doc
    else:
        assert status == 403


def test_non_client_refused_with_reason_and_logged(start_broker: StartBroker, logs: Logs) -> None:
    broker = start_broker("users: [4000123], groups: [4000124]")
    status, doc = get(sock_of(broker))
    assert status == 403
    assert doc["error"].startswith(f"uid {os.geteuid()} is not an allowed broker client")
    assert "broker.clients" in doc["error"]
    [refused] = logs.events("broker_refused")
    for key in ("uid", "user", "gid", "pid", "ppid", "exe", "cmdline", "comm", "ancestors"):
        assert key in refused, key
    assert refused["pid"] == os.getpid()
    assert refused["exe"] == os.path.realpath(sys.executable)
    assert refused["level"] == "warning"
    assert logs.events("broker_request")[0]["status"] == 403
    # Repeats are counted, not logged line by line.
    for _ in range(5):
        assert get(sock_of(broker))[0] == 403
    assert len(logs.events("broker_refused")) == 1


def test_fetch_health(start_broker: StartBroker) -> None:
    broker = start_broker()
    assert broker.cache.wait_current(2) is not None
    status, doc = fetch_health(sock_of(broker))
    assert status == 200
    assert doc["status"] == "ok"


def test_socket_directory_made_reachable(start_broker: StartBroker, tmp_path: Path) -> None:
    run = tmp_path / "private"
    run.mkdir(mode=0o700)
    broker = start_broker(socket_path=str(run / "b.sock"))
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o711
    assert get(sock_of(broker))[0] == 200


def test_refusal_logging_is_bounded(start_broker: StartBroker, logs: Logs) -> None:
    broker = start_broker()
    decision = Decision(False, None, "not allowed")
    assert isinstance(broker.checker, InlineChecker)
    for uid in range(5000, 5030):  # thirty different callers at once
        broker.checker.decider.refusals.record(Peer(uid=uid, gid=uid, pid=None), decision, "s")
    assert len(logs.events("broker_refused")) == 20


def test_health_route(start_broker: StartBroker) -> None:
    broker = start_broker("users: [4000123]")  # health is open to everyone
    assert get(sock_of(broker))[0] == 403
    assert broker.cache.wait_current(2) is not None  # the first fetch is done
    status, doc = get(sock_of(broker), "/v1/health")
    assert status == 200
    assert doc["status"] == "ok"
    assert doc["healthy"] is True
    assert doc["credentials_expire"].endswith("Z")


def test_other_paths_and_methods(start_broker: StartBroker) -> None:
    path = sock_of(start_broker())
    assert get(path, "/v1/nope")[0] == 404
    assert get(path, "/latest/meta-data/")[0] == 404
    status, headers, _ = raw(path, b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405
    assert headers["Allow"] == "GET"
    assert raw(path, b"DELETE /v1/health HTTP/1.1\r\n\r\n")[0] == 405
    assert get(path, "/v1/credentials?x=1")[0] == 200  # query ignored
    assert raw(path, b"GET /v1/credentials HTTP/1.0\r\n\r\n")[0] == 200
    assert raw(path, b"GET /v1/credentials HTTP/2.0\r\n\r\n")[0] == 505
    assert raw(path, b"GET /v1/credentials\r\n\r\n")[0] == 400
    assert raw(path, b"GET http://x/v1/credentials HTTP/1.1\r\n\r\n")[0] == 400
    body = b"GET /v1/credentials HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    assert raw(path, body)[0] == 413
    assert (
        raw(path, b"GET /v1/credentials HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")[0] == 400
    )
    assert raw(path, b"GET /v1/credentials HTTP/1.1\r\nBad Header\r\n\r\n")[0] == 400
    assert raw(path, b"GET /v1/credentials HTTP/1.1\r\nX: \xff\r\n\r\n")[0] == 400


def test_failed_requests_are_logged_once_per_uid_and_status(
    start_broker: StartBroker, logs: Logs
) -> None:
    broker = start_broker()
    path = sock_of(broker)
    for _ in range(30):
        assert raw(path, b"junk\r\n\r\n")[0] == 400
    for _ in range(5):
        assert raw(path, b"GET /v1/credentials HTTP/2.0\r\n\r\n")[0] == 505
    for _ in range(3):
        assert get(path)[0] == 200
    lines = logs.events("broker_request")
    assert [e["status"] for e in lines] == [400, 505, 200, 200, 200]
    assert lines[0]["suppressed_before"] == 0 and "suppressed_before" not in lines[2]
    assert broker.health()["requests_by_status"] == {"200": 3, "400": 30, "505": 5}
    # After the interval, the next line says how many were held back.
    broker._failed_log.interval = 0.0
    assert raw(path, b"junk\r\n\r\n")[0] == 400
    assert logs.events("broker_request")[-1]["suppressed_before"] == 29


def test_size_limits(start_broker: StartBroker) -> None:
    path = sock_of(start_broker())
    huge_header = b"GET /v1/credentials HTTP/1.1\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n"
    assert raw(path, huge_header)[0] == 431
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(100))
    assert raw(path, b"GET /v1/credentials HTTP/1.1\r\n" + many + b"\r\n")[0] == 431
    long_line = b"GET /v1/" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n"
    assert raw(path, long_line)[0] == 414
    no_end = b"GET /v1/credentials HTTP/1.1\r\n" + b"X: y\r\n" * 2000  # never a blank line
    assert raw(path, no_end)[0] == 431


def test_unfinished_request_times_out(start_broker: StartBroker) -> None:
    path = sock_of(start_broker(limits=Limits(read_timeout=0.3)))
    start = time.monotonic()
    assert raw(path, b"GET /v1/cred")[0] == 408
    assert 0.25 < time.monotonic() - start < 1.5
    with socket.socket(socket.AF_UNIX) as idle:  # connects and says nothing: just closed
        idle.settimeout(3)
        idle.connect(path)
        assert idle.recv(100) == b""


def _fetch_times(path: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.monotonic()
        assert get(path)[0] == 200
        times.append(time.monotonic() - start)
    return times


def test_slow_clients_do_not_stall_others(start_broker: StartBroker) -> None:
    path = sock_of(start_broker())
    get(path)  # warm: credentials cached
    baseline = statistics.median(_fetch_times(path, 30))
    slow: list[socket.socket] = []
    try:
        for i in range(40):  # slowloris: partial heads, a byte now and then, idle ones
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            if i % 2:
                s.sendall(b"GET /v1/credentials HTTP/1.1\r\nX-Slow: ")
            slow.append(s)
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.05):
                for s in slow[1::2]:
                    with contextlib.suppress(OSError):
                        s.send(b"a")

        dripper = threading.Thread(target=trickle)
        dripper.start()
        try:
            times = _fetch_times(path, 30)
        finally:
            stop.set()
            dripper.join()
    finally:
        for s in slow:
            s.close()
    # A stalled server would wait out a slow client's read timeout (3 s) per request;
    # 0.5 s leaves room for a loaded CI machine's scheduler, not for a stall.
    assert statistics.median(times) - baseline < 0.1, (baseline, times)
    assert max(times) - baseline < 0.5, (baseline, times)


def test_connection_cap_per_uid(start_broker: StartBroker, logs: Logs) -> None:
    broker = start_broker(limits=Limits(max_per_uid=3))
    path = sock_of(broker)
    idle = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            idle.append(s)
        time.sleep(0.1)
        status, doc = get(path)
        assert status == 503
        assert doc["error"] == "broker busy: too many connections"
    finally:
        for s in idle:
            s.close()
    time.sleep(0.1)
    assert get(path)[0] == 200
    assert broker.health()["rejected_connections"] == 1
    assert logs.events("broker_busy")


def test_limits_come_from_the_config_and_a_reload(start_broker: StartBroker) -> None:
    broker = start_broker(limits_yaml="max_per_uid: 2, max_header_bytes: 512")
    path = sock_of(broker)
    padded = b"GET /v1/credentials HTTP/1.1\r\nX-Pad: " + b"a" * 600 + b"\r\n\r\n"
    assert raw(path, padded)[0] == 431
    idle = []
    try:
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            idle.append(s)
        time.sleep(0.1)
        assert get(path)[0] == 503
        looser = dataclasses.replace(
            broker.config,
            broker=dataclasses.replace(broker.config.broker, limits=Limits(max_per_uid=8)),
        )
        broker.reconfigure(looser)  # same socket: applies to the next connection
        assert broker.limits.max_per_uid == 8
        assert get(path)[0] == 200
        assert raw(path, padded)[0] == 200
    finally:
        for s in idle:
            s.close()


def test_many_concurrent_clients_one_imds_fetch(
    start_broker: StartBroker, sim: tuple[ImdsSimulator, str]
) -> None:
    broker = start_broker()
    path = sock_of(broker)
    errors: list[object] = []

    def client() -> None:
        try:
            for _ in range(10):
                fetch_credentials(path)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sim[0].request_count <= 3  # token, role, credentials
    deadline = time.monotonic() + 2  # the last answers may still be being counted
    while broker.health()["requests"] < 500 and time.monotonic() < deadline:
        time.sleep(0.01)
    health = broker.health()
    assert health["requests_by_status"] == {"200": 500}
    assert health["imds_requests"] <= 3


# -- IMDS trouble


def test_no_role_gives_503_and_unavailable(start_broker: StartBroker) -> None:
    simulator = ImdsSimulator(SimConfig(role=None))
    [(host, port)] = simulator.serve([("127.0.0.1", 0)])
    try:
        broker = start_broker(url=f"http://{host}:{port}", refresh=RefreshPolicy(request_wait=0.3))
        status, doc = get(sock_of(broker))
        assert status == 503
        assert "no IAM role is attached" in doc["error"]
        status, health = get(sock_of(broker), "/v1/health")
        assert status == 503
        assert health["status"] == "unavailable"
        assert broker.health()["healthy"] is False
    finally:
        simulator.shutdown()


def test_imds_down_at_start_then_back(
    start_broker: StartBroker, sim: tuple[ImdsSimulator, str]
) -> None:
    simulator, _ = sim
    simulator.set_fault("500")
    broker = start_broker(refresh=RefreshPolicy(request_wait=0.5))
    status, doc = get(sock_of(broker))
    assert status == 503
    assert "HTTP 500" in doc["error"]
    simulator.clear_fault()
    time.sleep(1.1)  # a waiting client triggers a fetch at most once a second
    status, doc = get(sock_of(broker))
    assert status == 200, doc
    assert broker.health()["status"] == "ok"


@pytest.mark.parametrize("fault", ["500", "timeout", "truncate", "reset", "expire-tokens"])
def test_cached_credentials_served_through_imds_faults(
    start_broker: StartBroker, sim: tuple[ImdsSimulator, str], fault: str
) -> None:
    simulator, _ = sim
    broker = start_broker()
    first = get(sock_of(broker))[1]
    simulator.set_fault(fault, delay=2.0 if fault == "timeout" else None)
    broker.cache._due = 0.0  # a refresh is due now
    broker.cache.wake.set()
    deadline = time.monotonic() + 5
    while broker.cache.health()["fetches"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(5):
        start = time.monotonic()
        status, doc = get(sock_of(broker))
        assert status == 200
        assert doc == first
        assert time.monotonic() - start < 0.5  # a request waiting on the refresh takes 2 s
    expected = "ok" if fault == "expire-tokens" else "degraded"
    assert broker.health()["status"] == expected
    status, health = get(sock_of(broker), "/v1/health")
    assert status == 200
    assert health["status"] == expected


# -- the socket file


def test_socket_file_mode_and_cleanup(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = start_broker()
    path = sock_of(broker)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o755
    broker.stop()
    assert not os.path.exists(path)


def test_refuses_to_start_over_a_live_socket(start_broker: StartBroker) -> None:
    first = start_broker()
    with pytest.raises(BrokerError, match="another broker is already listening"):
        start_broker(socket_path=sock_of(first))
    assert get(sock_of(first))[0] == 200  # untouched


def test_stale_socket_replaced(start_broker: StartBroker, tmp_path: Path) -> None:
    path = tmp_path / "run" / "broker.sock"
    path.parent.mkdir(mode=0o755)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays; nobody listens
    broker = start_broker(socket_path=str(path))
    assert get(sock_of(broker))[0] == 200


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_never_follows_or_deletes_what_is_not_a_socket(
    start_broker: StartBroker, tmp_path: Path, kind: str
) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    target = tmp_path / "precious"
    target.write_text("keep me")
    path = run / "broker.sock"
    if kind == "symlink":
        path.symlink_to(target)
    else:
        path.write_text("not a socket")
    with pytest.raises(BrokerError, match="a symlink" if kind == "symlink" else "not a socket"):
        start_broker(socket_path=str(path))
    assert target.read_text() == "keep me"
    assert os.path.lexists(path)


def test_stop_leaves_a_successors_socket(start_broker: StartBroker) -> None:
    broker = start_broker()
    path = sock_of(broker)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    try:
        broker.stop()
        assert os.path.exists(path)
    finally:
        other.close()


@needs_root
def test_refuses_a_directory_someone_else_owns(start_broker: StartBroker, tmp_path: Path) -> None:
    run = tmp_path / "theirs"
    run.mkdir(mode=0o755)
    os.chown(run, 65534, 65534)
    with pytest.raises(BrokerError, match="not a directory owned by uid 0"):
        start_broker(socket_path=str(run / "broker.sock"))


def test_reconfigure_clients_and_socket(start_broker: StartBroker, tmp_path: Path) -> None:
    broker = start_broker()
    old = sock_of(broker)
    assert get(old)[0] == 200
    text = (
        "broker:\n  enabled: true\n  socket: {sock}\n  clients: {{users: [4000123]}}\n"
        f"imds:\n  url: {broker.config.imds_url}\n"
    )
    broker.reconfigure(parse_config(text.format(sock=old)))
    assert get(old)[0] == 403
    new = str(tmp_path / "other" / "b.sock")
    broker.reconfigure(parse_config(text.format(sock=new).replace("4000123", str(os.geteuid()))))
    assert not os.path.exists(old)
    assert get(new)[0] == 200


def test_reconfigure_to_an_unusable_socket_keeps_the_old_one(
    start_broker: StartBroker, tmp_path: Path, logs: Logs
) -> None:
    broker = start_broker()
    old = sock_of(broker)
    bad = str(tmp_path / "missing" / "parent" / "b.sock")
    broker.reconfigure(
        parse_config(
            f"broker:\n  enabled: true\n  socket: {bad}\n  clients: {{users: [4000123]}}\n"
            f"imds:\n  url: {broker.config.imds_url}\n"
        )
    )  # no exception: a reload must not take the daemon down
    [failed] = logs.events("broker_reconfigure_failed")
    assert "missing/parent" in failed["error"]
    assert sock_of(broker) == old
    assert get(old)[0] == 403  # the new clients apply
    assert broker.health()["status"] in ("ok", "unavailable")


# -- the client side: imdsguard credentials


def test_credentials_main(
    start_broker: StartBroker, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    broker = start_broker()
    assert credentials_main(sock_of(broker)) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["Version"] == 1
    assert set(doc) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
    assert err == ""

    assert credentials_main(str(tmp_path / "nothing.sock")) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "does not exist: is the imdsguard daemon running" in err


def test_credentials_main_refused(
    start_broker: StartBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = start_broker("users: [4000123]")
    assert credentials_main(sock_of(broker)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("imdsguard: the broker refused: uid ")
    assert err.count("\n") == 1


def test_fetch_credentials_errors(tmp_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    with pytest.raises(BrokerError, match="nothing is listening"):
        fetch_credentials(str(tmp_path / "dead.sock"))
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(1)
    try:
        with pytest.raises(BrokerError, match=r"did not answer within 0\.2s"):
            fetch_credentials(str(tmp_path / "mute.sock"), timeout=0.2)
    finally:
        mute.close()


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A directory other users can reach (pytest's tmp_path is private to us)."""
    path = tempfile.mkdtemp(prefix="imdsg-unit-")
    os.chmod(path, 0o755)  # noqa: S103 - test users must reach the socket
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_other_uids_by_user_group_and_refused(start_broker: StartBroker, open_dir: str) -> None:
    broker = start_broker(
        "users: [4000001], groups: [4000002]",
        socket_path=os.path.join(open_dir, "run", "broker.sock"),
    )
    argv = [
        sys.executable,
        "-c",
        "import sys; from imdsguard.broker.client import credentials_main as m; "
        "sys.exit(m(sys.argv[1]))",
        sock_of(broker),
    ]
    env = {"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"}

    def run(uid: int, gid: int, groups: list[int]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            user=uid,
            group=gid,
            extra_groups=groups,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    try:
        allowed = run(4000001, 4000001, [])
    except PermissionError:
        pytest.skip(f"{sys.executable} cannot be run by other users (under /root?)")
    assert allowed.returncode == 0, allowed.stderr
    by_group = run(4000003, 4000003, [4000002])
    assert by_group.returncode == 0, by_group.stderr
    assert json.loads(by_group.stdout)["Version"] == 1
    refused = run(4000003, 4000003, [4000004])
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.startswith("imdsguard: the broker refused: uid 4000003 is not")


# -- secrets


def test_no_secret_in_logs_health_or_errors(
    start_broker: StartBroker, sim: tuple[ImdsSimulator, str], logs: Logs
) -> None:
    simulator, _ = sim
    broker = start_broker()
    refusing = start_broker(
        "users: [4000123]", socket_path=str(Path(sock_of(broker)).parent / "r.sock")
    )
    seen: list[dict[str, Any]] = []
    seen.append(get(sock_of(broker))[1])
    get(sock_of(refusing))
    get(sock_of(broker), "/v1/health")
    raw(sock_of(broker), b"GET /v1/credentials HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n")
    for fault in ("500", "truncate", "reset", "expire-tokens"):
        simulator.set_fault(fault)
        broker.cache._due = 0.0
        broker.cache.wake.set()
        time.sleep(0.2)
        seen.append(get(sock_of(broker))[1])
    simulator.clear_fault()
    secrets = set(simulator._tokens)  # every IMDSv2 token issued
    for doc in seen:
        secrets |= {doc["SecretAccessKey"], doc["SessionToken"]}
    current = simulator.current_credentials()
    secrets |= {current["SecretAccessKey"], current["Token"]}
    assert len(secrets) >= 3
    published = logs.text() + json.dumps(broker.health()) + json.dumps(refusing.health())
    published += repr(broker.imds) + repr(broker.cache.current())
    assert logs.events("broker_request")
    assert logs.events("broker_refused")
    for secret in secrets:
        assert secret not in published
        assert secret[:16] not in published
