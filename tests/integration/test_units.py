"""allow.units on the real kernel, both backends: a unit's processes are served, root outside
it is refused, and a unit that starts later or restarts (a new cgroup) is served again.

A "unit" here is a cgroup v2 directory the test makes itself
(``imdsgtest.slice/agent-<pid>.service``), as systemd would; processes join
it through ``cgroup.procs``. This VM mounts cgroups hybrid, so the daemon
runs in a private mount namespace with the cgroup2 hierarchy mounted at
/sys/fs/cgroup (the same hierarchy as /sys/fs/cgroup/unified: same cgroups,
same ids); on a unified host (the stock-kernel VM) that is a no-op. Every
command goes into HOST with ``nsenter --net``: ``ip netns exec`` remounts
/sys, where nft then cannot look the path up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imdsguard_testing.netns import IMDS_V4, Topology, scaled, wait_for

from .conftest import DaemonHandle

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

#: From a unit's new cgroup appearing to its first connection served (measured: see README).
SERVED_WITHIN = scaled(2.0)

#: Connects to IMDS until one succeeds or the deadline passes; prints JSON with how long
#: after argv[2] (CLOCK_MONOTONIC, shared by all processes) the first success came.
CLIENT = f"""
import json, socket, sys, time
cg, since, until = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
if cg:
    open(cg + "/cgroup.procs", "w").write("0")  # this process joins the unit
tries, outcome = 0, "refused"
while time.monotonic() < until:
    tries += 1
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect(({IMDS_V4!r}, 80))
        outcome = "connected"
        break
    except OSError:
        time.sleep(0.005)
    finally:
        s.close()
print(json.dumps({{"outcome": outcome, "after": time.monotonic() - since, "tries": tries}}))
"""


def _cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            if " - cgroup2 " in line:
                return line.split()[4]
    return None


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 hierarchy on this host")
    slice_dir = Path(mount) / "imdsgtest.slice"
    slice_dir.mkdir(exist_ok=True)
    yield Path(mount)
    for child in slice_dir.glob(f"agent-{os.getpid()}*.service"):
        _rmdir(child)


def _rmdir(path: Path) -> None:
    """Remove a cgroup once the kernel has let its last process go."""
    deadline = time.monotonic() + 5
    while path.exists():
        try:
            path.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _start(daemon: DaemonHandle) -> None:
    """The daemon in its own mount namespace with cgroup2 at /sys/fs/cgroup, in HOST."""
    topo: Topology = daemon.topo
    topo.check(topo.host)
    daemon.log_path = os.path.join(daemon.workdir, f"daemon-{time.monotonic_ns()}.log")
    state = os.path.join(daemon.env["IMDSGUARD_RUN_DIR"], "state.json")
    script = (
        "grep -q ' /sys/fs/cgroup .* - cgroup2 ' /proc/self/mountinfo || "
        "mount -t cgroup2 none /sys/fs/cgroup; "
        f'exec "{sys.executable}" -m imdsguard run -c "{daemon.config_path}"'
    )
    daemon.proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{topo.host}", "unshare", "-m", "--propagation",
         "private", "sh", "-c", script],
        env=daemon.env,
        stdout=open(daemon.log_path, "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for(lambda: os.path.exists(state), 15, "the daemon to be ready", daemon.proc)


def _client(daemon: DaemonHandle, cgroup: Path | None, since: float, wait: float) -> dict:
    topo: Topology = daemon.topo
    topo.check(topo.host)
    argv = [
        "nsenter", f"--net=/run/netns/{topo.host}", sys.executable, "-c", CLIENT,
        str(cgroup or ""), repr(since), repr(time.monotonic() + wait),
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=wait + 30, check=True)
    return dict(json.loads(out.stdout))


def _state(daemon: DaemonHandle) -> dict:
    with open(os.path.join(daemon.env["IMDSGUARD_RUN_DIR"], "state.json")) as fh:
        return dict(json.load(fh))


def test_unit_served_root_outside_refused_and_restart_served_again(
    daemon: DaemonHandle, cgroup_root: Path
) -> None:
    unit = f"agent-{os.getpid()}.service"
    cgroup = cgroup_root / "imdsgtest.slice" / unit
    daemon.write_config(f"allow:\n  users: []\n  units: [{unit}]\n")
    _start(daemon)  # the unit is not running yet: no cgroup, no rule
    assert _state(daemon)["units"] == {unit: None}
    assert _client(daemon, None, time.monotonic(), 0)["outcome"] == "refused"

    figures = []
    for round_ in ("start", "restart", "restart"):
        since = time.monotonic()
        cgroup.mkdir()  # what systemd does when the unit starts
        served = _client(daemon, cgroup, since, SERVED_WITHIN + 3)
        assert served["outcome"] == "connected", (round_, served, daemon.logs()[-5:])
        figures.append(served["after"])
        # Root outside the unit is refused meanwhile (allow.users: []).
        assert _client(daemon, None, time.monotonic(), 0)["outcome"] == "refused"
        _rmdir(cgroup)  # the unit stops: its cgroup goes
    print(f"unit cgroup created -> first connection served, s: {figures}")
    assert max(figures) < SERVED_WITHIN, figures
    wait_for(lambda: _state(daemon)["units"] == {unit: None}, 5, "the stop to be seen")
    changed = [e for e in daemon.logs() if e.get("event") == "units_changed"]
    print([(e["started"], e["not_running"], e["apply_ms"]) for e in changed])
    assert changed[-1]["not_running"] == [unit]
    assert any(e["started"] == [unit] for e in changed)
    # The stopped unit's rule is gone (and it was loaded from the path the unit had).
    assert _state(daemon)["units"] == {unit: None}
    text = daemon.ruleset_text()
    assert unit not in text
    assert daemon.stop() == 0


def test_units_without_cgroup2_at_sys_fs_cgroup_keep_the_old_policy(daemon: DaemonHandle) -> None:
    """``ip netns exec`` gives the daemon a fresh /sys with nothing at /sys/fs/cgroup: like a
    hybrid host, a config naming units is refused on SIGHUP, and the old rules stay."""
    daemon.start()
    before = daemon.ruleset_text()
    daemon.write_config("allow:\n  users: []\n  units: [amazon-ssm-agent.service]\n")
    daemon.signal(signal.SIGHUP)
    failed = daemon.wait_log("config_reload_failed")[-1]
    assert "allow.units" in failed["error"] and "cgroup v2" in failed["error"], failed
    assert failed["kept"] == "previous policy"
    assert daemon.ruleset_text() == before
    checked = daemon.cli("check-config")
    assert checked.returncode == 2 and "allow.units" in checked.stderr, checked
    assert daemon.stop() == 0
