"""Metrics from the running daemon: loopback endpoint and node_exporter textfile."""

from __future__ import annotations

import os
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imdsguard_testing.netns import User, scaled, wait_for
from tests.integration.conftest import DaemonHandle


def _values(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


@pytest.mark.parametrize("backend", ["iptables"])  # capture (blocked counts) needs a queue
def test_metrics_endpoint_and_textfile(daemon: DaemonHandle, test_users: dict[str, User]) -> None:
    textfile = os.path.join(daemon.workdir, "imdsguard.prom")
    daemon.write_config(
        f"metrics:\n  listen: 127.0.0.1:9721\n  textfile: {textfile}\nallow:\n  users: [root]\n"
    )
    daemon.start()
    wait_for(lambda: os.path.exists(textfile), 5, "the metrics textfile", daemon.proc)
    with open(textfile) as fh:
        assert _values(fh.read())["imdsguard_protected"] == 1
    daemon.topo.imds_get(test_users["imdsg-denied"], "/latest/meta-data/", v2=False)
    daemon.topo.run(daemon.topo.host, ["iptables-legacy", "-F", "OUTPUT"], check=True)
    daemon.wait_log("rules_restored")
    deadline = time.monotonic() + scaled(5)
    while True:
        scraped = daemon.topo.http(None, "http://127.0.0.1:9721/metrics")
        assert scraped.ok, scraped
        values = _values(scraped.body)
        if values.get("imdsguard_blocked_total", 0) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert values["imdsguard_blocked_total"] >= 1
    assert values["imdsguard_rules_restored_total"] == 1
    assert values["imdsguard_protected"] == 1
    assert daemon.topo.http(None, "http://127.0.0.1:9721/other").status == 404
