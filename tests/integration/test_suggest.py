"""Audit mode end to end: observe, then `imdsguard suggest` an allowlist that check-config takes."""

from __future__ import annotations

import os

import pytest
import yaml

from imdsguard_testing.netns import User
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
    # root is allowed already (so never audited): pasting the proposal must keep it.
    users = proposal["allow"]["users"]
    assert users[0] == "root" and sorted(users[1:]) == ["imdsg-app", "imdsg-member"]
    assert "  - root  # already allowed" in result.stdout.splitlines()
    assert result.stderr == ""
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
    assert "- root" in check.stdout  # the effective policy still allows root


@pytest.mark.parametrize("backend", ["iptables"])
def test_suggest_with_an_unreadable_config(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    daemon.write_config("mode: audit\nallow:\n  users: [root]\n")
    daemon.start()
    assert daemon.topo.imds_get(test_users["imdsg-app"], "/latest/meta-data/", v2=True).ok
    daemon.wait_log("imds_access_audited", count=1, timeout=5)
    missing = os.path.join(daemon.workdir, "missing.yaml")
    result = daemon.topo.run(
        daemon.topo.host, [*daemon.cli_argv("suggest"), "-c", missing], env=daemon.env
    )
    assert result.returncode == 0
    assert len(result.stderr.splitlines()) == 1 and missing in result.stderr, result.stderr
    assert "the current allowlist is NOT included" in result.stdout
    assert yaml.safe_load(result.stdout)["allow"]["users"] == ["imdsg-app"]
