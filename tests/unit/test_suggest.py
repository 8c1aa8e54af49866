"""imdsguard suggest: audit events in, a pasteable allow block out."""

from __future__ import annotations

import grp
from typing import Any

import pytest
import yaml

from imdsguard import suggest as mod
from imdsguard.config import parse_config


def _event(uid: int | None, user: str | None, exe: str, version: str, ts: str) -> dict[str, Any]:
    return {
        "event": "imds_access_audited",
        "timestamp": ts,
        "uid": uid,
        "user": user,
        "exe": exe,
        "unit": "app.service" if uid else None,
        "imds_version": version,
        "attempts": 1,
    }


EVENTS = [
    _event(0, "root", "/usr/bin/amazon-ssm-agent", "v2", "2026-11-20T10:00:00Z"),
    _event(0, "root", "/usr/bin/amazon-ssm-agent", "v2", "2026-11-21T10:00:00Z"),
    _event(65534, "nobody", "/usr/bin/python3.11", "v1", "2026-11-21T11:00:00Z"),
    _event(None, None, "", "v1", "2026-11-21T12:00:00Z") | {"src": "198.51.100.2"},
    {"event": "imds_access_blocked", "uid": 4242, "timestamp": "2026-11-21T13:00:00Z"},
]


def test_suggestion_parses_and_check_config_accepts_it() -> None:
    text = mod.suggest(EVENTS, source="events.jsonl")
    data = yaml.safe_load(text)
    assert data == {"allow": {"users": ["root", "nobody"]}}
    config = parse_config(text, "suggested.yaml")
    assert [p.id for p in config.allow.users] == [0, 65534]
    assert "2 accesses, last 2026-11-21T10:00:00Z: /usr/bin/amazon-ssm-agent" in text
    assert "3 audited accesses" not in text and "4 audited accesses" in text  # blocked ignored


def test_imdsv1_users_are_listed() -> None:
    text = mod.suggest(EVENTS)
    v1 = text.split("still using IMDSv1", 1)[1]
    assert "user nobody, exe /usr/bin/python3.11, unit app.service: 1" in v1
    assert "user 198.51.100.2" in v1  # forwarded container traffic is named by source
    assert "amazon-ssm-agent" not in v1


def test_group_proposed_only_when_all_members_were_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    team = grp.struct_group(("deployers", "x", 5000, ["a", "b"]))
    wider = grp.struct_group(("staff", "x", 5001, ["a", "b", "c"]))
    members = {5000: {1001, 1002}, 5001: {1001, 1002, 1003}}
    monkeypatch.setattr(mod.grp, "getgrall", lambda: [team, wider])
    monkeypatch.setattr(mod, "_members", lambda gid: members[gid])
    monkeypatch.setattr(mod, "_user_name", lambda uid: {0: "root"}.get(uid, f"u{uid}"))
    events = [
        _event(uid, f"u{uid}", "/usr/bin/aws", "v2", "2026-11-21T10:00:00Z")
        for uid in (0, 1001, 1002)
    ]
    data = yaml.safe_load(mod.suggest(events))
    assert data == {"allow": {"users": ["root"], "groups": ["deployers"]}}


def test_no_audit_events() -> None:
    text = mod.suggest([])
    assert yaml.safe_load(text) == {"allow": {"users": []}}
    assert "no local process used IMDS" in text
    assert "no IMDSv1 use seen" in text
