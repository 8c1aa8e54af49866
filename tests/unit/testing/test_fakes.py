"""imdsguard_testing.fakes.FakeBackend keeps the Backend contract (it stands in for the kernel)."""

from __future__ import annotations

import pytest

from imdsguard.config import Config
from imdsguard.domain import Capture, FamilyState
from imdsguard.errors import FirewallError
from imdsguard.firewall.base import Backend
from imdsguard.policy import build_ruleset
from imdsguard_testing.fakes import FakeBackend, FakeIptablesBackend


def test_apply_inspect_remove_follow_the_contract() -> None:
    backend, ruleset = FakeBackend(), build_ruleset(Config())
    assert isinstance(backend, Backend) and backend.present() == ()
    assert {i.state for i in backend.inspect(ruleset).values()} <= {
        FamilyState.MISSING,
        FamilyState.DISABLED,
    }
    assert backend.apply(ruleset) is True
    assert backend.apply(ruleset) is False  # already in place
    assert backend.inspect(ruleset)["ipv4"].state == FamilyState.OK
    assert "ipv4" in backend.present() and backend.applied == [ruleset]
    assert backend.remove() is True and backend.remove() is False
    assert backend.calls["apply"] == 2 and backend.calls["remove"] == 2


def test_flush_and_drift_are_seen_and_repaired() -> None:
    backend, ruleset = FakeBackend(), build_ruleset(Config())
    backend.apply(ruleset)
    backend.flush()
    assert backend.inspect(ruleset)["ipv4"].state == FamilyState.MISSING
    assert backend.apply(ruleset) is True
    backend.drift("ipv4")
    assert backend.inspect(ruleset)["ipv4"].state == FamilyState.DRIFTED
    assert backend.apply(ruleset) is True
    assert backend.inspect(ruleset)["ipv4"].state == FamilyState.OK


def test_failures_at_chosen_calls() -> None:
    backend, ruleset = FakeBackend(), build_ruleset(Config())
    backend.fail("apply", on_call=2)
    backend.apply(ruleset)
    with pytest.raises(FirewallError, match="apply failed"):
        backend.apply(ruleset)
    backend.apply(ruleset)
    backend.fail("inspect")  # the next call only
    with pytest.raises(FirewallError):
        backend.inspect(ruleset)
    backend.inspect(ruleset)
    backend.fail("remove", always=True)
    for _ in range(2):
        with pytest.raises(FirewallError):
            backend.remove()
    backend.heal()
    assert backend.remove() is True


def test_capabilities_and_names() -> None:
    assert FakeBackend().capabilities().capture == Capture.QUEUE
    assert FakeBackend(capture=Capture.LOG).capabilities().capture == Capture.LOG
    assert FakeBackend.name != FakeIptablesBackend.name
