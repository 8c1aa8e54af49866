"""Prometheus output, checked with prometheus-client's own parser."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imdsguard import metrics
from imdsguard.config import Config, MetricsConfig
from imdsguard.errors import ImdsGuardError
from imdsguard_testing.fakes import fake_daemon

SNAP: dict[str, Any] = {
    "version": "0.1.0",
    "backend": "nftables",
    "mode": "enforce",
    "protected": True,
    "rules": {"ipv4": "ok", "ipv6": "ok"},
    "rules_restored_total": 3,
    "reload_failures": 1,
    "blocked_total": 42,
    "blocked_by": {("www-data", "/usr/bin/curl"): 40, ('evil"\nuser', "/tmp/x\\y"): 2},
    "broker_requests": {200: 7, 403: 1},
    "broker_healthy": True,
    "updated": 1700000000.0,
}


def _parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_contract_metrics_parse_with_prometheus_parser() -> None:
    families = _parse(metrics.render(SNAP))
    for name in ("imdsguard_protected", "imdsguard_blocked", "imdsguard_rules_restored",
                 "imdsguard_broker_requests"):  # fmt: skip
        assert name in families, sorted(families)
    assert families["imdsguard_protected"].samples[0].value == 1
    assert families["imdsguard_blocked"].type == "counter"
    assert families["imdsguard_blocked"].samples[0].value == 42
    assert families["imdsguard_rules_restored"].samples[0].value == 3
    statuses = {s.labels["status"]: s.value for s in families["imdsguard_broker_requests"].samples}
    assert statuses == {"200": 7, "403": 1}


def test_untrusted_label_values_are_escaped() -> None:
    families = _parse(metrics.render(SNAP))
    users = {s.labels["user"] for s in families["imdsguard_blocked_by_process"].samples}
    assert 'evil"\nuser' in users  # survived the round trip intact, one sample per line


def _by_process(text: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["user"], s.labels["exe"]): s.value
        for s in _parse(text)["imdsguard_blocked_by_process"].samples
    }


def test_per_process_labels_are_bounded() -> None:
    snap = dict(SNAP, blocked_by={(f"u{i}", f"/bin/e{i}"): i + 1 for i in range(500)})
    samples = _by_process(metrics.render(snap))
    assert len(samples) == metrics.MAX_SERIES + 1
    assert samples[("other", "other")] == sum(range(1, 501 - metrics.MAX_SERIES))
    assert ("u499", "/bin/e499") in samples  # the busiest get the first series


def test_per_process_series_only_go_up_as_processes_change_rank() -> None:
    """A pair keeps its series once exported, and other never falls (alarms on increase())."""
    series = metrics.ProcessSeries(cap=3)
    counts: dict[tuple[str, str], int] = {}
    scrapes = []
    # Each round a new process becomes the busiest; earlier ones stay quiet.
    for rnd in range(8):
        counts[("app", f"/bin/p{rnd}")] = 10 * (rnd + 1)
        counts[("app", "/bin/steady")] = rnd + 1
        scrapes.append(_by_process(metrics.render(dict(SNAP, blocked_by=dict(counts)), series)))
    for before, after in zip(scrapes, scrapes[1:]):
        assert set(before) <= set(after), "a series disappeared"
        for key, value in before.items():
            assert after[key] >= value, (key, value, after[key])
    last = scrapes[-1]
    assert len(last) == 3 + 1  # bounded: three pairs of their own, then other
    assert sum(last.values()) == sum(counts.values())  # nothing lost


def test_process_overflow_from_the_capture_is_counted_as_other() -> None:
    counts = {("app", "/bin/a"): 5, ("other", "other"): 7}
    assert _by_process(metrics.render(dict(SNAP, blocked_by=counts))) == {
        ("app", "/bin/a"): 5,
        ("other", "other"): 7,
    }


def test_exporter_keeps_its_series_across_reconfigure(tmp_path: Path) -> None:
    counts = {(f"u{i}", "/bin/x"): 100 - i for i in range(metrics.MAX_SERIES)}
    snap = dict(SNAP, blocked_by=counts)
    exporter = metrics.MetricsExporter(MetricsConfig(), lambda: snap, logger=None)
    first = _by_process(exporter.render())
    exporter.reconfigure(SimpleNamespace(metrics=MetricsConfig(textfile=str(tmp_path / "m"))))
    counts[("late", "/bin/busiest")] = 10_000
    after = _by_process(exporter.render())
    assert set(first) <= set(after) and after[("other", "other")] == 10_000
    exporter.stop()


def test_endpoint_that_cannot_bind_is_an_error_and_reconfigure_keeps_the_old(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = MetricsConfig(listen=("127.0.0.1", taken.getsockname()[1]))
        with pytest.raises(ImdsGuardError, match=r"metrics\.listen: cannot listen on "):
            metrics.MetricsExporter(busy, lambda: SNAP, logger=None).start()
        textfile = MetricsConfig(textfile=str(tmp_path / "m.prom"))
        exporter = metrics.MetricsExporter(textfile, lambda: SNAP, logger=None)
        exporter.start()
        with pytest.raises(ImdsGuardError):
            exporter.reconfigure(SimpleNamespace(metrics=busy))
        assert exporter.config == textfile and exporter.health()["listen"] is None
        (tmp_path / "m.prom").unlink()
        exporter.write_now()
        assert (tmp_path / "m.prom").exists()  # the old output is still served
        exporter.stop()


def test_blocked_total_counts_rate_limited_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon counts every attempt its capture saw, logged or suppressed."""

    class Capture:
        def health(self) -> dict[str, Any]:
            return {"events": 300, "suppressed": 1700, "dropped": 2, "by_process": {}}

    daemon = fake_daemon(Config())
    daemon._components["capture"] = Capture()  # type: ignore[assignment]
    snap = daemon.metrics_snapshot()
    assert snap["blocked_total"] == 2002
    family = _parse(metrics.render(snap))["imdsguard_blocked"]
    assert family.samples[0].value == 2002
    assert "rate limit" in family.documentation and "since the daemon started" in (
        family.documentation
    )


