"""The .deb, installed for real: apt-get install, upgrade and purge under systemd.

A Debian 12 rootfs that holds the deb's Depends (cached, see conftest.py)
boots with systemd-nspawn in the EC2-like topology (the same
:class:`test_nspawn.Container`); the package then goes in with
``apt-get install ./imdsguard_<v>-1_all.deb``, which resolves its
dependencies against what is installed (no network in there: a missing or
misnamed dependency fails the install). Its own maintainer scripts enable
and start the service. The tests share one boot and run in file order:
install, the installed daemon at work (nftables, then iptables through
Debian's python3-iptables), an upgrade to a higher revision while a denied
user hammers IMDS, then purge, after which no rule and no file of ours may
be left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import debpkg
import pytest
from test_nspawn import PROBE, PROBE_CODE, ROOT_GET, Container, boot_container

from imdsguard_testing.netns import wait_for

pytestmark = pytest.mark.integration

DEBS = "/root/imdsguard-debs"
#: Paths the probe and the copied packages live under (the test's, not the package's).
OURS_FOR_THE_TEST = ("/usr/local/lib/imdsguard-test", DEBS)


class Installed:
    """The booted container plus what the tests learn along the way."""

    def __init__(self, container: Container, first: Path, second: Path) -> None:
        self.c = container
        self.first = first
        self.second = second
        self.files = sorted(debpkg.contents(first))

    def apt(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.c.run(
            ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", *args], timeout=300
        )


@pytest.fixture(scope="module")
def booted_deb(
    deb_rootfs_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    work = tmp_path_factory.mktemp("nspawn-deb")
    first = debpkg.build_deb()
    second = debpkg.build_deb(revision=2, out=work / "second")

    def prepare(rootfs: Path) -> None:
        subprocess.run(
            ["cp", "-a", "--reflink=auto", str(deb_rootfs_cache), str(rootfs)], check=True
        )
        probe = rootfs / PROBE.lstrip("/")
        probe.parent.mkdir(parents=True)
        probe.write_text(PROBE_CODE)
        debs = rootfs / DEBS.lstrip("/")
        debs.mkdir(parents=True)
        for deb in (first, second):
            shutil.copy(deb, debs / deb.name)

    with boot_container(work, "imdsgdeb", prepare) as container:
        yield Installed(container, first, second)


def _status(c: Container) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(c.run(["imdsguard", "status", "--json"]).stdout)
    return doc


def test_apt_installs_it_and_it_protects(booted_deb: Installed) -> None:
    c = booted_deb.c
    assert c.run(["dpkg", "-s", "imdsguard"]).returncode != 0  # not there before
    installed = booted_deb.apt("install", f"{DEBS}/{booted_deb.first.name}")
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert (
        "Version: " + debpkg.field(booted_deb.first, "Version")
        in c.run(["dpkg", "-s", "imdsguard"], check=True).stdout
    )
    # The postinst enabled and started it; it put its rules in before READY.
    assert c.show("imdsguard.service", "ActiveState") == "active", c.console()
    assert c.run(["systemctl", "is-enabled", "imdsguard.service"]).stdout.strip() == "enabled"
    wait_for(lambda: _status(c)["state"] == "protected", 20, "status to say protected")
    assert c.run(["imdsguard", "status"]).returncode == 0
    assert c.probe_once() == "refused"
    served = c.run(["python3", "-c", ROOT_GET])
    assert served.stdout.strip() == "200", served.stderr  # root is allowed by default
    # The broker's own user, and the byte-compiled code (py3compile).
    assert c.run(["getent", "passwd", "imdsguard-broker"]).returncode == 0
    pyc = c.sh("ls /usr/lib/python3/dist-packages/imdsguard/__pycache__ | wc -l").stdout
    assert int(pyc) > 10
    assert c.run(["test", "-f", "/usr/share/man/man1/imdsguard.1.gz"]).returncode == 0


def test_the_installed_daemon_logs_and_uses_debians_iptables_binding(
    booted_deb: Installed,
) -> None:
    """Events as the deb's daemon writes them; then the iptables backend through Debian's
    python3-iptables (the RPM bundles its own)."""
    c = booted_deb.c
    events = c.daemon_events()  # every line JSON
    assert [e["event"] for e in events][:4] == [
        "daemon_starting",
        "capture_started",
        "rules_applied",
        "daemon_ready",
    ]
    c.write_config("firewall:\n  backend: iptables\n")
    c.reload()
    reloaded = [e for e in c.daemon_events() if e["event"].startswith("config_reload")]
    assert reloaded[-1]["event"] == "config_reloaded", reloaded
    assert "-j NFQUEUE" in c.run(["iptables-legacy", "-S", "IMDSGUARD"], check=True).stdout
    assert c.probe_once() == "refused"
    event = c.blocked_event()
    assert event["attributed"] is True and event["user"] == "nobody"
    assert event["cmdline"][1:3] == [PROBE, "once"]
    assert c.run(["imdsguard", "status"]).returncode == 0


def test_upgrade_restarts_it_without_a_gap(booted_deb: Installed) -> None:
    c = booted_deb.c
    before = c.main_pid()
    with c.probe_loop() as counts:
        upgraded = booted_deb.apt("install", f"{DEBS}/{booted_deb.second.name}")
    assert upgraded.returncode == 0, upgraded.stdout[-3000:] + upgraded.stderr[-3000:]
    version = debpkg.field(booted_deb.second, "Version")
    assert f"Version: {version}" in c.run(["dpkg", "-s", "imdsguard"], check=True).stdout
    after = c.main_pid()
    assert after not in (0, before), "the upgrade did not restart the daemon"
    print(f"denied probe during the upgrade: {counts}")
    assert not [k for k in counts if k.endswith(":connected")], counts
    for family in ("ipv4", "ipv6"):
        assert sum(n for k, n in counts.items() if k.startswith(family)) >= 20, counts
    # The admin's config (a conffile) survived the upgrade.
    assert "backend: iptables" in c.sh("cat /etc/imdsguard/config.yaml").stdout
    wait_for(lambda: _status(c)["state"] == "protected", 20, "status to say protected")


def test_purge_leaves_no_rule_and_no_file(booted_deb: Installed) -> None:
    c = booted_deb.c
    purged = booted_deb.apt("purge", "imdsguard")
    assert purged.returncode == 0, purged.stdout[-3000:] + purged.stderr[-3000:]
    assert c.run(["dpkg", "-s", "imdsguard"]).returncode != 0
    assert c.show("imdsguard.service", "ActiveState") == "inactive"
    # No rule in either backend, either family.
    assert "imdsguard" not in c.run(["nft", "list", "ruleset"], check=True).stdout
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        assert "IMDSGUARD" not in c.run([tool, "-S"], check=True).stdout
    # No file: neither the package's nor what it or its daemon made.
    left = [f for f in booted_deb.files if c.run(["test", "-e", f]).returncode == 0]
    ours = [f for f in left if "imdsguard" in f]
    assert not ours, ours
    prune = " -o ".join(f"-path {p}" for p in ("/proc", "/sys", "/dev", *OURS_FOR_THE_TEST))
    found = c.sh(f"find / -xdev \\( {prune} \\) -prune -o -name '*imdsguard*' -print").stdout
    assert not found.split(), found
    assert c.run(["test", "-e", "/run/imdsguard"]).returncode != 0  # /run: another file system
    # The positive control: with the package gone, the same probe gets through.
    assert c.probe_once() == "connected"
