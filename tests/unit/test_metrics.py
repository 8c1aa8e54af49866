"""Prometheus output, checked with prometheus-client's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from imdsguard import metrics

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


def test_per_process_labels_are_bounded() -> None:
    snap = dict(SNAP, blocked_by={(f"u{i}", f"/bin/e{i}"): i + 1 for i in range(500)})
    samples = _parse(metrics.render(snap))["imdsguard_blocked_by_process"].samples
    assert len(samples) == metrics.TOP + 1
    other = next(s for s in samples if s.labels["user"] == "other")
    assert other.value == sum(range(1, 501 - metrics.TOP))


def test_textfile_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "imdsguard.prom"
    metrics.write_textfile(str(path), metrics.render(SNAP))
    metrics.write_textfile(str(path), metrics.render(dict(SNAP, protected=False)))
    assert _parse(path.read_text())["imdsguard_protected"].samples[0].value == 0
    assert [p.name for p in tmp_path.iterdir()] == ["imdsguard.prom"]  # no temp files left
    assert oct(path.stat().st_mode & 0o777) == "0o644"