def test_textfile_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "imdsguard.prom"
    metrics.write_textfile(str(path), metrics.render(SNAP))
    metrics.write_textfile(str(path), metrics.render(dict(SNAP, protected=False)))
    assert _parse(path.read_text())["imdsguard_protected"].samples[0].value == 0
    assert [p.name for p in tmp_path.iterdir()] == ["imdsguard.prom"]  # no temp files left
    assert oct(path.stat().st_mode & 0o777) == "0o644"


# --- exact values, every state, the last word, process_* (issue 16 item 1) ------------


def _samples(text: str) -> dict[str, str]:
    """Unlabelled sample name -> the value exactly as written."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split(" ")
            out[name] = value
    return out


def test_values_are_written_exactly() -> None:
    snap = dict(SNAP, updated=1796174521.389, blocked_total=1234567, rules_restored_total=10**15)
    written = _samples(metrics.render(snap))
    assert written["imdsguard_last_update_timestamp_seconds"] == "1796174521.389"
    assert written["imdsguard_blocked_total"] == "1234567"
    assert written["imdsguard_rules_restored_total"] == "1000000000000000"
    families = _parse(metrics.render(snap))
    assert families["imdsguard_last_update_timestamp_seconds"].samples[0].value == 1796174521.389
    assert families["imdsguard_blocked"].samples[0].value == 1234567


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (True, "1"),
        (1234567, "1234567"),
        (1234567.0, "1234567"),
        (0.1, "0.1"),
        (1796174521.389, "1796174521.389"),
        (2.0**60, "1.152921504606847e+18"),
        (float("inf"), "+Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert metrics.format_value(value) == text
    if text != "NaN":
        assert float(text) == float(value)


def test_every_rules_state_per_family_is_a_zero_or_one() -> None:
    snap = dict(SNAP, rules={"ipv4": "missing", "ipv6": "ok"})
    states = {
        (s.labels["family"], s.labels["state"]): s.value
        for s in _parse(metrics.render(snap))["imdsguard_rules_state"].samples
    }
    assert len(states) == 2 * 4
    assert {k for k, v in states.items() if v == 1} == {("ipv4", "missing"), ("ipv6", "ok")}
    assert set(states.values()) == {0, 1}
    # Before the first inspection (no states yet): both families, all 0.
    empty = _parse(metrics.render(dict(SNAP, rules={})))["imdsguard_rules_state"].samples
    assert len(empty) == 8 and all(s.value == 0 for s in empty)


def test_stop_leaves_a_textfile_that_says_down(tmp_path: Path) -> None:
    path = tmp_path / "imdsguard.prom"
    exporter = metrics.MetricsExporter(MetricsConfig(textfile=str(path)), lambda: SNAP, None)
    exporter.start()
    exporter.write_now()
    metrics_now = _parse(path.read_text())
    assert metrics_now["imdsguard_daemon_up"].samples[0].value == 1
    assert metrics_now["imdsguard_protected"].samples[0].value == 1
    exporter.stop()
    last = _parse(path.read_text())
    assert last["imdsguard_daemon_up"].samples[0].value == 0
    assert last["imdsguard_protected"].samples[0].value == 0


def test_reconfigure_to_another_textfile_marks_the_old_one_down(tmp_path: Path) -> None:
    old, new = tmp_path / "old.prom", tmp_path / "new.prom"
    exporter = metrics.MetricsExporter(MetricsConfig(textfile=str(old)), lambda: SNAP, None)
    exporter.start()
    exporter.write_now()
    exporter.reconfigure(SimpleNamespace(metrics=MetricsConfig(textfile=str(new))))
    exporter.write_now()
    assert _parse(old.read_text())["imdsguard_daemon_up"].samples[0].value == 0
    assert _parse(new.read_text())["imdsguard_daemon_up"].samples[0].value == 1
    exporter.stop()


def test_process_metrics_describe_this_process() -> None:
    import resource

    facts = metrics.process_facts()
    assert facts["process_resident_memory_bytes"] > 1024 * 1024
    assert facts["process_virtual_memory_bytes"] >= facts["process_resident_memory_bytes"]
    assert 0 < facts["process_cpu_seconds_total"] < time.process_time() + 1
    assert facts["process_open_fds"] >= 3
    assert facts["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert abs(facts["process_start_time_seconds"] - _started()) < 2
    families = _parse(metrics.render(dict(SNAP, process=facts)))
    assert families["process_resident_memory_bytes"].type == "gauge"
    assert families["process_cpu_seconds"].type == "counter"
    assert families["process_open_fds"].samples[0].value == facts["process_open_fds"]


def _started() -> float:
    """This process's start time, from ps (independent of our reading of /proc)."""
    out = subprocess.run(
        ["ps", "-o", "lstart=", "-p", str(os.getpid())],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, LC_ALL="C", TZ="UTC"),
    ).stdout.strip()
    return datetime.strptime(out, "%a %b %d %H:%M:%S %Y").replace(tzinfo=timezone.utc).timestamp()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus)")
