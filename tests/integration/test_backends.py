"""Backend selection and nftables-specific behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from imdsguard.firewall.detect import host_flavour
from imdsguard_testing.netns import Topology, User, scaled, wait_for
from tests.integration.conftest import DaemonHandle

CREDS = "/latest/meta-data/iam/security-credentials/imdsguard-demo-role"


@pytest.mark.kernel  # a stock kernel has no ip_tables loaded until something loads it
@pytest.mark.parametrize("backend", ["nftables"])
def test_auto_on_an_nft_host_creates_no_legacy_tables(daemon: DaemonHandle) -> None:
    if host_flavour() != "nftables":
        pytest.fail("this test expects Debian 12's iptables (nf_tables variant)")
    daemon.write_config("firewall:\n  backend: auto\n")
    names = ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names")
    # Missing where the ip_tables module is not loaded (nftables-only AL2023, RHEL 9):
    # then it must stay missing (nothing may load the module just to look).
    before = [_legacy(daemon, path) for path in names]
    assert all(b in (None, "") for b in before), f"a fresh namespace has legacy tables: {before}"
    daemon.start()
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["backend"] == "nftables" and status["state"] == "protected", status
    assert daemon.stop() == 0
    assert daemon.cli("status").returncode == 1  # no daemon: degraded
    assert daemon.cli("remove").returncode == 0  # looks at every backend
    assert [_legacy(daemon, path) for path in names] == before, "legacy tables were created"


@pytest.mark.kernel  # a stock kernel has no ip_tables loaded until something loads it
@pytest.mark.parametrize("backend", ["iptables"])
def test_remove_and_status_create_no_legacy_tables(daemon: DaemonHandle) -> None:
    """Even configured for iptables: looking for our rules must not create the tables."""
    names = ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names")
    before = [_legacy(daemon, path) for path in names]
    assert all(b in (None, "") for b in before), f"a fresh namespace has legacy tables: {before}"
    remove = daemon.cli("remove")
    assert remove.returncode == 0 and "no imdsguard rules" in remove.stdout, remove
    assert daemon.cli("status").returncode == 2  # unprotected: nothing in place
    assert [_legacy(daemon, path) for path in names] == before, "legacy tables were created"


def _legacy(daemon: DaemonHandle, path: str) -> str | None:
    """The legacy tables listed in ``path`` in HOST, or None when it does not exist."""
    proc = daemon.topo.run(daemon.topo.host, ["cat", path])
    if proc.returncode != 0:
        assert "No such file" in proc.stderr, proc
        return None
    return proc.stdout.strip()


@pytest.mark.parametrize("backend", ["nftables"])
def test_group_membership_change_is_picked_up(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    """nft matches uids: a user added to an allowed group gets in without a reload."""
    name = "imdsg-denied"
    subprocess.run(["groupadd", "-r", "-f", "imdsg-late"], check=True)
    subprocess.run(["gpasswd", "-d", name, "imdsg-late"], capture_output=True, check=False)
    daemon.write_config("allow:\n  users: [root]\n  groups: [imdsg-late]\n")
    daemon.start()
    user = test_users[name]
    try:
        assert not daemon.topo.imds_get(user, CREDS, v2=True).ok
        subprocess.run(["usermod", "-a", "-G", "imdsg-late", name], check=True)
        deadline = time.monotonic() + scaled(5)
        while not daemon.topo.imds_get(user, CREDS, v2=True).ok:
            assert time.monotonic() < deadline, "group change not picked up within 5 s"
            time.sleep(0.2)
        assert daemon.wait_log("rules_restored")[0]["problems"]
    finally:
        subprocess.run(["gpasswd", "-d", name, "imdsg-late"], capture_output=True, check=False)


@pytest.mark.parametrize("backend", ["nftables"])
def test_thousand_users_apply_in_well_under_a_second(daemon: DaemonHandle) -> None:
    users = ", ".join(str(30000 + i) for i in range(1000))
    daemon.write_config(f"allow:\n  users: [{users}]\n")
    start = time.monotonic()
    assert daemon.cli("apply").returncode == 0
    assert time.monotonic() - start < scaled(1.0)
    listing = daemon.topo.run(
        daemon.topo.host,
        ["nft", "-j", "list", "set", "inet", "imdsguard_backstop", "allow_uids"],
        check=True,
    ).stdout
    assert len(json.loads(listing)["nftables"][1]["set"]["elem"]) == 1000


FINGERPRINTS = """
from imdsguard.firewall._xt_blob import TableReader
print(TableReader("ipv4").fingerprint().hex(), TableReader("ipv6").fingerprint().hex())
"""


@pytest.mark.parametrize("backend", ["iptables"])
def test_table_fingerprint_ignores_traffic_and_sees_every_edit(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    """The daemon skips parsing the x_tables rules while this fingerprint stays the same."""
    daemon.start()

    def fingerprints() -> list[str]:
        argv = [daemon.cli_argv()[0], "-c", FINGERPRINTS]
        return daemon.topo.run(daemon.topo.host, argv, check=True, env=daemon.env).stdout.split()

    before = fingerprints()
    denied = test_users["imdsg-denied"]
    for v6 in (False, True):  # counters move on both families' rules
        assert not daemon.topo.imds_get(denied, "/latest/meta-data/", v2=True, v6=v6).ok
        assert daemon.topo.imds_get(None, "/latest/meta-data/", v2=True, v6=v6).ok
    assert fingerprints() == before
    assert not [e for e in daemon.logs() if e["event"] == "fast_check_unavailable"]
    # An edit that keeps the blob's size (a uid swapped) changes it. Checked with
    # the daemon stopped (its rules stay), so it cannot repair first; that the
    # daemon repairs such an edit is test_protect's allowlist-uid-swapped case.
    assert daemon.stop() == 0
    stopped = fingerprints()
    swap = ["iptables-legacy", "-R", "IMDSGUARD", "1", "-m", "owner", "--uid-owner", "1"]
    daemon.topo.run(daemon.topo.host, [*swap, "-j", "RETURN"], check=True)
    changed = fingerprints()
    assert changed[0] != stopped[0] and changed[1] == stopped[1]


WITHOUT_FAST_CHECK = """
from imdsguard.config import parse_config
from imdsguard.firewall import _xt_blob, iptables
from imdsguard.policy import build_ruleset

