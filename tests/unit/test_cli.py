"""The command line: one-line errors, exit codes, check-config and status output, sd_notify."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from imdsguard import cli, notify, status
from imdsguard.events.log import format_console
from imdsguard_testing.fakes import fake_daemon


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


def test_check_config_prints_effective_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(
        tmp_path, "firewall: {backend: iptables}\nallow:\n  users: [root, 4242]\naction: drop\n"
    )
    assert cli.main(["check-config", "-c", path, "--rules"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {path}: OK\n")
    body = yaml.safe_load(out.split("# ipv4 rules")[0])
    assert body["allow"]["users"] == ["root (0)", "4242"]
    assert body["action"] == "drop"
    assert "-A IMDSGUARD -j DROP" in out
    assert "-A OUTPUT -d fd00:ec2::254/128 -j IMDSGUARD" in out


def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, "mode: enforce\nendpoints: [169.254.169.254, not-an-ip]\n")
    assert cli.main(["check-config", "-c", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"imdsguard: error: {path}:2: endpoints[1]: 'not-an-ip'")


def test_config_option_works_before_and_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, "mode: audit\n")
    assert cli.main(["-c", path, "check-config"]) == 0
    assert "mode: audit" in capsys.readouterr().out
    assert cli.main(["check-config", "--config", path]) == 0


@pytest.mark.parametrize("command", ["run", "apply", "remove", "demo"])
def test_commands_that_change_the_firewall_explain_root(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    path = _config(tmp_path, "")
    argv = [command] if command == "demo" else [command, "-c", path]  # the demo reads no config
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs root" in err and "Traceback" not in err


def test_demo_takes_no_config_and_is_absent_without_the_tooling(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["demo", "-c", "/etc/imdsguard/config.yaml"])
    assert "unrecognized arguments: -c" in capsys.readouterr().err
    # An installed host has imdsguard without imdsguard_testing: no demo command at all.
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "imdsguard_testing" else real(name, *a),
    )
    with pytest.raises(SystemExit):
        cli.main(["demo"])
    assert "invalid choice: 'demo'" in capsys.readouterr().err


def test_missing_explicit_config_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "-c", "/nonexistent/imdsguard.yaml"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_sd_notify_speaks_the_datagram_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False  # not under systemd: silently skipped
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify.notify("READY=1", "STATUS=ok") is True
        assert sock.recv(100) == b"READY=1\nSTATUS=ok"


def test_check_config_rules_for_nftables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, "firewall: {backend: nftables}\n")
    assert cli.main(["check-config", "-c", path, "--rules"]) == 0
    out = capsys.readouterr().out
    assert '"hook": "output"' in out and '"name": "allow_uids"' in out


@pytest.mark.parametrize("address", ["stale.sock", "@imdsguard-test-no-such-socket", "file"])
def test_unreachable_notify_socket_warns_once_and_never_raises(
    address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if address == "file":
        (tmp_path / "file").write_text("not a socket")
    if not address.startswith("@"):
        address = str(tmp_path / address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert notify.notify("READY=1") is False  # the plain function does not raise either
    daemon = fake_daemon()
    with capture_logs() as logs:
        assert daemon._notify("READY=1", "STATUS=protecting IMDS") is False
        assert daemon._notify("STOPPING=1") is False
    assert [(e["log_level"], e["event"]) for e in logs] == [("warning", "sd_notify_failed")]
    assert logs[0]["socket"] == address and logs[0]["error"]


HOSTILE_EXE = "/tmp/\x1b[2J\x1b[31mfake\nimdsguard: PROTECTED"


def _event(pid: int, exe: str = "/usr/bin/curl") -> dict[str, Any]:
    return {
        "event": "imds_access_blocked",
        "timestamp": f"2024-05-01T12:00:0{pid % 10}Z",
        "mode": "enforce",
        "family": "ipv4",
        "dst": "169.254.169.254",
        "dport": 80,
        "uid": 1000,
        "user": "app",
        "pid": pid,
        "exe": exe,
        "cmdline": [exe, "--evil\x07"],
        "attributed": True,
    }


def _status_doc(recent: list[dict[str, Any]], total: int) -> dict[str, Any]:
    return {
        "state": "protected",
        "mode": "enforce",
        "backend": "nftables",
        "daemon": {"running": True, "pid": 42, "rules_restored_total": 0},
        "rules": {"ipv4": "ok", "ipv6": "ok"},
        "broker": {"enabled": False, "healthy": None},
        "attribution": {"available": True, "reason": None},
        "blocked": {"total": total, "recent": recent},
        "reasons": [],
        "problems": [],
    }


def test_status_text_shows_recent_events_escaped() -> None:
    recent = [_event(pid) for pid in range(1, 7)] + [_event(99, HOSTILE_EXE)]
    text = status.render_text(_status_doc(recent, total=1234))
    assert "1234 attempts logged" in text
    assert "\x1b" not in text and "\x07" not in text
    lines = text.splitlines()
    assert not any(ln.startswith("imdsguard: PROTECTED") for ln in lines[1:])  # no forged line
    shown = [ln for ln in lines if "BLOCKED" in ln]
    assert len(shown) == status.RECENT
    assert "pid=99" in shown[-1] and "pid=3 " in shown[0]  # the last five, newest last
    assert "exe=/tmp/\\x1b[2J\\x1b[31mfake\\nimdsguard: PROTECTED" in shown[-1]
    assert shown[-1] == "    " + format_console(recent[-1])  # the events command's format


def test_status_text_without_events_has_no_recent_section() -> None:
    text = status.render_text(_status_doc([], total=0))
    assert "0 attempts logged" in text and "recent" not in text


def test_status_text_says_how_attribution_works() -> None:
    doc = _status_doc([], total=0)
    assert "attribution" not in status.render_text(doc)  # held in the queue: nothing to say
    doc["attribution"] = {"available": True, "held": False, "reason": "no nft_queue"}
    assert "note:     attribution best-effort: no nft_queue" in status.render_text(doc)
    doc["attribution"] = {"available": False, "held": True, "reason": "capture failed"}
    assert "note:     attribution unavailable: capture failed" in status.render_text(doc)


class _Leftover:
    name = "iptables"

    def close(self) -> None:
        pass


def test_status_never_says_ok_over_rules_left_in_the_other_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Our old backend's rules still deny, by a stale policy: drifted, with a reason."""
    monkeypatch.setattr(status, "leftovers", lambda current: [(_Leftover(), ("ipv4",))])
    doc: dict[str, Any] = {
        "rules": {"ipv4": "ok", "ipv6": "ok"},
        "reasons": [],
        "problems": [],
    }
    status._check_leftovers(doc, "nftables")
    assert doc["rules"] == {"ipv4": "drifted", "ipv6": "ok"}
    assert doc["leftovers"] == [{"backend": "iptables", "families": ["ipv4"]}]
    assert "also in the iptables backend (ipv4)" in doc["reasons"][0]
    assert doc["problems"] == ["ipv4: iptables rules of ours left in place"]
    assert "also in the iptables backend" in status.render_text(_doc_for_text(doc))


