"""NftablesBackend's write decisions against a recorded libnftables (no kernel).

The real kernel behaviour (owner flag, EPERM for others, the backstop) is
tested in tests/integration/test_flush_race.py; here: what the backend sends
and how it falls back on a kernel without owned tables (< 5.12).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from imdsguard.config import parse_config
from imdsguard.errors import FirewallError
from imdsguard.firewall import nftables
from imdsguard.firewall.base import FamilyState
from imdsguard.policy import RuleSet, build_ruleset


class FakeKernel:
    """The tables, as libnftables' JSON listing shows them."""

    def __init__(self, owner_supported: bool = True) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.owner_supported = owner_supported
        self.sent: list[Any] = []

    def apply_json(self, commands: list[dict[str, Any]]) -> None:
        tables = copy.deepcopy(self.tables)
        for cmd in commands:
            ((verb, obj),) = cmd.items()
            ((kind, spec),) = obj.items()
            name = spec.get("table", spec.get("name"))
            if kind == "table":
                if verb == "add":
                    tables.setdefault(name, [])
                elif verb == "delete":
                    tables.pop(name)
                elif verb == "flush":
                    tables[name] = [o for o in tables[name] if "rule" not in o]
                continue
            if verb == "add":
                tables[spec["table"]].append({kind: copy.deepcopy(spec)})
            elif verb == "delete":
                tables[spec["table"]] = [
                    o for o in tables[spec["table"]] if o.get(kind, {}).get("name") != spec["name"]
                ]
        self.tables = tables


class FakeNftables:
    kernel: FakeKernel

    def __init__(self) -> None:
        self.dry_run = False

    def set_json_output(self, _on: bool) -> None:
        pass

    def set_handle_output(self, _on: bool) -> None:
        pass

    def set_dry_run(self, on: bool) -> None:
        self.dry_run = on

    def json_cmd(self, doc: dict[str, Any]) -> tuple[int, Any, str]:
        commands = doc["nftables"]
        if self.dry_run:
            return 0, "", ""
        if len(commands) == 1 and "list" in commands[0]:
            name = commands[0]["list"]["table"]["name"]
            if name not in self.kernel.tables:
                return -1, "", "Error: No such file or directory\n"
            return 0, {"nftables": [{"table": {"name": name}}, *self.kernel.tables[name]]}, ""
        self.kernel.sent.append(("json", commands))
        self.kernel.apply_json(commands)
        return 0, "", ""

    def cmd(self, text: str) -> tuple[int, str, str]:
        self.kernel.sent.append(("text", text))
        if "flags owner" in text and not self.kernel.owner_supported:
            return -1, "", "Error: Could not process rule: Operation not supported\n"
        for line in text.splitlines():
            words = line.split()
            if words[:2] == ["delete", "table"]:
                self.kernel.tables.pop(words[3])
            elif words[:2] == ["add", "table"]:
                self.kernel.tables.setdefault(words[3], [])
        return 0, "", ""


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel()
    FakeNftables.kernel = fake
    monkeypatch.setattr(nftables.context, "load_binding", FakeNftables)
    return fake


def _ruleset(text: str = "") -> RuleSet:
    return build_ruleset(parse_config("allow: {users: [0]}\n" + text, "c.yaml"))


def _states(backend: nftables.NftablesBackend, ruleset: RuleSet) -> set[str]:
    return {i.state for i in backend.inspect(ruleset).values()}


def test_daemon_owns_its_table_and_writes_the_backstop_first(kernel: FakeKernel) -> None:
    backend = nftables.NftablesBackend(hold=True)
    ruleset = _ruleset()
    assert backend.apply(ruleset)
    kinds = [kind for kind, _ in kernel.sent]
    assert kinds == ["json", "text", "json"]  # backstop, owned table, its content
    assert "flags owner" in kernel.sent[1][1]
    assert any("imdsguard_backstop" in str(c) for c in kernel.sent[0][1])
    assert sorted(kernel.tables) == [nftables.TABLE, nftables.BACKSTOP]
    assert _states(backend, ruleset) == {FamilyState.OK}
    assert not backend.apply(ruleset)
    # A reload replaces the owned table in place: never deleted, never re-added.
    kernel.sent.clear()
    assert backend.apply(_ruleset("endpoints: [169.254.169.254]\nendpoints_acknowledged: true\n"))
    for _kind, commands in kernel.sent:
        assert not any(
            "table" in next(iter(c.values()))
            and c.get("delete", {}).get("table", {}).get("name") == nftables.TABLE
            for c in commands
        )
    assert backend.limits() == ()


def test_kernel_without_owned_tables_falls_back_and_says_so(kernel: FakeKernel) -> None:
    kernel.owner_supported = False
    backend = nftables.NftablesBackend(hold=True)
    ruleset = _ruleset()
    assert backend.apply(ruleset)
    assert sorted(kernel.tables) == [nftables.TABLE, nftables.BACKSTOP]
    assert _states(backend, ruleset) == {FamilyState.OK}
    (limit,) = backend.limits()
    assert "5.12" in limit and "flush ruleset" in limit


def test_one_shot_apply_writes_only_the_backstop_and_clears_a_leftover(kernel: FakeKernel) -> None:
    kernel.tables[nftables.TABLE] = []  # an un-owned table of an older imdsguard
    backend = nftables.NftablesBackend()
    ruleset = _ruleset()
    assert _states(backend, ruleset) == {FamilyState.MISSING}
    assert backend.apply(ruleset)
    assert sorted(kernel.tables) == [nftables.BACKSTOP]
    assert _states(backend, ruleset) == {FamilyState.OK}
    # Audit mode: nothing of ours denies.
    assert backend.apply(_ruleset("mode: audit\n"))
    assert kernel.tables == {}


def test_missing_binding_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> None:
        raise ImportError(name)

    monkeypatch.setattr(nftables.context.importlib, "import_module", refuse)
    with pytest.raises(FirewallError, match="install python3-nftables"):
        nftables.NftablesBackend()