class Refused(_xt_blob.TableReader):
    def __init__(self, family, table="filter"):
        raise PermissionError(1, "Operation not permitted")

_xt_blob.TableReader = Refused
backend = iptables.IptablesBackend()
ruleset = build_ruleset(parse_config("allow: {users: [root]}"))
print(backend.quick_check_problem())
backend.apply(ruleset)
print(sorted(str(i.state) for i in backend.inspect(ruleset).values()))
backend.remove()
print(sorted(str(i.state) for i in backend.inspect(ruleset).values()))
"""


def test_without_the_fast_check_rules_are_parsed_every_time(topo: Topology) -> None:
    """Where the raw table read is refused, inspection falls back to parsing: same answers."""
    proc = topo.run(topo.host, [sys.executable, "-c", WITHOUT_FAST_CHECK], check=True)
    problem, applied, removed = proc.stdout.splitlines()
    assert problem == "[Errno 1] Operation not permitted"
    assert applied == "['ok', 'ok']"
    assert removed == "['missing', 'missing']"
    assert proc.stderr == ""


#: Per backend: a tamper that opens IMDS to a denied user, and one that only
#: makes our rules differ (an allowed user lost: stricter, still guarded).
OPENING = {
    "iptables": ["iptables-legacy", "-I", "OUTPUT", "1", "-j", "ACCEPT"],
    "nftables": ["nft", "insert", "rule", "inet", "imdsguard_backstop", "guard", "accept"],
}
STRICTER = {
    "iptables": ["iptables-legacy", "-D", "IMDSGUARD", "-m", "owner", "--uid-owner", "{uid}",
                 "-j", "RETURN"],
    "nftables": ["nft", "delete", "element", "inet", "imdsguard_backstop", "allow_uids",
                 "{{ {uid} }}"],
}  # fmt: skip


def test_status_tells_a_hole_from_a_harmless_difference(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    """With nothing repairing (daemon stopped), status judges the kernel's rules as they are."""
    app, denied = test_users["imdsg-app"], test_users["imdsg-denied"]
    daemon.write_config(
        "endpoints: [169.254.169.254]\nendpoints_acknowledged: true\n"
        f"allow:\n  users: [root, {app.uid}]\n"
    )
    daemon.start()
    assert daemon.stop() == 0

    def status() -> tuple[int, dict[str, object]]:
        proc = daemon.cli("status", "--json")
        return proc.returncode, json.loads(proc.stdout)

    code, doc = status()
    # No IPv6 endpoint configured: that family is disabled, not missing.
    assert code == 1 and doc["rules"] == {"ipv4": "ok", "ipv6": "disabled"}, doc
    host = daemon.topo.host
    argv = [a.format(uid=app.uid) for a in STRICTER[daemon.backend]]
    daemon.topo.run(host, argv, check=True)
    assert daemon.topo.imds_get(app, CREDS, v2=True).rc != 0  # locked out: stricter
    code, doc = status()
    assert code == 1 and doc["state"] == "degraded", doc
    assert doc["rules"]["ipv4"] == "drifted", doc
    daemon.topo.run(host, OPENING[daemon.backend], check=True)
    assert daemon.topo.imds_get(denied, CREDS, v2=True).ok  # the hole is real
    code, doc = status()
    assert code == 2 and doc["state"] == "unprotected", doc
    assert doc["rules"]["ipv4"] == "missing", doc
    assert any("admit" in p for p in doc["problems"]), doc["problems"]  # type: ignore[attr-defined]


def test_an_allowed_connection_ends_cleanly_and_unlogged(daemon: DaemonHandle) -> None:
    """Its last packets (sent after curl closed the socket) belong to no process: they
    must still pass, or the connection ends in a reset and a bogus "blocked" event."""
    daemon.start()
    for v6 in (False, True):
        assert daemon.topo.imds_get(None, CREDS, v2=True, v6=v6).ok
    ss = ["ss", "-Htan", "state", "time-wait"]
    wait_for(
        lambda: len(daemon.topo.run(daemon.topo.host, ss, check=True).stdout.splitlines()) >= 4,
        5,
        "the four connections (token and credentials, per family) to close normally",
    )
    time.sleep(scaled(0.5))  # an event would be out by now
    blocked = [e for e in daemon.logs() if e.get("event") == "imds_access_blocked"]
    assert not blocked, blocked
