"""Audit mode end to end: observe, then `imdsguard suggest` an allowlist that check-config takes."""

from __future__ import annotations

import os

import pytest
import yaml

from imdsguard.netns import User
from tests.integration.conftest import DaemonHandle


@pytest.mark.parametrize("backend", ["iptables"])  # audit capture needs a queue
def test_audit_then_suggest(daemon: DaemonHandle, test_users: dict[str, User]) -> None:
    daemon.write_config("mode: audit\nallow:\n  users: [root]\n")
    daemon.start()
    app, member = test_users["imdsg-app"], test_users["imdsg-member"]
    assert daemon.topo.imds_get(app, "/latest/meta-data/instance-id", v2=False).ok
    assert daemon.topo.imds_get(member, "/latest/meta-data/instance-id", v2=True).ok
    daemon.wait_log("imds_access_audited", count=2, timeout=5)
    result = daemon.cli("suggest")
    assert result.returncode == 0, result.stderr
    proposal = yaml.safe_load(result.stdout)
    assert set(proposal["allow"]["users"]) == {"imdsg-app", "imdsg-member"}
    assert "user imdsg-app, exe" in result.stdout.split("still using IMDSv1")[1]
    suggested = os.path.join(daemon.workdir, "suggested.yaml")
    with open(suggested, "w") as fh:
        fh.write(result.stdout)
    os.chmod(suggested, 0o644)
    check = daemon.topo.run(
        daemon.topo.host,
        [*daemon.cli_argv("check-config"), "-c", suggested],
        env=daemon.env,
    )
    assert check.returncode == 0, check.stderr
