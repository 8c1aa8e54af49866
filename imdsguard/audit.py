"""``imdsguard audit``: this instance's IMDS exposure, seen from the instance.

Findings have stable ids (``imdsv1-enabled``, ``user-data-secrets``, ...), a
severity (high|medium|low|info), a title, a detail and a remediation. A
secret found in user-data is reported by kind and line, never echoed.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

from imdsguard.config import Config
from imdsguard.domain import Mode
from imdsguard.errors import ImdsGuardError
from imdsguard.identity import broker_account
from imdsguard.imds import ImdsClient, ImdsRequestError

SEVERITIES = ("high", "medium", "low", "info")
IPV6_URL = "http://[fd00:ec2::254]"


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    id: str
    severity: str
    title: str
    detail: str
    remediation: str = ""


# (kind, pattern): each pattern matches a secret *value*; only kind and line are reported.
_SECRET_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b")),
    (
        "AWS secret access key",
        re.compile(r"(?i)aws.{0,20}secret.{0,20}[=:]\s*['\"]?[A-Za-z0-9/+]{40}\b"),
    ),
    ("private key", re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")),
    ("GitHub token", re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b")),
    ("Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    (
        "password or token assignment",
        re.compile(
            # DB_PASSWORD=..., "api_key": "...", secret: ...; not ${VAR}, <placeholder>, ***
            r"(?i)(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)"
            r"['\"]?\s*[:=]\s*['\"]?(?!\$\{?|<|\*{3})[^\s'\"]{6,}"
        ),
    ),
)


#: Findings that mean "this could not be checked", and what was left unchecked.
UNCHECKED = {
    "imds-unreachable": "IMDSv1, user-data secrets, instance role (IMDS did not answer)",
    "imdsv1-unknown": "whether IMDSv1 is on",
    "user-data-unreadable": "user-data secrets",
    "guard-state": "imdsguard's own state",
}


def scan_secrets(data: bytes) -> list[tuple[str, int]]:
    """(kind, line) for each secret-looking value in user-data (gzip is opened)."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return []
    text = data.decode("utf-8", "replace")
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for kind, pattern in _SECRET_PATTERNS:
            if pattern.search(line):
                found.append((kind, number))
                break  # one finding per line: the most specific kind wins
    return found


def _client(config: Config, url: str, as_broker: bool) -> ImdsClient:
    """The audit's IMDS client; as root with the broker on, as the broker's user.

    The guard lets that uid through (root may well not be allowlisted).
    """
    owner = None
    if as_broker and os.geteuid() == 0:
        with contextlib.suppress(ImdsGuardError):  # no account: ask as root
            owner = broker_account().uid
    return ImdsClient(url, timeout=2.0, owner_uid=owner)


def guard_findings(doc: dict[str, Any]) -> tuple[list[Finding], dict[str, Any]]:
    """The guard-state finding for a ``status`` document, and the report's ``guard``."""
    guard = {k: doc[k] for k in ("state", "mode", "backend", "rules", "reasons")}
    guard["daemon_running"] = doc["daemon"]["running"]
    reasons = "; ".join(doc["reasons"]) or "rules in place, daemon running"
    if doc["state"] == "protected":
        return [Finding("guard-state", "info", "imdsguard protects IMDS", reasons)], guard
    if doc["state"] == "unknown":
        return [
            Finding(
                "guard-state",
                "medium",
                "imdsguard's state could not be checked",
                reasons,
                "run the audit as root (sudo imdsguard audit)",
            )
        ], guard
    if doc["state"] == "unprotected":
        return [
            Finding(
                "guard-state",
                "high",
                "IMDS is not guarded: any local process can fetch the role's credentials",
                reasons,
                "systemctl enable --now imdsguard; then imdsguard status",
            )
        ], guard
    if doc["mode"] == Mode.AUDIT:
        return [
            Finding(
                "guard-audit-mode",
                "medium",
                "imdsguard is in audit mode: access is logged, not blocked",
                reasons,
                "review 'imdsguard suggest', then set mode: enforce and reload",
            )
        ], guard
    severity = "low" if doc["state"] == "degraded" else "info"
    return [Finding("guard-state", severity, f"imdsguard is {doc['state']}", reasons,
                    "see 'imdsguard status'")], guard  # fmt: skip


