"""The daemon's loop outlives resource exhaustion (EMFILE, ENOMEM) and says so in status."""

from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from imdsguard import _state, paths
from imdsguard.config import Config
from imdsguard.daemon import Daemon
from imdsguard.firewall.base import FamilyState, Inspection
from imdsguard.policy import RuleSet
from imdsguard_testing.fakes import FakeBackend, fake_daemon, logged


class _Backend(FakeBackend):
    """Inspection raises ``error`` (any exception) while ``failing`` is set, then all is well."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error_raised = error
        self.failing = threading.Event()
        self.failing.set()
        self.inspections = 0

    def inspect(self, ruleset: RuleSet) -> dict[str, Inspection]:
        self.inspections += 1
        if self.failing.is_set():
            raise self.error_raised
        return {f: Inspection(f, FamilyState.OK) for f in ("ipv4", "ipv6")}


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in ("RUN", "STATE", "LOG"):
        (tmp_path / key.lower()).mkdir()
        monkeypatch.setenv(f"IMDSGUARD_{key}_DIR", str(tmp_path / key.lower()))
    return tmp_path


def _daemon(backend: _Backend) -> Daemon:
    daemon = fake_daemon(Config(), backend=backend, interval=0.01)
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
    backend = _Backend(error)
    daemon = _daemon(backend)
    daemon._publish()
    loop = threading.Thread(target=daemon._loop, daemon=True)
    with capture_logs() as logs:
        loop.start()
        try:
            # ~1 s of failing ticks (one per QUICK_INTERVAL: the backend has a quick check)
            _wait(lambda: backend.inspections >= 40)
            assert loop.is_alive(), "the loop died of the error"
            failed = logged(logs, "rules_check_failed")
            assert 1 <= len(failed) <= 4, len(failed)  # rate-limited: not one line per tick
            assert type(error).__name__ in failed[0]["error"]
            daemon._publish()
            state = _state.read_state() or {}
            assert any("periodic check failing" in r for r in state["degraded"]), state
            backend.failing.clear()
            _wait(lambda: bool(logged(logs, "periodic_recovered")))
            _wait(lambda: not (_state.read_state() or {}).get("degraded"))
            assert logged(logs, "periodic_recovered")[0]["failures"] >= 40
        finally:
            daemon._stop.set()
            loop.join(timeout=5)
    assert not loop.is_alive()


def test_state_is_written_with_the_reserved_fd_when_out_of_fds(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = _daemon(_Backend(OSError(errno.EMFILE, "x")))
    real, calls = _state.write_state, []

    def write(state: dict[str, Any]) -> None:
        calls.append(daemon._reserve_fd)
        if len(calls) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        real(state)

    monkeypatch.setattr(_state, "write_state", write)
    reserve = daemon._reserve_fd
    assert reserve is not None
    with capture_logs() as logs:
        daemon.trouble.failed("check", "rules_check_failed", OSError(errno.EMFILE, "x"))
        daemon._publish()
    assert len(calls) == 2  # retried once the spare fd was given back
    with open(paths.state_file()) as fh:
        assert "periodic check failing" in json.load(fh)["degraded"][0]
    assert daemon._reserve_fd is not None  # taken again for next time
    assert not logged(logs, "state_write_failed")