def test_promtool_accepts_the_exposition() -> None:
    snap = dict(
        SNAP,
        updated=1796174521.389,
        blocked_total=1234567,
        rules={"ipv4": "drifted", "ipv6": "disabled"},
        process=metrics.process_facts(),
    )
    for text in (metrics.render(snap), metrics.render(dict(snap, up=False))):
        proc = subprocess.run(
            ["promtool", "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


# --- the endpoint: bounded in connections and time (issue 14 item 2) ------------------


def _get(address: tuple[str, int], path: str = "/metrics", timeout: float = 5) -> bytes:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.fixture
def server() -> Any:
    srv = metrics.MetricsServer(
        ("127.0.0.1", 0),
        lambda: metrics.render(SNAP),
        logger=None,
        max_connections=6,
        max_per_uid=3,
        deadline=0.5,
    )
    srv.start()
    yield srv
    srv.stop()


def test_endpoint_serves_metrics_and_nothing_else(server: Any) -> None:
    reply = _get(server.address)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"text/plain; version=0.0.4" in head
    assert _parse(body.decode())["imdsguard_protected"].samples[0].value == 1
    assert _get(server.address, "/other").startswith(b"HTTP/1.1 404 ")
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 405 ")
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"GET /" + b"a" * 5000)
        assert sock.recv(100).startswith(b"HTTP/1.1 414 ")


def test_idle_connections_are_capped_per_uid_and_refused_at_once(server: Any) -> None:
    idle = [socket.create_connection(server.address, timeout=5) for _ in range(3)]
    try:
        wait = time.monotonic() + 2
        while server.stats()["connections"] < 3 and time.monotonic() < wait:
            time.sleep(0.01)
        # Over the per-uid cap: 503 and closed, no fd held for it.
        start = time.monotonic()
        with socket.create_connection(server.address, timeout=5) as extra:
            reply = b""
            while chunk := extra.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 503 ")
        assert time.monotonic() - start < 0.4  # refused at once, not at the deadline
        assert server.stats()["connections"] == 3
        assert server.stats()["refused_busy"] >= 1
    finally:
        for sock in idle:
            sock.close()


def test_every_connection_has_one_deadline_for_the_whole_exchange(server: Any) -> None:
    with socket.create_connection(server.address, timeout=5) as slow:
        start = time.monotonic()
        for _ in range(20):  # a byte now and then never extends the deadline
            try:
                slow.send(b"G")
            except OSError:
                break
            time.sleep(0.05)
        assert slow.recv(100) == b""  # closed without an answer
        assert 0.4 < time.monotonic() - start < 2.5
    assert server.stats()["timed_out"] >= 1
    assert server.stats()["connections"] == 0
    assert _get(server.address).startswith(b"HTTP/1.1 200 ")  # and it serves on


def test_a_thousand_idle_connections_cost_the_server_a_few_fds(server: Any) -> None:
    """What crashed the daemon: ~1,000 idle connections, one thread and fd each, forever."""
    before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    idle = []
    try:
        for i in range(1000):
            if i % 32 == 0:
                time.sleep(0.002)  # let the server thread have the GIL (same process)
            try:
                idle.append(socket.create_connection(server.address, timeout=5))
            except OSError:
                break
        time.sleep(0.2)
        assert server.stats()["connections"] <= 3
        assert threading.active_count() == threads_before
        # Our own client sockets are ours; the server side holds at most its cap.
        assert len(os.listdir("/proc/self/fd")) - before <= len(idle) + 3 + 2
        time.sleep(0.6)  # past the deadline: the held ones are gone too
        assert server.stats()["connections"] == 0
    finally:
        for sock in idle:
            sock.close()
    assert _get(server.address).startswith(b"HTTP/1.1 200 ")


def test_accept_errors_pause_accepting_instead_of_spinning(server: Any) -> None:
    import errno

    real = server._listener
    calls = []

    class Failing:
        def accept(self) -> Any:
            calls.append(time.monotonic())
            raise OSError(errno.EMFILE, "Too many open files")

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    server._listener = Failing()
    try:
        with socket.create_connection(server.address, timeout=5):
            time.sleep(1.2)
    finally:
        server._listener = real
    assert 1 <= len(calls) <= 4, calls  # paused 0.5 s after each, not thousands a second
    assert server.stats()["accept_errors"] == len(calls)
    assert _get(server.address).startswith(b"HTTP/1.1 200 ")
