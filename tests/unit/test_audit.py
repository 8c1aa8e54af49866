"""imdsguard audit without root: the secret scanner, and run_audit against the
simulated IMDS on loopback with a given status document (never the real IMDS)."""

from __future__ import annotations

import ast
import gzip
import ipaddress
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from imdsguard import audit
from imdsguard.audit import exit_code, guard_findings, render_text, run_audit, scan_secrets
from imdsguard.config import Config
from imdsguard.imds import TOKEN_PATH
from imdsguard_testing.imds_sim import ImdsSimulator, SimConfig

KEY_ID = "AKIA" + "ABCDEFGHIJKLMNOP"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (f"export AWS_ACCESS_KEY_ID={KEY_ID}", "AWS access key id"),
        (f"aws_secret_access_key = {SECRET}", "AWS secret access key"),
        ("-----BEGIN RSA PRIVATE KEY-----", "private key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
        ("GH=ghp_" + "a" * 36, "GitHub token"),
        ("SLACK=xoxb-1234567890-abcdefghij", "Slack token"),
        ("DB_PASSWORD=hunter2hunter2", "password or token assignment"),
        ('  "api_key": "0123456789abcdef"', "password or token assignment"),
    ],
)
def test_each_kind_is_found_with_its_line(line: str, kind: str) -> None:
    data = f"#!/bin/bash\necho hello\n{line}\n".encode()
    assert scan_secrets(data) == [(kind, 3)]


@pytest.mark.parametrize(
    "line",
    [
        "password=${DB_PASSWORD}",  # a reference, not a value
        "token=<set me>",
        "echo 'no secrets here'",
        "PASSWORD_FILE=/run/secrets/x",
    ],
)
def test_references_and_plain_text_are_not_secrets(line: str) -> None:
    assert scan_secrets(line.encode()) == []


def test_gzipped_user_data_is_opened() -> None:
    assert scan_secrets(gzip.compress(f"x\n{KEY_ID}\n".encode())) == [("AWS access key id", 2)]


def test_clean_user_data() -> None:
    assert scan_secrets(b"#cloud-config\npackages: [nginx]\n") == []


# --- run_audit against the simulator on loopback ---------------------------------

INSTANCE_ID = "i-0fedcba9876543210"


def _status(state: str = "protected", mode: str = "enforce", **extra: Any) -> dict[str, Any]:
    """A ``status --json`` document as status.gather builds it."""
    return {
        "protected": state == "protected",
        "state": state,
        "reasons": [],
        "mode": mode,
        "backend": "nftables",
        "daemon": {"running": True, "pid": 4242},
        "rules": {"ipv4": "ok", "ipv6": "ok"},
        **extra,
    }


Factory = Callable[..., tuple[ImdsSimulator, str]]