def _gather_status(config_path: str | None) -> dict[str, Any]:
    from imdsguard import status  # noqa: PLC0415 - status pulls in the firewall

    return status.gather(config_path)


def run_audit(
    config: Config,
    config_path: str | None,
    *,
    ipv6_url: str = IPV6_URL,
    gather: Callable[[str | None], dict[str, Any]] = _gather_status,
) -> dict[str, Any]:
    """Run every check; the report as a JSON-able dict.

    ``ipv6_url`` (where the IPv6 endpoint is probed) and ``gather`` (the
    ``status`` document) are there for tests.
    """
    findings: list[Finding] = []
    report: dict[str, Any] = {"imds_url": config.imds_url}
    # As root with the broker enabled, ask as its user: the guard lets it through.
    client = _client(config, config.imds_url, as_broker=config.broker.enabled)
    try:
        client.token()
    except ImdsRequestError as exc:
        # No token is not "no IMDS": one that answers only token-less GETs
        # (IMDSv1 on, the PUT refused or its answer lost) is the worst case.
        findings += _tokenless_findings(client, report, exc)
    else:
        findings += _imds_findings(client, report, token=True)
    findings += _ipv6_findings(config, report, ipv6_url)
    try:
        guard, report["guard"] = guard_findings(gather(config_path))
        findings += guard
    except ImdsGuardError as exc:
        findings.append(Finding("guard-state", "medium", "guard state unknown", str(exc)))
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), f.id))
    report["findings"] = [asdict(f) for f in findings]
    report["unchecked"] = [
        f"{UNCHECKED[f.id]}: {f.detail}"
        for f in findings
        if f.id in UNCHECKED and (f.id != "guard-state" or f.severity == "medium")
    ]
    return report


def _tokenless_findings(
    client: ImdsClient, report: dict[str, Any], token_error: ImdsRequestError
) -> list[Finding]:
    """Findings when the token PUT failed: what a token-less GET still reads."""
    try:
        v1: bool | None = client.imdsv1_enabled()
    except ImdsRequestError:
        v1 = None
    if not v1:
        refused = "; a token-less GET was refused with 401" if v1 is False else ""
        return [
            Finding(
                "imds-unreachable",
                "info",
                "IMDS did not answer this audit",
                f"{token_error}{refused} (if imdsguard blocks this user, that is the guard "
                "working; run the audit as an allowlisted user, or enable the broker)",
            )
        ]
    return [
        Finding(
            "imdsv2-token-failed",
            "low",
            "IMDS answers token-less GETs but gave this audit no session token",
            str(token_error),
            "make sure IMDSv2 works here before requiring tokens (the PUT's hop limit, "
            "--http-put-response-hop-limit, and any proxy in between)",
        ),
        *_imds_findings(client, report, token=False),
    ]


def _imds_findings(client: ImdsClient, report: dict[str, Any], *, token: bool) -> list[Finding]:
    """The IMDS checks, over IMDSv2 (``token``) or, when no token came, IMDSv1 (known on)."""
    findings = []
    try:
        instance_id = client.get_text("/latest/meta-data/instance-id", token=token).strip()
    except ImdsRequestError:
        instance_id = "<instance-id>"
    report["instance_id"] = instance_id
    v1: bool | None = True
    if token:
        try:
            v1 = client.imdsv1_enabled()
        except ImdsRequestError as exc:
            v1 = None
            findings.append(Finding("imdsv1-unknown", "low", "could not tell whether IMDSv1 is on",
                                    str(exc)))  # fmt: skip
    if v1:
        findings.append(
            Finding(
                "imdsv1-enabled",
                "high",
                "IMDSv1 is enabled: a token-less GET returns metadata (SSRF can read credentials)",
                "IMDS answered GET /latest/meta-data/ without a session token",
                "aws ec2 modify-instance-metadata-options --instance-id "
                f"{instance_id} --http-tokens required --http-endpoint enabled",
            )
        )
    elif v1 is False:
        findings.append(Finding("imdsv1-disabled", "info", "IMDSv2 is required (tokens)",
                                "a token-less GET was refused with 401"))  # fmt: skip
    if token:
        findings.append(_role_finding(client, report))
    else:
        report["role"] = None
        findings.append(
            Finding(
                "instance-role",
                "info",
                "could not tell whether an instance role is attached",
                "the role is read over IMDSv2, and IMDS gave no session token",
            )
        )
    try:
        resp = client.get("/latest/user-data", token=token)
    except ImdsRequestError as exc:
        findings.append(Finding("user-data-unreadable", "low", "user-data could not be read",
                                str(exc)))  # fmt: skip
        return findings
    if resp.status not in (200, 404):  # 404: no user-data; anything else: not read
        detail = f"IMDS GET /latest/user-data answered HTTP {resp.status}"
        findings.append(Finding("user-data-unreadable", "low", "user-data could not be read",
                                detail))  # fmt: skip
    if resp.status == 200:
        secrets = scan_secrets(resp.body)
        if secrets:
            where = ", ".join(f"{kind} (line {line})" for kind, line in secrets)
            findings.append(
                Finding(
                    "user-data-secrets",
                    "high",
                    "user-data holds secrets: anything that can read IMDS can read them",
                    f"{len(secrets)} found: {where}",
                    "move them to Secrets Manager or SSM Parameter Store, fetch them at boot "
                    "with the instance role, and replace the user-data (rotate what leaked)",
                )
            )
        else:
            findings.append(Finding("user-data-secrets", "info", "no secrets found in user-data",
                                    f"{len(resp.body)} bytes scanned"))  # fmt: skip
    return findings


