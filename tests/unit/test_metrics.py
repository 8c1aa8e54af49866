"""Prometheus output, checked with prometheus-client's own parser."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imdsguard import metrics
from imdsguard.config import Config, MetricsConfig
from imdsguard.daemon import Daemon
from imdsguard.errors import ImdsGuardError

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

    daemon = Daemon(None, logger=None)
    daemon.config = Config()
    daemon.backend = SimpleNamespace(name="nftables")  # type: ignore[assignment]
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