@pytest.fixture
def closed_url() -> Iterator[str]:
    """A loopback port that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def make_sim(start_sim: Factory) -> Factory:
    """Simulators on ``host`` (default 127.0.0.1) for INSTANCE_ID with these SimConfig fields."""

    def make(host: str = "127.0.0.1", **kwargs: Any) -> tuple[ImdsSimulator, str]:
        return start_sim(SimConfig(instance_id=INSTANCE_ID, **kwargs), host)

    return make


def _audit(url: str, ipv6_url: str, doc: dict[str, Any] | None = None, **config: Any) -> Any:
    return run_audit(
        Config(imds_url=url, **config),
        None,
        ipv6_url=ipv6_url,
        gather=lambda _path: doc or _status(),
    )


def _ids(report: dict[str, Any]) -> dict[str, str]:
    return {f["id"]: f["severity"] for f in report["findings"]}


def test_imdsv1_only_endpoint_is_imdsv1_enabled(make_sim: Any, closed_url: str) -> None:
    # The token PUT fails, token-less GETs work: the worst case, not "unreachable".
    data = f"#!/bin/sh\nexport AWS_ACCESS_KEY_ID={KEY_ID}\n".encode()
    sim, url = make_sim(http_tokens="optional", user_data=data)
    sim.set_fault("500", paths=[TOKEN_PATH])
    report = _audit(url, closed_url)
    ids = _ids(report)
    assert ids["imdsv1-enabled"] == "high" and "imds-unreachable" not in ids
    assert ids["imdsv2-token-failed"] == "low"
    (v1,) = [f for f in report["findings"] if f["id"] == "imdsv1-enabled"]
    assert f"--instance-id {INSTANCE_ID} --http-tokens required" in v1["remediation"]
    assert ids["user-data-secrets"] == "high"  # read and scanned over IMDSv1
    assert KEY_ID not in repr(report)
    assert report["role"] is None
    assert exit_code(report) == 1


def test_token_refused_and_tokens_required_is_unreachable(make_sim: Any, closed_url: str) -> None:
    sim, url = make_sim(http_tokens="required")
    sim.set_fault("500", paths=[TOKEN_PATH])
    report = _audit(url, closed_url)
    ids = _ids(report)
    assert ids["imds-unreachable"] == "info" and "imdsv1-enabled" not in ids
    (found,) = [f for f in report["findings"] if f["id"] == "imds-unreachable"]
    assert "HTTP 500" in found["detail"] and "refused with 401" in found["detail"]
    # Nothing about IMDS itself was checked: unknown, not a clean bill of health.
    assert report["unchecked"] and report["unchecked"][0].startswith("IMDSv1, user-data")
    assert exit_code(report) == 3


def test_no_imds_at_all_is_unreachable(closed_url: str) -> None:
    report = _audit(closed_url, closed_url)
    ids = _ids(report)
    assert ids["imds-unreachable"] == "info"
    assert not {"imdsv1-enabled", "imdsv1-disabled", "imdsv2-token-failed"} & set(ids)
    assert exit_code(report) == 3


def test_ipv6_not_reachable(make_sim: Any, closed_url: str) -> None:
    _, url = make_sim(http_tokens="required")
    report = _audit(url, closed_url)
    assert report["ipv6"] is False
    (found,) = [f for f in report["findings"] if f["id"].startswith("imds-ipv6")]
    assert found["id"] == "imds-ipv6" and found["severity"] == "info"
    assert found["title"] == "IMDS IPv6 endpoint not reachable from here"


@pytest.mark.parametrize("v1_only", [False, True])
def test_ipv6_reachable(make_sim: Any, v1_only: bool) -> None:
    _, url = make_sim(http_tokens="required")
    v6, v6_url = make_sim("127.0.0.2", http_tokens="optional")  # stands in for fd00:ec2::254
    if v1_only:
        v6.set_fault("500", paths=[TOKEN_PATH])  # answers all the same
    report = _audit(url, v6_url)
    assert report["ipv6"] is True
    assert _ids(report)["imds-ipv6"] == "info" and "imds-ipv6-unguarded" not in _ids(report)
    report = _audit(url, v6_url, endpoints=(ipaddress.ip_address("169.254.169.254"),))
    assert _ids(report)["imds-ipv6-unguarded"] == "high" and "imds-ipv6" not in _ids(report)


# --- guard state, from the status document --------------------------------------


def test_guard_protected_is_info() -> None:
    (finding,), guard = guard_findings(_status("protected"))
    assert (finding.id, finding.severity) == ("guard-state", "info")
    assert finding.title == "imdsguard protects IMDS"
    assert finding.detail == "rules in place, daemon running"
    assert guard["daemon_running"] is True and guard["state"] == "protected"


def test_guard_audit_mode_is_medium() -> None:
    doc = _status("degraded", "audit", reasons=["audit mode: access is logged, not blocked"])
    (finding,), guard = guard_findings(doc)
    assert (finding.id, finding.severity) == ("guard-audit-mode", "medium")
    assert "set mode: enforce" in finding.remediation
    assert finding.detail == "audit mode: access is logged, not blocked"
    assert guard["mode"] == "audit"


def test_guard_degraded_enforcing_is_low_not_audit_mode() -> None:
    (finding,), _ = guard_findings(_status("degraded", reasons=["daemon not running"]))
    assert (finding.id, finding.severity) == ("guard-state", "low")


def test_guard_unknown_says_so_and_the_audit_exits_3(make_sim: Any, closed_url: str) -> None:
    """As a non-root user: the firewall and the event log cannot be read."""
    doc = _status("unknown", reasons=["cannot read the firewall: needs root (run as root)"])
    (finding,), _ = guard_findings(doc)
    assert (finding.id, finding.severity) == ("guard-state", "medium")
    assert "could not be checked" in finding.title and "sudo" in finding.remediation
    _, url = make_sim(http_tokens="required")
    report = _audit(url, closed_url, doc)
    assert not [f for f in report["findings"] if f["severity"] == "high"]
    assert report["unchecked"] == [
        "imdsguard's own state: cannot read the firewall: needs root (run as root)"
    ]
    assert exit_code(report) == 3  # before: 0, as if all was well
    assert "NOT CHECKED  imdsguard's own state" in render_text(report)
    assert "result: unknown (exit 3)" in render_text(report)


def test_a_clean_audit_checked_everything(make_sim: Any, closed_url: str) -> None:
    _, url = make_sim(http_tokens="required")
    report = _audit(url, closed_url)
    assert report["unchecked"] == [] and exit_code(report) == 0


def test_guard_unprotected_is_high() -> None:
    (finding,), _ = guard_findings(_status("unprotected", reasons=["rules missing"]))
    assert (finding.id, finding.severity) == ("guard-state", "high")


@pytest.mark.parametrize(
    ("doc", "present", "absent"),
    [
        (_status("protected"), "guard-state", "guard-audit-mode"),
        (_status("degraded", "audit"), "guard-audit-mode", "guard-state"),
    ],
)
def test_guard_finding_reaches_the_report(
    make_sim: Any, closed_url: str, doc: dict[str, Any], present: str, absent: str
) -> None:
    _, url = make_sim(http_tokens="required")
    report = _audit(url, closed_url, doc)
    ids = _ids(report)
    assert present in ids and absent not in ids
    assert report["guard"]["daemon_running"] is True


def _findings_in_code() -> dict[str, set[str]]:
    """Finding id -> the severities audit.py gives it literally (``Finding("id", "sev", ...)``)."""
    tree = ast.parse(Path(audit.__file__).read_text())
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Finding":
            ident, severity = node.args[0], node.args[1]
            assert isinstance(ident, ast.Constant), ast.dump(node)
            severities = found.setdefault(ident.value, set())
            if isinstance(severity, ast.Constant):
                severities.add(severity.value)
            elif isinstance(severity, ast.IfExp):  # "low" if degraded else "info"
                severities |= {severity.body.value, severity.orelse.value}  # type: ignore[attr-defined]
    return found


def test_every_finding_is_in_the_readme_table_with_its_severities() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Posture: `imdsguard audit`", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:4] for line in section.splitlines() if line.startswith("| `")]
    documented: dict[str, set[str]] = {}
    for ids, severity, _ in rows:
        for ident in re.findall(r"`([a-z0-9-]+)`", ids):
            documented[ident] = {s.strip() for s in severity.split("/")}
    for ident, severities in _findings_in_code().items():
        assert ident in documented, f"README's audit table lacks {ident}"
        assert severities <= documented[ident], (ident, severities, documented[ident])
    assert set(documented) == set(_findings_in_code())


def test_every_finding_is_in_the_contract() -> None:
    contract = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()
    section = contract.split("## `imdsguard audit`", 1)[1].split("\n## ", 1)[0]
    for ident in _findings_in_code():
        assert f"`{ident}`" in section, ident
