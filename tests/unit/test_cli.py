"""The command line: one-line errors, exit codes, check-config output, sd_notify."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from imdsguard import cli, notify
from imdsguard.daemon import Daemon


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
    assert cli.main([command, "-c", path]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs root" in err and "Traceback" not in err


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


class _Log:
    """Records structlog-style calls: (level, event, fields)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.calls.append((level, event, fields))


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
    log = _Log()
    daemon = Daemon(None, log)
    assert daemon._notify("READY=1", "STATUS=protecting IMDS") is False
    assert daemon._notify("STOPPING=1") is False
    assert [(lvl, ev) for lvl, ev, _ in log.calls] == [("warning", "sd_notify_failed")]
    assert log.calls[0][2]["socket"] == address and log.calls[0][2]["error"]