def _doc_for_text(extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": "degraded",
        "mode": "enforce",
        "backend": "nftables",
        "daemon": {"running": False, "pid": None, "rules_restored_total": 0},
        "broker": {"enabled": False},
        "blocked": {"total": 0, "recent": []},
        "attribution": {},
        **extra,
    }


def test_check_config_without_a_file_says_defaults_are_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "etc" / "config.yaml"  # the default path, absent
    monkeypatch.setattr("imdsguard.config.DEFAULT_PATH", str(missing))
    assert cli.main(["check-config"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"# {missing}: no such file; the defaults (what the daemon uses without it):"
    assert "OK" not in first  # before: "# <path>: OK" for a file that does not exist


def test_status_of_an_unreadable_event_log_is_unknown_not_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a non-root user: the log is root's (0600). "0 attempts" would be a lie."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "events.jsonl").write_text("{}\n")
    monkeypatch.setenv("IMDSGUARD_LOG_DIR", str(log_dir))

    def refuse(*_: Any, **__: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("imdsguard.events.log.count_events", refuse)
    blocked = status._blocked()
    assert blocked["total"] is None and "readable by root only" in blocked["error"]
    doc = _status_doc([], total=0)
    doc["blocked"] = blocked
    text = status.render_text(doc)
    assert "blocked:  unknown (the event log could not be read)" in text
    assert "0 attempts" not in text


def test_status_as_non_root_is_unknown_and_says_what_it_could_not_check(tmp_path: Path) -> None:
    """The real command as nobody: it reads nothing it may not (only reads, no packet)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    import subprocess
    import sys

    log_dir = tmp_path / "log"
    log_dir.mkdir(mode=0o700)
    (log_dir / "events.jsonl").write_text("{}\n")
    config = _config(tmp_path, "mode: enforce\n")
    tmp_path.chmod(0o755)
    env = {**os.environ, "IMDSGUARD_LOG_DIR": str(log_dir), "IMDSGUARD_RUN_DIR": str(tmp_path)}
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            sys.executable, "-m", "imdsguard", "status", "-c", config]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # unknown
    assert "imdsguard: UNKNOWN" in proc.stdout
    assert "0 attempts" not in proc.stdout  # before: "blocked:  0 attempts logged"
    assert "blocked:  unknown" in proc.stdout
    assert "blocked attempts not counted" in proc.stdout


def test_daemon_lines_and_events_share_one_timestamp_precision(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Milliseconds and Z in every line (the daemon's were microseconds; events ms)."""
    import json
    import re

    from imdsguard import _log
    from imdsguard.events.capture import rfc3339

    _log.configure("json")
    _log.get_logger().info("daemon_ready")
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(pattern, line["timestamp"]), line["timestamp"]
    assert re.fullmatch(pattern, rfc3339(1796174521.389))
    assert rfc3339(1796174521.389) == "2026-12-02T01:22:01.389Z"