def _role_finding(client: ImdsClient, report: dict[str, Any]) -> Finding:
    try:
        role = client.role_name()
    except ImdsRequestError as exc:
        report["role"] = None
        # Only IMDS saying so means "no role"; a failed request (5xx, timeout) tells nothing.
        title = (
            "no instance role attached"
            if exc.kind == "no-role"
            else "could not tell whether an instance role is attached"
        )
        return Finding("instance-role", "info", title, str(exc))
    report["role"] = role
    return Finding("instance-role", "info", f"instance role attached: {role}",
                   "its credentials are what the guard protects")  # fmt: skip


def _answers(client: ImdsClient) -> bool:
    """Whether IMDS at ``client`` answers: a token, or else a token-less GET (200 or 401)."""
    try:
        client.token()
        return True
    except ImdsRequestError:
        pass
    try:
        client.imdsv1_enabled()
        return True
    except ImdsRequestError:
        return False


def _ipv6_findings(config: Config, report: dict[str, Any], url: str) -> list[Finding]:
    client = _client(config, url, as_broker=config.broker.enabled)
    if not _answers(client):
        report["ipv6"] = False
        why = "fd00:ec2::254 did not answer (disabled, or blocked for this user)"
        return [Finding("imds-ipv6", "info", "IMDS IPv6 endpoint not reachable from here", why)]
    report["ipv6"] = True
    guarded = any(str(e) == "fd00:ec2::254" for e in config.endpoints)
    if not guarded:
        return [
            Finding(
                "imds-ipv6-unguarded",
                "high",
                "IMDS answers on IPv6 but the guard does not cover fd00:ec2::254",
                "endpoints in the config leave out the IPv6 address",
                "add 'fd00:ec2::254' to endpoints (the default) and reload",
            )
        ]
    return [Finding("imds-ipv6", "info", "IMDS IPv6 endpoint enabled and guarded",
                    "fd00:ec2::254 answered")]  # fmt: skip


def render_text(report: dict[str, Any]) -> str:
    """The report for people: one line per finding, details indented."""
    lines = [
        f"imdsguard audit: instance {report.get('instance_id', '?')}, "
        f"role {report.get('role') or '-'}, IMDS {report['imds_url']}"
    ]
    for f in report["findings"]:
        lines.append(f"{f['severity'].upper():<6} {f['id']:<22} {f['title']}")
        if f["detail"]:
            lines.append(f"       {f['detail']}")
        if f["remediation"]:
            lines.append(f"       fix: {f['remediation']}")
    for what in report.get("unchecked", []):
        lines.append(f"NOT CHECKED  {what}")
    if report.get("unchecked"):
        lines.append("result: unknown (exit 3): the checks above did not all run")
    return "\n".join(lines)


def exit_code(report: dict[str, Any]) -> int:
    """1 when any finding is high; else 3 (unknown) when a check could not run; else 0."""
    if any(f["severity"] == "high" for f in report["findings"]):
        return 1
    return 3 if report.get("unchecked") else 0
