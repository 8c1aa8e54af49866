"""The daemon's loop outlives resource exhaustion (EMFILE, ENOMEM) and says so in status."""

from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from imdsguard import _state, paths
from imdsguard.config import Config
from imdsguard.daemon import Daemon
from imdsguard.domain import BackendName, Capture
from imdsguard.firewall.base import Backend, Capabilities, FamilyState, Inspection
from imdsguard.policy import build_ruleset


class _Log:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.calls.append((level, event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.calls if e == name]


class _Backend(Backend):
    """Inspection fails with ``error`` while ``failing`` is set, then all is well.

    It says it notifies changes but has no watch socket (like nftables whose
    watch failed): the loop checks in full every interval.
    """

    name = BackendName.NFTABLES

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.failing = threading.Event()
        self.failing.set()
        self.inspections = 0

    def inspect(self, _ruleset: Any) -> dict[str, Inspection]:
        self.inspections += 1
        if self.failing.is_set():
            raise self.error
        return {f: Inspection(f, FamilyState.OK) for f in ("ipv4", "ipv6")}

    def apply(self, _ruleset: Any) -> bool:
        return False

    def remove(self) -> bool:
        return False

    def present(self) -> tuple[str, ...]:
        return ()

    def preview(self, _ruleset: Any) -> list[str]:
        return []

    def capabilities(self) -> Capabilities:
        return Capabilities(capture=Capture.LOG, notifications=True)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in ("RUN", "STATE", "LOG"):
        (tmp_path / key.lower()).mkdir()
        monkeypatch.setenv(f"IMDSGUARD_{key}_DIR", str(tmp_path / key.lower()))
    return tmp_path


def _daemon(backend: _Backend, log: _Log) -> Daemon:
    daemon = Daemon(None, log, interval=0.01)
    daemon.config = Config()
    daemon.backend = backend
    daemon.ruleset = build_ruleset(daemon.config)
    daemon.trouble.interval = 0.5
    return daemon


def _wait(cond: Any, timeout: float = 5) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EMFILE, "Too many open files"),
        MemoryError(),
        OSError(errno.ENOMEM, "Cannot allocate memory"),
        RuntimeError("iptc: something unexpected"),
    ],
    ids=["EMFILE", "MemoryError", "ENOMEM", "other"],
)
def test_the_loop_survives_a_failing_check_and_reports_degraded_until_it_recovers(
    error: BaseException, run_dir: Path
) -> None:
    backend, log = _Backend(error), _Log()
    daemon = _daemon(backend, log)
    daemon._publish()
    loop = threading.Thread(target=daemon._loop, daemon=True)
    loop.start()
    try:
        _wait(lambda: backend.inspections >= 100)  # ~1 s of failing ticks
        assert loop.is_alive(), "the loop died of the error"
        failed = log.events("rules_check_failed")
        assert 1 <= len(failed) <= 4, len(failed)  # rate-limited: not one line per tick
        assert type(error).__name__ in failed[0]["error"]
        daemon._publish()
        state = _state.read_state() or {}
        assert any("periodic check failing" in r for r in state["degraded"]), state
        backend.failing.clear()
        _wait(lambda: bool(log.events("periodic_recovered")))
        _wait(lambda: not (_state.read_state() or {}).get("degraded"))
        assert log.events("periodic_recovered")[0]["failures"] >= 100
    finally:
        daemon._stop.set()
        loop.join(timeout=5)
    assert not loop.is_alive()


def test_state_is_written_with_the_reserved_fd_when_out_of_fds(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _Log()
    daemon = _daemon(_Backend(OSError(errno.EMFILE, "x")), log)
    real, calls = _state.write_state, []

    def write(state: dict[str, Any]) -> None:
        calls.append(daemon._reserve_fd)
        if len(calls) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        real(state)

    monkeypatch.setattr(_state, "write_state", write)
    reserve = daemon._reserve_fd
    assert reserve is not None
    daemon.trouble.failed("check", "rules_check_failed", OSError(errno.EMFILE, "x"))
    daemon._publish()
    assert len(calls) == 2  # retried once the spare fd was given back
    with open(paths.state_file()) as fh:
        assert "periodic check failing" in json.load(fh)["degraded"][0]
    assert daemon._reserve_fd is not None  # taken again for next time
    assert not log.events("state_write_failed")
