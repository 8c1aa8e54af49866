"""Log lines carry their level to journald (``<N>`` prefix) only when stdout is the journal."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from imdsguard import _log


@pytest.fixture
def stdout_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    path = tmp_path / "stdout"
    with open(path, "w", buffering=1) as fh:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        monkeypatch.delenv(_log.PREFIX_ENV, raising=False)
        yield fh
    structlog.reset_defaults()


def _stream_of(fh: Any) -> str:
    st = os.fstat(fh.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def _lines(fh: Any) -> list[str]:
    fh.flush()
    with open(fh.name) as f:
        return f.read().splitlines()


def _emit() -> None:
    log = _log.get_logger()
    log.info("daemon_ready")
    log.warning("rules_restored", problems=["ipv4: chain flushed"])
    log.warning("broker_refused", uid=1000)
    log.error("config_reload_failed", error="x")


def test_under_journald_every_line_carries_its_priority(
    stdout_file: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", _stream_of(stdout_file))
    _log.configure("json", stream=stdout_file)
    _emit()
    lines = _lines(stdout_file)
    assert [ln[:3] for ln in lines] == ["<6>", "<4>", "<4>", "<3>"]
    docs = [json.loads(ln[3:]) for ln in lines]  # what journald keeps as MESSAGE
    assert [d["event"] for d in docs] == [
        "daemon_ready",
        "rules_restored",
        "broker_refused",
        "config_reload_failed",
    ]
    assert [d["level"] for d in docs] == ["info", "warning", "warning", "error"]


def test_console_format_gets_the_prefix_too(
    stdout_file: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", _stream_of(stdout_file))
    _log.configure("console", stream=stdout_file)
    _log.get_logger().warning("rules_restored")
    (line,) = _lines(stdout_file)
    assert line.startswith("<4>") and "rules_restored" in line


@pytest.mark.parametrize("stream", [None, "1:2", "garbage", "12"])
def test_not_under_journald_lines_stay_plain_json(
    stdout_file: Any, monkeypatch: pytest.MonkeyPatch, stream: str | None
) -> None:
    """A JOURNAL_STREAM inherited by a process whose stdout goes elsewhere does not count."""
    if stream is not None:
        monkeypatch.setenv("JOURNAL_STREAM", stream)
    _log.configure("json", stream=stdout_file)
    _emit()
    docs = [json.loads(ln) for ln in _lines(stdout_file)]
    assert [d["level"] for d in docs] == ["info", "warning", "warning", "error"]


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("1", True), ("no", False)])
def test_the_switch_overrides_detection(
    stdout_file: Any, monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", _stream_of(stdout_file))  # detection would say yes
    monkeypatch.setenv(_log.PREFIX_ENV, value)
    assert _log.stdout_is_journal(stdout_file) is expected
    monkeypatch.delenv("JOURNAL_STREAM")
    assert _log.stdout_is_journal(stdout_file) is expected
