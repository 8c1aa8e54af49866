"""imdsguard suggest: audit events in, a pasteable allow block out."""

from __future__ import annotations

import grp
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from imdsguard import suggest as mod
from imdsguard.cli import main
from imdsguard.config import AllowConfig, Principal, parse_config


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
    assert "nothing new to allow" in text
    assert "no IMDSv1 use seen" in text


HOSTILE_EXE = "/tmp/a\n  - root"
HOSTILE_UNIT = "x.service\r\n  - root\x1b[2K\x1b]0;t\x07\x85\u2028\x7f\x9b"


def _raw_controls(text: str) -> set[str]:
    """Characters in ``text`` that a terminal or YAML would act on (newline aside)."""
    return {ch for ch in text if ch != "\n" and not ch.isprintable()}


def test_hostile_exe_and_unit_are_escaped() -> None:
    hostile = _event(65534, "nobody\n  - root", HOSTILE_EXE, "v1", "2026-11-21T11:00:00Z\n- root")
    hostile["unit"] = HOSTILE_UNIT
    text = mod.suggest([hostile], source="/tmp/ev\x1b[8m", allowed=AllowConfig())
    assert yaml.safe_load(text) == {"allow": {"users": ["nobody"]}}
    assert _raw_controls(text) == set()
    assert [p.id for p in parse_config(text, "suggested.yaml").allow.users] == [65534]
    assert "/tmp/a\\n  - root" in text  # still readable, made visible
    assert "\\x1b[2K" in text and "\\r\\n" in text
    v1 = text.split("still using IMDSv1", 1)[1]
    assert "user nobody\\n  - root, exe /tmp/a\\n  - root" in v1


def test_current_allowlist_is_kept_and_marked() -> None:
    group = grp.getgrgid(0)
    allowed = AllowConfig(
        users=(Principal("root", 0),), groups=(Principal(group.gr_name, group.gr_gid),)
    )
    text = mod.suggest(EVENTS, allowed=allowed, config_path="/etc/imdsguard/config.yaml")
    data = yaml.safe_load(text)
    # root was seen (events from before it was allowed) but is listed once, as already allowed.
    assert data == {"allow": {"users": ["root", "nobody"], "groups": [group.gr_name]}}
    assert "- root  # already allowed; 2 accesses, last 2026-11-21T10:00:00Z" in text
    assert f"- {group.gr_name}  # already allowed" in text
    assert "/etc/imdsguard/config.yaml already allows" in text
    assert "NOT included" not in text
    config = parse_config(text, "suggested.yaml")
    assert [p.id for p in config.allow.users] == [0, 65534]
    assert [p.id for p in config.allow.groups] == [0]


def test_allowed_but_unseen_users_are_kept() -> None:
    allowed = AllowConfig(users=(Principal("root", 0),))
    text = mod.suggest([], allowed=allowed)
    assert yaml.safe_load(text) == {"allow": {"users": ["root"]}}
    assert "- root  # already allowed\n" in text


def test_without_the_config_the_output_says_the_allowlist_is_left_out() -> None:
    text = mod.suggest(EVENTS)
    assert "the current allowlist is NOT included" in text
    assert "already allowed" not in text


def _write_events(tmp_path: Path) -> str:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    return str(path)


def test_cli_merges_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("mode: audit\nallow:\n  users: [root]\n")
    assert main(["suggest", "--events", _write_events(tmp_path), "-c", str(config)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert yaml.safe_load(out) == {"allow": {"users": ["root", "nobody"]}}
    assert "- root  # already allowed" in out


def test_cli_unreadable_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: sometimes\n")
    assert main(["suggest", "--events", _write_events(tmp_path), "-c", str(bad)]) == 0
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and str(bad) in err and "allowlist" in err
    assert "the current allowlist is NOT included" in out
    assert yaml.safe_load(out) == {"allow": {"users": ["root", "nobody"]}}


def _root_in(unit: str | None, ts: str) -> dict[str, Any]:
    return _event(0, "root", "/usr/bin/agent", "v2", ts) | {"unit": unit}


def test_a_root_service_is_proposed_as_its_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Root seen only from services: allow.units, not root (which would allow every root)."""
    monkeypatch.setattr("imdsguard.cgroups.unified_problem", lambda: None)
    events = [
        _root_in("amazon-ssm-agent.service", "2026-11-20T10:00:00Z"),
        _root_in("amazon-ssm-agent.service", "2026-11-20T11:00:00Z"),
        _root_in("amazon-cloudwatch-agent.service", "2026-11-20T12:00:00Z"),
        _event(65534, "nobody", "/usr/bin/python3.11", "v2", "2026-11-21T11:00:00Z"),
    ]
    text = mod.suggest(events, allowed=AllowConfig(), config_path="cfg.yaml")
    data = yaml.safe_load(text)
    assert data == {
        "allow": {
            "users": ["nobody"],
            "units": ["amazon-cloudwatch-agent.service", "amazon-ssm-agent.service"],
        }
    }
    assert "root service: 2 accesses" in text
    config = parse_config(text, "suggested.yaml")
    assert config.allow.units == ("amazon-cloudwatch-agent.service", "amazon-ssm-agent.service")
    assert [p.id for p in config.allow.users] == [65534]


def test_root_outside_a_service_is_still_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("imdsguard.cgroups.unified_problem", lambda: None)
    events = [
        _root_in("amazon-ssm-agent.service", "2026-11-20T10:00:00Z"),
        _root_in("session-3.scope", "2026-11-20T11:00:00Z"),  # a login shell
        _root_in("user@0.service", "2026-11-20T12:00:00Z"),  # root's own manager
    ]
    allowed = AllowConfig(units=("kept.service",))
    text = mod.suggest(events, allowed=allowed, config_path="cfg.yaml")
    data = yaml.safe_load(text)
    assert data["allow"]["users"] == ["root"]
    assert data["allow"]["units"] == ["kept.service", "amazon-ssm-agent.service"]
    assert "outside any service" in text
    assert "kept.service  # already allowed" in text
