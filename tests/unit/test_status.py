"""imdsguard.status from a recorded state.json and a stub backend (no root, no kernel)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imdsguard import _locks, status
from imdsguard.config import Config
from imdsguard.domain import BackendName, Capture
from imdsguard.firewall.base import Backend, Capabilities, FamilyState, Inspection
from imdsguard.policy import RuleSet, build_ruleset

QUEUEING = Capabilities(Capture.QUEUE, notifications=False)


class _Stub(Backend):
    """OK only for the rule set it was told the kernel holds."""

    name = BackendName.IPTABLES

    def __init__(self, holds: RuleSet) -> None:
        self.holds = holds
        self.asked: list[RuleSet] = []

    def inspect(self, ruleset: RuleSet) -> dict[str, Inspection]:
        self.asked.append(ruleset)
        state = FamilyState.OK if ruleset == self.holds else FamilyState.DRIFTED
        return {f: Inspection(f, state) for f in ("ipv4", "ipv6")}

    def apply(self, ruleset: RuleSet) -> bool:
        return False

    def remove(self) -> bool:
        return False

    def present(self) -> tuple[str, ...]:
        return ()

    def preview(self, ruleset: RuleSet) -> list[str]:
        return []


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, running: bool, stub: _Stub) -> None:
    for key in ("RUN", "STATE", "LOG"):
        (tmp_path / key.lower()).mkdir()
        monkeypatch.setenv(f"IMDSGUARD_{key}_DIR", str(tmp_path / key.lower()))
    monkeypatch.setattr(_locks, "is_held", lambda _path: running)
    monkeypatch.setattr(status, "make_backend", lambda *_a, **_k: stub)
    monkeypatch.setattr(status, "leftovers", lambda _current: [])
    monkeypatch.setattr(status, "load_config", lambda *_a, **_k: Config())


def _record(tmp_path: Path, ruleset: RuleSet, **extra: Any) -> None:
    doc = {"pid": 42, "mode": "enforce", "backend": "iptables", "ruleset": ruleset.to_json()}
    (tmp_path / "run" / "state.json").write_text(json.dumps({**doc, **extra}))


def test_a_running_daemons_recorded_rule_set_is_the_one_inspected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied = build_ruleset(
        Config(), capturing=True, capabilities=Capabilities(Capture.QUEUE, notifications=False)
    )
    stub = _Stub(holds=applied)
    _setup(tmp_path, monkeypatch, running=True, stub=stub)
    _record(tmp_path, applied)
    doc = status.gather(None)
    assert stub.asked == [applied]  # no guessing between capture variants
    assert doc["rules"] == {"ipv4": "ok", "ipv6": "ok"}
    assert doc["state"] == "protected", doc["reasons"]
    assert doc["daemon"]["pid"] == 42
    text = status.render_text(doc)
    assert text.startswith("imdsguard: PROTECTED") and "running (pid 42)" in text


def test_without_a_daemon_the_config_policy_without_capture_is_expected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = _Stub(holds=build_ruleset(Config()))
    _setup(tmp_path, monkeypatch, running=False, stub=stub)
    doc = status.gather(None)
    assert [r.capture for r in stub.asked] == [Capture.NONE]
    assert doc["state"] == "degraded"
    assert "daemon is not running" in " ".join(doc["reasons"])
    assert status.exit_code(doc) == 1


def test_a_killed_daemons_capture_is_tried_after_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued = build_ruleset(
        Config(), capturing=True, capabilities=Capabilities(Capture.QUEUE, notifications=False)
    )
    stub = _Stub(holds=queued)
    _setup(tmp_path, monkeypatch, running=False, stub=stub)
    _record(tmp_path, queued)
    doc = status.gather(None)
    assert [r.capture for r in stub.asked] == [Capture.NONE, Capture.QUEUE]
    assert doc["rules"] == {"ipv4": "ok", "ipv6": "ok"}


def _old_format(ruleset: RuleSet) -> str:
    """``ruleset`` as a daemon before ``RuleSet.capture`` recorded it (``queue_num``)."""
    data = json.loads(ruleset.to_json())
    capture = data.pop("capture")
    data["queue_num"] = 5421 if capture != "none" else None
    return json.dumps(data)


def test_an_old_daemons_queue_number_may_mean_queue_or_log_rules() -> None:
    """Before capture, the nftables backend turned a queue number into log rules on a
    kernel without nft_queue: status must accept either while such a daemon runs."""
    queued = build_ruleset(Config(), capabilities=QUEUEING, capturing=True)
    state = {"ruleset": _old_format(queued)}
    expected = status.expected_rulesets(state, True, Config())
    assert [r.capture for r in expected] == [Capture.QUEUE, Capture.LOG]
    stopped = status.expected_rulesets(state, False, Config())
    assert [r.capture for r in stopped] == [Capture.NONE, Capture.QUEUE, Capture.LOG]


def test_a_record_this_version_cannot_read_is_no_record() -> None:
    """A value from another version (downgrade) must not crash status."""
    data = json.loads(build_ruleset(Config()).to_json())
    data["capture"] = "nfqueue"
    state = {"ruleset": json.dumps(data)}
    assert [r.capture for r in status.expected_rulesets(state, False, Config())] == [Capture.NONE]
    assert status.expected_rulesets({"ruleset": "{not json"}, False, None) == []


def test_a_running_daemon_without_a_record_yet_may_capture_either_way() -> None:
    """Its first publish follows the rules: until then any of its rule sets is fine."""
    expected = status.expected_rulesets(None, True, Config())
    assert [r.capture for r in expected] == [Capture.NONE, Capture.QUEUE, Capture.LOG]
