"""The daemon's life cycle without root: start, repair, reload and its rollback, stop.

Everything host-facing is a fake (:mod:`imdsguard_testing.fakes`): the backend
keeps "the kernel's rules" in memory, components only record. The log is
read with ``structlog.testing.capture_logs``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest
from structlog.testing import capture_logs

from imdsguard import _state
from imdsguard.config import Config
from imdsguard.daemon import Daemon
from imdsguard.domain import BackendName, Capture
from imdsguard.errors import ConfigError, FirewallError
from imdsguard.firewall.base import Backend
from imdsguard_testing.fakes import (
    FakeBackend,
    FakeComponent,
    FakeComponents,
    FakeIptablesBackend,
    fake_daemon,
    logged,
)

OLD = Config(path="/etc/imdsguard/old.yaml")
NEW = dataclasses.replace(OLD, path="/etc/imdsguard/new.yaml", mode="audit")


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in ("RUN", "STATE", "LOG"):
        (tmp_path / key.lower()).mkdir()
        monkeypatch.setenv(f"IMDSGUARD_{key}_DIR", str(tmp_path / key.lower()))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    return tmp_path


def _wait(cond: Callable[[], Any], timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


class _Loaded:
    """What a reload reads: a config, or an error to raise."""

    def __init__(self) -> None:
        self.next: Config | Exception = OLD

    def __call__(self, _path: str | None) -> Config:
        if isinstance(self.next, Exception):
            raise self.next
        return self.next


@dataclasses.dataclass
class Rig:
    daemon: Daemon
    backend: FakeBackend
    components: FakeComponents
    loaded: _Loaded
    logs: list[dict[str, Any]]

    def reload(self, config: Config | Exception) -> dict[str, Any]:
        """SIGHUP with ``config`` to read; the line that says how it went."""
        self.loaded.next = config
        before = len(self.logs)
        self.daemon.signals.request(self.daemon.signals.reload)

        def outcome() -> list[dict[str, Any]]:
            return [
                e
                for e in self.logs[before:]
                if e["event"] in ("config_reloaded", "config_reload_failed")
            ]

        _wait(outcome)
        _wait(lambda: not self.daemon._reload.is_set())
        time.sleep(0.05)  # the rollback's lines follow the failure's
        return outcome()[0]

    def component(self, name: str) -> FakeComponent:
        """The ``name`` component the daemon runs."""
        found = self.daemon._components[name]
        assert isinstance(found, FakeComponent)
        return found

    def running(self) -> list[FakeComponent]:
        return [self.component(name) for name in self.daemon._components]

    def events(self, name: str) -> list[dict[str, Any]]:
        return logged(self.logs, name)

    def state(self) -> dict[str, Any]:
        self.daemon._publish()
        state = _state.read_state()
        assert state is not None
        return state


@contextmanager
def running(
    backend: FakeBackend | None = None,
    components: FakeComponents | None = None,
    others: tuple[Backend, ...] = (),
) -> Iterator[Rig]:
    """A daemon run() in a thread until the block ends (then stopped and joined)."""
    backend = backend or FakeBackend()
    components = components or FakeComponents("capture", "broker")
    loaded = _Loaded()
    daemon = fake_daemon(OLD, backend=backend, components=components, load=loaded, others=others)
    with capture_logs() as logs:
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        rig = Rig(daemon, backend, components, loaded, logs)
        try:
            _wait(lambda: rig.events("daemon_ready") or not thread.is_alive())
            assert thread.is_alive(), "run() ended before daemon_ready"
            yield rig
        finally:
            daemon.signals.request(daemon.signals.stop)
            thread.join(timeout=10)
    assert not thread.is_alive()


# -- start and stop


def test_start_starts_the_capture_applies_queueing_rules_then_the_rest() -> None:
    with running() as rig:
        backend = rig.backend
        assert backend.installed == rig.daemon.ruleset
        assert backend.installed is not None and backend.installed.capture == Capture.QUEUE
        assert rig.component("capture").running and rig.component("broker").running
        assert [e["reason"] for e in rig.events("rules_applied")] == ["startup"]
        assert rig.events("daemon_ready")[0]["rules"] == {"ipv4": "ok", "ipv6": "ok"}
        starting = rig.events("daemon_starting")[0]
        assert (starting["backend"], starting["mode"]) == ("nftables", "enforce")


def test_stop_hands_over_to_rules_that_need_no_daemon_and_leaves_them() -> None:
    with running() as rig:
        components = rig.running()
    backend = rig.backend
    assert backend.installed is not None and backend.installed.capture == Capture.NONE
    assert backend.calls["remove"] == 0  # fail closed: the rules stay
    assert [e["reason"] for e in rig.events("rules_applied")] == ["startup", "shutdown"]
    stopped = rig.events("daemon_stopped")[0]
    assert stopped["rules_left_in_place"] is True
    assert set(stopped["components"]) == {"capture", "broker"}
    assert len(components) == 2 and not any(c.running for c in components)


def test_capture_that_cannot_start_leaves_rules_without_a_queue_and_says_degraded() -> None:
    components = FakeComponents("capture", "broker")
    components.fail("capture", "start")
    with running(components=components) as rig:
        assert rig.backend.installed is not None and rig.backend.installed.capture == Capture.NONE
        assert rig.events("capture_unavailable")
        state = rig.state()
        assert state["attribution"]["available"] is False
        assert any("attribution unavailable" in r for r in state["degraded"])


# -- repair


def test_a_flush_is_repaired_and_counted() -> None:
    with running() as rig:
        rig.backend.flush()
        _wait(lambda: rig.events("rules_restored"))
        restored = rig.events("rules_restored")[0]
        assert restored["families"] == ["ipv4", "ipv6"] and restored["total"] == 1
        assert any("missing" in p for p in restored["problems"])
        assert rig.backend.installed == rig.daemon.ruleset
        assert rig.daemon.last_states == {"ipv4": "ok", "ipv6": "ok"}
        assert rig.state()["rules_restored_total"] == 1


def test_a_failing_inspection_is_retried_and_the_rules_stay() -> None:
    with running() as rig:
        rig.backend.fail("inspect", always=True)
        _wait(lambda: rig.events("rules_check_failed"))
        rig.backend.heal()
        _wait(lambda: rig.events("periodic_recovered"))
        assert rig.backend.installed == rig.daemon.ruleset


# -- reload


def test_reload_applies_the_new_rules_and_reconfigures_the_components() -> None:
    with running() as rig:
        done = rig.reload(NEW)
        assert done["event"] == "config_reloaded" and done["mode"] == "audit"
        assert rig.daemon.config is NEW
        assert rig.backend.installed is not None and rig.backend.installed.mode == "audit"
        assert rig.backend.installed == rig.daemon.ruleset
        for component in rig.running():
            assert component.configs[-1] is NEW, component
        state = rig.state()
        assert (state["mode"], state["config"], state["reloads"]) == ("audit", NEW.path, 1)
        assert state["ruleset"] == rig.daemon.ruleset.to_json()


def _unchanged(rig: Rig, before: Any, applies: int) -> None:
    """The previous config, policy and rules are in force; nothing was removed."""
    assert rig.daemon.config is OLD
    assert rig.daemon.ruleset == before
    assert rig.backend.installed == before
    assert rig.backend.calls["remove"] == 0
    assert rig.backend.calls["apply"] == applies
    for component in rig.running():
        assert component.configs[-1] is OLD, component
    state = rig.state()
    assert state["reload_failures"] == 1 and state["reloads"] == 0
    assert state["mode"] == "enforce" and state["config"] == OLD.path


def test_reload_with_a_broken_config_keeps_everything() -> None:
    with running() as rig:
        before, applies = rig.daemon.ruleset, rig.backend.calls["apply"]
        failed = rig.reload(ConfigError("/etc/imdsguard/new.yaml", "mode: must be enforce|audit"))
        assert failed["stage"] == "load" and failed["kept"] == "previous policy"
        assert "must be enforce|audit" in failed["error"]
        assert failed["log_level"] == "error"
        _unchanged(rig, before, applies)
        assert not rig.events("reload_rolled_back")
        assert all(len(c.configs) == 1 for c in rig.running())  # not touched


def test_reload_whose_backend_cannot_be_made_keeps_everything() -> None:
    with running() as rig:
        before, applies = rig.daemon.ruleset, rig.backend.calls["apply"]

        def no_backend(config: Config, current: Backend | None) -> Backend:
            raise FirewallError("iptables: libxtables not found")

        rig.daemon.wiring = dataclasses.replace(rig.daemon.wiring, backend_for=no_backend)
        failed = rig.reload(dataclasses.replace(NEW, backend="iptables"))
        assert failed["stage"] == "load" and "libxtables" in failed["error"]
        _unchanged(rig, before, applies)


def test_reload_whose_capture_cannot_reconfigure_rolls_back_the_components_only() -> None:
    with running() as rig:
        before, applies = rig.daemon.ruleset, rig.backend.calls["apply"]
        rig.component("capture").fail("reconfigure")
        failed = rig.reload(NEW)
        assert failed["stage"] == "components"
        _unchanged(rig, before, applies)  # the rules were not touched
        assert not rig.events("reload_rollback_incomplete")
        assert rig.daemon.rollback_problem is None


def test_reload_whose_rules_cannot_be_applied_puts_the_old_ones_back() -> None:
    with running() as rig:
        before, applies = rig.daemon.ruleset, rig.backend.calls["apply"]
        rig.backend.fail("apply")
        failed = rig.reload(NEW)
        assert failed["stage"] == "apply" and "apply failed" in failed["error"]
        assert rig.events("rules_applied")[-1]["reason"] == "reload_rolled_back"
        _unchanged(rig, before, applies + 2)  # the failed one, then the old rules again
        assert NEW not in rig.component("broker").configs  # it never got the new config


def test_reload_to_another_backend_that_fails_removes_its_part_and_keeps_the_old() -> None:
    other = FakeIptablesBackend()
    other.fail("apply", always=True)
    with running(others=(other,)) as rig:
        before, applies = rig.daemon.ruleset, rig.backend.calls["apply"]
        failed = rig.reload(dataclasses.replace(NEW, backend="iptables"))
        assert failed["stage"] == "apply"
        assert rig.daemon.backend is rig.backend
        assert other.calls["remove"] == 1  # whatever part of its rules got in
        _unchanged(rig, before, applies + 1)
        assert rig.state()["backend"] == "nftables"


def test_reload_to_another_backend_removes_the_old_backends_rules() -> None:
    other = FakeIptablesBackend()
    with running(others=(other,)) as rig:
        done = rig.reload(dataclasses.replace(NEW, backend="iptables"))
        assert done["event"] == "config_reloaded"
        assert rig.daemon.backend is other and other.installed == rig.daemon.ruleset
        assert rig.backend.installed is None and rig.backend.closed == 1
        assert rig.state()["backend"] == "iptables"


def test_reload_whose_broker_cannot_reconfigure_rolls_back_rules_and_components() -> None:
    with running() as rig:
        before, applies = rig.daemon.ruleset, rig.backend.calls["apply"]
        rig.component("broker").fail("reconfigure")
        failed = rig.reload(NEW)
        assert failed["stage"] == "components"
        reasons = [e["reason"] for e in rig.events("rules_applied")]
        assert reasons[-2:] == ["reload", "reload_rolled_back"]
        names = [e["event"] for e in rig.logs]
        last_apply = len(names) - 1 - names[::-1].index("rules_applied")
        assert names.index("config_reload_failed") < last_apply  # what failed, then the undo
        _unchanged(rig, before, applies + 2)
        assert rig.daemon.rollback_problem is None


def test_a_rollback_that_cannot_restart_a_component_says_so_until_a_good_reload() -> None:
    with running() as rig:
        rig.component("broker").fail("reconfigure", always=True)
        rig.reload(NEW)
        assert rig.events("reload_rollback_incomplete")
        assert rig.backend.installed is not None and rig.backend.installed.mode == "enforce"
        state = rig.state()
        assert any("did not restart" in r for r in state["degraded"]), state["degraded"]
        rig.component("broker").heal()
        assert rig.reload(NEW)["event"] == "config_reloaded"
        assert not rig.state()["degraded"]


# -- the published state


def test_state_document() -> None:
    with running() as rig:
        state = rig.state()
        daemon = rig.daemon
        assert state["backend"] == BackendName.NFTABLES and state["mode"] == "enforce"
        assert state["config"] == OLD.path and state["ruleset"] == daemon.ruleset.to_json()
        assert state["rules_restored_total"] == 0 and state["last_problems"] == []
        assert (state["reloads"], state["reload_failures"]) == (0, 0)
        assert state["degraded"] == [] and state["units"] == {} and state["limits"] == []
        assert state["components"] == {
            "capture": {"running": True, "mode": "enforce"},
            "broker": {"running": True, "mode": "enforce"},
        }
        assert state["attribution"] == {"available": True, "held": True, "reason": None}
        assert state["started"] <= state["updated"] and state["pid"] > 0
