"""A backend change leaves no rule of ours behind (restart, SIGHUP, remove, status).

The old backend's rules deny by their own, stale policy: left in place, a
user the new policy admits (or audit mode lets through) would still be
refused, ``status`` would say ``rules ok`` and ``remove`` (the RPM's erase
runs ``imdsguard remove --force``) would leave a host that blocks IMDS with
no imdsguard installed.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from imdsguard.firewall.nftables import BACKSTOP
from imdsguard_testing.netns import User
from tests.integration.conftest import DaemonHandle

PATH = "/latest/meta-data/instance-id"
#: (first backend, second backend as configured, second backend's name): auto is
#: nftables on this host (Debian 12's iptables is the nf_tables variant).
SWITCHES = [("iptables", "auto", "nftables"), ("nftables", "iptables", "iptables")]
IDS = ["iptables-to-auto", "nftables-to-iptables"]


def config(backend: str, mode: str = "enforce") -> str:
    return f"firewall:\n  backend: {backend}\nmode: {mode}\nallow:\n  users: [root]\n"


def ours(daemon: DaemonHandle) -> dict[str, bool]:
    """Which backends hold rules of ours in HOST (read without creating anything)."""
    run = daemon.topo.run
    legacy = ""
    names = run(daemon.topo.host, ["cat", "/proc/net/ip_tables_names"]).stdout
    if "filter" in names.split():
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            legacy += run(daemon.topo.host, [tool, "-t", "filter"], check=True).stdout
    # The daemon's owned table goes with it; the backstop stays (and is all a one-shot writes).
    tables = run(daemon.topo.host, ["nft", "list", "tables"], check=True).stdout.split()
    nft = any(name in tables for name in ("imdsguard", BACKSTOP))
    return {"iptables": "IMDSGUARD" in legacy, "nftables": nft}


def status(daemon: DaemonHandle) -> dict[str, Any]:
    proc = daemon.cli("status", "--json")
    doc: dict[str, Any] = json.loads(proc.stdout)
    doc["exit"] = proc.returncode
    return doc


def start_enforcing(daemon: DaemonHandle, backend: str, denied: User) -> None:
    """Start the daemon enforcing on ``backend``: ``denied`` is refused."""
    daemon.write_config(config(backend))
    daemon.start()
    assert not daemon.topo.imds_get(denied, PATH, v2=False).ok


def only_the_new_rules(daemon: DaemonHandle, denied: User, first: str, name: str) -> dict[str, Any]:
    """After the switch from ``first`` to ``name`` (audit): only ``name`` holds rules of ours,
    ``denied`` gets through and status names no leftover. The status document.
    """
    assert ours(daemon) == {first: False, name: True}
    got = daemon.topo.imds_get(denied, PATH, v2=False)
    assert got.ok, f"refused by a leftover of the {first} backend: {got}"
    doc = status(daemon)
    assert doc["backend"] == name and doc["leftovers"] == [], doc
    return doc


@pytest.fixture
def denied(test_users: dict[str, User]) -> User:
    return test_users["imdsg-denied"]


@pytest.mark.parametrize("backend", ["iptables"])  # the fixture's; each test sets its own
@pytest.mark.parametrize(("first", "second", "name"), SWITCHES, ids=IDS)
def test_restart_on_another_backend_removes_the_old_rules(
    daemon: DaemonHandle, denied: User, first: str, second: str, name: str
) -> None:
    start_enforcing(daemon, first, denied)
    assert daemon.stop() == 0  # fail closed: the rules stay
    assert ours(daemon)[first]

    # Audit mode on the new backend: only the old rules could still refuse him.
    daemon.write_config(config(second, "audit"))
    daemon.start()
    (removed,) = daemon.wait_log("old_backend_rules_removed")
    assert removed["backend"] == first, removed
    doc = only_the_new_rules(daemon, denied, first, name)
    assert doc["rules"] == {"ipv4": "ok", "ipv6": "ok"}, doc


@pytest.mark.parametrize("backend", ["iptables"])
@pytest.mark.parametrize(("first", "second", "name"), SWITCHES, ids=IDS)
def test_status_and_remove_see_both_backends(
    daemon: DaemonHandle, first: str, second: str, name: str
) -> None:
    """``apply`` on one backend, then on the other: status says so, remove takes both."""
    daemon.write_config(config(first))
    assert daemon.cli("apply").returncode == 0
    daemon.write_config(config(second))
    assert daemon.cli("apply").returncode == 0
    assert ours(daemon) == {first: True, name: True}

    doc = status(daemon)
    assert doc["backend"] == name and doc["exit"] == 1 and doc["state"] == "degraded", doc
    assert doc["rules"] == {"ipv4": "drifted", "ipv6": "drifted"}, doc  # never "ok"
    assert doc["leftovers"] == [{"backend": first, "families": ["ipv4", "ipv6"]}], doc
    assert any(f"also in the {first} backend" in r for r in doc["reasons"]), doc

    removed = daemon.cli("remove")
    assert removed.returncode == 0, removed
    assert first in removed.stdout and name in removed.stdout, removed.stdout
    assert ours(daemon) == {first: False, name: False}
    assert "no imdsguard rules" in daemon.cli("remove").stdout


@pytest.mark.parametrize("backend", ["iptables"])
@pytest.mark.parametrize(("first", "second", "name"), SWITCHES, ids=IDS)
def test_sighup_backend_switch_leaves_only_the_new_rules(
    daemon: DaemonHandle, denied: User, first: str, second: str, name: str
) -> None:
    start_enforcing(daemon, first, denied)
    daemon.write_config(config(second, "audit"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("config_reloaded")
    doc = only_the_new_rules(daemon, denied, first, name)
    assert doc["rules"] == {"ipv4": "ok", "ipv6": "ok"} and doc["mode"] == "audit", doc
    assert daemon.stop() == 0
    daemon.write_config(config(second))
    assert daemon.cli("remove").returncode == 0
    assert ours(daemon) == {first: False, name: False}


@pytest.mark.parametrize("backend", ["iptables"])
@pytest.mark.parametrize(("before", "after"), [("auto", "nftables"), ("nftables", "auto")])
def test_sighup_renaming_the_same_backend_keeps_it(
    daemon: DaemonHandle, denied: User, before: str, after: str
) -> None:
    """``auto`` and ``nftables`` are one backend here: a reload keeps the table's owner.

    Before, the reload built a second nftables backend whose owner context the
    kernel refused our own table (config_reload_failed, or a bogus repair).
    """
    daemon.write_config(config(before))
    daemon.start()
    daemon.write_config(config(after, "audit"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("config_reloaded")
    names = [line.get("event") for line in daemon.logs()]
    assert "config_reload_failed" not in names and "rules_restored" not in names, names
    assert daemon.topo.imds_get(denied, PATH, v2=False).ok  # audit mode is in force
    doc = status(daemon)
    assert doc["backend"] == "nftables" and doc["mode"] == "audit", doc
    assert doc["rules"] == {"ipv4": "ok", "ipv6": "ok"}, doc
