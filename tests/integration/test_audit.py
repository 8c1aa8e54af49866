"""imdsguard audit against the simulated IMDS, each finding present and absent."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

from imdsguard_testing.netns import Topology

KEY_ID = "AKIA" + "QWERTYUIOPASDFGH"
PASSWORD = "s3cr3t-Passw0rd"  # noqa: S105 - test data


def _audit(topo: Topology, workdir: str, config: str = "") -> tuple[int, dict[str, Any], str]:
    path = os.path.join(workdir, "config.yaml")
    with open(path, "w") as fh:
        fh.write(config)
    os.chmod(path, 0o644)
    env = dict(os.environ)
    for key in ("run", "state", "log"):
        env[f"IMDSGUARD_{key.upper()}_DIR"] = os.path.join(workdir, key)
    proc = topo.run(topo.host, [sys.executable, "-m", "imdsguard", "audit", "--json", "-c", path],
                    env=env)  # fmt: skip
    text = topo.run(topo.host, [sys.executable, "-m", "imdsguard", "audit", "-c", path], env=env)
    return proc.returncode, json.loads(proc.stdout), proc.stdout + proc.stderr + text.stdout


def _ids(report: dict[str, Any]) -> dict[str, str]:
    return {f["id"]: f["severity"] for f in report["findings"]}


@pytest.fixture
def sim(workdir: str) -> Any:
    def start(*flags: str, user_data: str | None = None) -> Topology:
        topo = Topology().create()
        extra = list(flags)
        if user_data is not None:
            path = os.path.join(workdir, "user-data")
            with open(path, "w") as fh:
                fh.write(user_data)
            extra += ["--user-data-file", path]
        topo.start_imds(workdir, *extra)
        started.append(topo)
        return topo

    started: list[Topology] = []
    yield start
    for topo in started:
        topo.destroy()


def test_imdsv1_enabled_is_high_with_the_instance_id(sim: Any, workdir: str) -> None:
    topo = sim("--http-tokens", "optional", "--instance-id", "i-0abc1234def567890")
    rc, report, _ = _audit(topo, workdir)
    assert rc == 1
    (finding,) = [f for f in report["findings"] if f["id"] == "imdsv1-enabled"]
    assert finding["severity"] == "high"
    assert "--instance-id i-0abc1234def567890 --http-tokens required" in finding["remediation"]


def test_imdsv1_only_is_high_not_unreachable(sim: Any, workdir: str) -> None:
    # IMDS that refuses the token PUT but answers token-less GETs (on both addresses).
    control = os.path.join(workdir, "imds-control.json")
    with open(control, "w") as fh:
        json.dump({"fault": "500", "paths": ["/latest/api/token"]}, fh)
    topo = sim("--http-tokens", "optional", "--instance-id", "i-0abc1234def567890",
               "--control-file", control)  # fmt: skip
    rc, report, text = _audit(topo, workdir)
    ids = _ids(report)
    assert rc == 1 and ids["imdsv1-enabled"] == "high", report
    assert "imds-unreachable" not in ids and ids["imdsv2-token-failed"] == "low"
    assert report["instance_id"] == "i-0abc1234def567890"
    assert report["ipv6"] is True  # fd00:ec2::254 answers the same way: reachable
    assert "HIGH   imdsv1-enabled" in text


def test_tokens_required_is_not_a_finding(sim: Any, workdir: str) -> None:
    topo = sim("--http-tokens", "required")
    _, report, _ = _audit(topo, workdir)
    ids = _ids(report)
    assert "imdsv1-enabled" not in ids and ids["imdsv1-disabled"] == "info"


def test_user_data_secrets_reported_by_kind_and_line_never_echoed(sim: Any, workdir: str) -> None:
    data = f"#!/bin/bash\nexport AWS_ACCESS_KEY_ID={KEY_ID}\necho ok\nDB_PASSWORD={PASSWORD}\n"
    topo = sim("--http-tokens", "required", user_data=data)
    rc, report, everything = _audit(topo, workdir)
    assert rc == 1
    (finding,) = [f for f in report["findings"] if f["id"] == "user-data-secrets"]
    assert finding["severity"] == "high"
    assert "AWS access key id (line 2)" in finding["detail"]
    assert "password or token assignment (line 4)" in finding["detail"]
    assert KEY_ID not in everything and PASSWORD not in everything


def test_clean_user_data_and_role(sim: Any, workdir: str) -> None:
    topo = sim("--http-tokens", "required", "--role", "web-role", user_data="#cloud-config\n")
    _, report, _ = _audit(topo, workdir)
    assert _ids(report)["user-data-secrets"] == "info"
    assert report["role"] == "web-role"


def test_no_role(sim: Any, workdir: str) -> None:
    topo = sim("--http-tokens", "required", "--no-role")
    _, report, _ = _audit(topo, workdir)
    assert report["role"] is None
    assert any(f["title"] == "no instance role attached" for f in report["findings"])


def test_ipv6_guarded_or_not(sim: Any, workdir: str) -> None:
    topo = sim("--http-tokens", "required")
    _, report, _ = _audit(topo, workdir)
    assert report["ipv6"] is True and _ids(report)["imds-ipv6"] == "info"
    ipv4_only = "endpoints: [169.254.169.254]\nendpoints_acknowledged: true\n"
    rc, report, _ = _audit(topo, workdir, ipv4_only)
    assert rc == 1 and _ids(report)["imds-ipv6-unguarded"] == "high"


def test_guard_state_findings(sim: Any, workdir: str) -> None:
    topo = sim("--http-tokens", "required")
    _, report, _ = _audit(topo, workdir)
    assert _ids(report)["guard-state"] == "high"  # no rules in this namespace yet
    assert report["guard"]["state"] == "unprotected"
    env = dict(os.environ, IMDSGUARD_RUN_DIR=os.path.join(workdir, "run"))
    path = os.path.join(workdir, "config.yaml")
    applied = topo.run(topo.host, [sys.executable, "-m", "imdsguard", "apply", "-c", path], env=env)
    assert applied.returncode == 0, applied.stderr
    _, report, _ = _audit(topo, workdir)
    # Root is allowlisted (default), rules in place, no daemon: degraded, IMDS still reachable.
    assert report["guard"]["state"] == "degraded" and _ids(report)["guard-state"] == "low"
    assert "instance_id" in report
