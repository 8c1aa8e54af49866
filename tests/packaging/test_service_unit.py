"""systemd/imdsguard.service: what systemd thinks of it, offline.

The unit's behaviour under a real systemd (ordering, READY, restart without a
gap, the sandbox leaving the daemon working) is proven in tests/system.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import rpmpkg

UNIT = rpmpkg.REPO / "systemd" / "imdsguard.service"
BROKER_UNIT = rpmpkg.REPO / "systemd" / "imdsguard-broker.service"
MAX_EXPOSURE = 2.5
#: The broker, which parses what any local user sends: lower than the daemon's
#: (1.2 measured with systemd 252).
MAX_BROKER_EXPOSURE = 1.5
#: CAP_DAC_READ_SEARCH (2), CAP_NET_ADMIN (12), CAP_NET_RAW (13), CAP_SYS_PTRACE (19)
CAPABILITIES = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return tool


def _directives(unit: Path = UNIT) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (a key may repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def _exposure(unit: Path, limit: float) -> tuple[float, str, subprocess.CompletedProcess[str]]:
    tool = _analyze()
    usage = subprocess.run([tool, "--help"], capture_output=True, text=True, check=False).stdout
    if "--offline" not in usage:
        pytest.skip("this systemd-analyze has no --offline security review (systemd < 250)")
    proc = subprocess.run(
        # --threshold is on the 0-100 scale the 0-10 figure is printed from.
        [tool, "security", "--offline=true", f"--threshold={limit * 10:.0f}", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    name = re.escape(unit.name)
    found = re.search(rf"Overall exposure level for {name}: ([\d.]+) (\S+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return float(found.group(1)), found.group(2), proc


def test_exposure_score() -> None:
    score, word, proc = _exposure(UNIT, MAX_EXPOSURE)
    rpmpkg.FIGURES["exposure"] = (
        f"systemd-analyze security imdsguard.service: {score} {word} (target <= {MAX_EXPOSURE})"
    )
    print(rpmpkg.FIGURES["exposure"])
    assert proc.stderr == "", proc.stderr  # no unknown or misplaced directive
    assert score <= MAX_EXPOSURE
    assert proc.returncode == 0, "systemd-analyze says the exposure is over the threshold"


def test_broker_unit_exposure_is_lower() -> None:
    score, word, proc = _exposure(BROKER_UNIT, MAX_BROKER_EXPOSURE)
    daemon, _, _ = _exposure(UNIT, MAX_EXPOSURE)
    rpmpkg.FIGURES["broker_exposure"] = (
        f"systemd-analyze security imdsguard-broker.service: {score} {word} "
        f"(target <= {MAX_BROKER_EXPOSURE}; the daemon's {daemon})"
    )
    print(rpmpkg.FIGURES["broker_exposure"])
    assert proc.stderr == "", proc.stderr
    assert score <= MAX_BROKER_EXPOSURE and score < daemon
    assert proc.returncode == 0


def test_broker_unit_is_unprivileged_and_tied_to_the_daemon() -> None:
    d = _directives(BROKER_UNIT)
    assert d["Service.User"] == ["imdsguard-broker"]
    assert d["Service.CapabilityBoundingSet"] == [""]
    assert d["Service.NoNewPrivileges"] == ["yes"]
    assert d["Service.ProtectProc"] == ["invisible"]  # it reads no other process
    assert d["Service.ExecStart"] == ["/usr/bin/imdsguard broker-serve"]
    assert d["Unit.PartOf"] == ["imdsguard.service"]
    assert "imdsguard.service" in " ".join(d["Unit.After"]).split()
    daemon = _directives()
    assert "imdsguard-broker.service" in " ".join(daemon["Unit.Wants"]).split()
    assert "IMDSGUARD_BROKER_UNIT=imdsguard-broker.service" in daemon["Service.Environment"]
    sysusers = (rpmpkg.REPO / "packaging" / "imdsguard.sysusers.conf").read_text()
    assert [ln.split()[:2] for ln in sysusers.splitlines() if ln and ln[0] != "#"] == [
        ["u", "imdsguard-broker"]
    ]


def test_verify(payload: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` of the packaged unit, in a root holding its commands."""
    tool = _analyze()
    root = tmp_path / "root"
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy(payload / "usr/lib/systemd/system/imdsguard.service", units)
    shutil.copy(payload / "usr/lib/systemd/system/imdsguard-broker.service", units)
    # The broker's unit has the default dependencies: the OS's own targets.
    for target in ("sysinit.target", "basic.target", "shutdown.target"):
        host = Path("/usr/lib/systemd/system") / target
        if host.exists():
            shutil.copy(host, units)
    shutil.copy(payload / "usr/bin/imdsguard", root / "usr/bin/imdsguard")
    kill = shutil.which("kill", path="/usr/bin:/bin")
    if kill is None:  # only its presence matters to verify
        (root / "usr/bin/kill").write_text("#!/bin/sh\n")
        (root / "usr/bin/kill").chmod(0o755)
    else:
        shutil.copy(kill, root / "usr/bin/kill")
    proc = subprocess.run(
        [
            tool,
            f"--root={root}",
            "verify",
            "--man=no",
            "imdsguard.service",
            "imdsguard-broker.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even after warnings such as an unknown key: none allowed.
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr
    assert (payload / "usr/lib/systemd/system/imdsguard.service").read_text() == UNIT.read_text()
    broker = payload / "usr/lib/systemd/system/imdsguard-broker.service"
    assert broker.read_text() == BROKER_UNIT.read_text()
    assert (payload / "usr/lib/sysusers.d/imdsguard.conf").exists()


def test_ordering_and_lifecycle() -> None:
    d = _directives()
    # In place before any interface comes up or any workload starts...
    assert d["Unit.DefaultDependencies"] == ["no"]
    assert "network-pre.target" in " ".join(d["Unit.Before"]).split()
    assert "network-pre.target" in " ".join(d["Unit.Wants"]).split()
    assert "local-fs.target" in " ".join(d["Unit.After"]).split()
    # ...after the host's firewall services (we write last at boot), requiring none.
    after = " ".join(d["Unit.After"]).split()
    for service in ("nftables", "firewalld", "iptables", "ip6tables"):
        assert f"{service}.service" in after
        assert not [
            v for k in ("Unit.Requires", "Unit.Wants") for v in d.get(k, []) if service in v
        ]
    # ...and never waiting for the network.
    assert not [v for values in d.values() for v in values if "network-online" in v]
    assert d["Service.Type"] == ["notify"]
    assert d["Service.ExecStart"] == ["/usr/bin/imdsguard run"]
    assert d["Service.ExecReload"] == ["/usr/bin/kill -HUP $MAINPID"]
    assert d["Service.Restart"] == ["always"]
    for key in ("RuntimeDirectory", "StateDirectory", "LogsDirectory"):
        assert d[f"Service.{key}"] == ["imdsguard"]


def test_capabilities_are_what_the_daemon_uses() -> None:
    d = _directives()
    assert set(" ".join(d["Service.CapabilityBoundingSet"]).split()) == CAPABILITIES
    assert "Service.AmbientCapabilities" not in d  # runs as root: nothing to raise
    # It must see every user's processes (attribution) and reach IMDS.
    assert d["Service.ProtectProc"] != ["invisible"]
    allowed = " ".join(d["Service.IPAddressAllow"]).split()
    assert {"169.254.169.254", "fd00:ec2::254", "localhost"} <= set(allowed)


def test_fd_limit_is_set_above_every_connection_cap() -> None:
    """systemd's default soft limit (1024) let ~1,000 idle metrics connections kill the daemon."""
    from imdsguard import metrics
    from imdsguard.config import BrokerLimits

    (limit,) = _directives()["Service.LimitNOFILE"]
    soft, _, hard = limit.partition(":")
    assert int(soft) == int(hard or soft)  # one number: soft and hard alike
    caps = BrokerLimits().max_connections + metrics.MAX_CONNECTIONS
    assert int(soft) >= 4 * caps, (limit, caps)
