"""Container traffic: IMDS requests forwarded from a local bridge (as Docker's are)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets

import pytest

from imdsguard.domain import Capture
from imdsguard.firewall.nftables import NftablesBackend
from imdsguard_testing.netns import scaled
from tests.conftest import require_kernel
from tests.integration.conftest import DaemonHandle

pytestmark = pytest.mark.kernel

URL = "http://169.254.169.254/latest/meta-data/instance-id"


@pytest.mark.parametrize("mode", ["deny", "allow"])
def test_forwarded_container_traffic(daemon: DaemonHandle, mode: str) -> None:
    container = daemon.topo.add_container()
    daemon.write_config(f"containers: {mode}\nallow:\n  users: [root]\n")
    daemon.start()
    # Root inside the container: owner matching cannot apply to forwarded packets.
    result = daemon.topo.http(None, URL, ns=container, timeout=2)
    if mode == "deny":
        assert result.rc != 0, result
        assert result.elapsed < scaled(1.0), result  # rejected, not left to time out
    else:
        assert result.ok, result
    # The host's own allowlisted root is unaffected either way.
    assert daemon.topo.http(None, URL).ok


# nftables needs no position in FORWARD: our own table decides whatever others accept.
@pytest.mark.parametrize("backend", ["iptables"])
def test_docker_restart_pushing_our_forward_jump_down_is_repaired(daemon: DaemonHandle) -> None:
    container = daemon.topo.add_container()
    daemon.start()
    # What dockerd does on start: its own chain first in FORWARD, accepting bridge traffic.
    host = daemon.topo.host
    for argv in (
        ["iptables-legacy", "-N", "DOCKER-USER"],
        ["iptables-legacy", "-I", "FORWARD", "-j", "DOCKER-USER"],
        ["iptables-legacy", "-I", "FORWARD", "2", "-i", "docker0", "-j", "ACCEPT"],
    ):
        daemon.topo.run(host, argv, check=True)
    daemon.wait_log("rules_restored", timeout=2)
    assert daemon.topo.http(None, URL, ns=container, timeout=2).rc != 0


@pytest.mark.parametrize("backend", ["iptables"])
def test_docker_user_keeps_containers_out_while_docker_reorders_forward(
    daemon: DaemonHandle,
) -> None:
    container = daemon.topo.add_container()
    host = daemon.topo.host

    def ipt(*argv: str) -> str:
        return daemon.topo.run(host, ["iptables-legacy", *argv], check=True).stdout

    # dockerd's chains as it leaves them: DOCKER-USER first in FORWARD, then its own
    # chain, which accepts the bridge's traffic.
    ipt("-N", "DOCKER-USER")
    ipt("-A", "DOCKER-USER", "-j", "RETURN")
    ipt("-N", "DOCKER-FORWARD")
    ipt("-A", "DOCKER-FORWARD", "-i", "docker0", "-j", "ACCEPT")
    ipt("-A", "FORWARD", "-j", "DOCKER-USER")
    ipt("-A", "FORWARD", "-j", "DOCKER-FORWARD")
    daemon.start()
    first = ipt("-S", "DOCKER-USER").splitlines()[1]
    assert first == "-A DOCKER-USER -d 169.254.169.254/32 -j IMDSGUARD-FWD", first
    # Stopped, so nothing repairs what follows: a dockerd restart puts its jumps
    # back on top of FORWARD, above ours. DOCKER-USER still turns the container away.
    assert daemon.stop() == 0
    ipt("-D", "FORWARD", "-j", "DOCKER-USER")
    ipt("-D", "FORWARD", "-j", "DOCKER-FORWARD")
    ipt("-I", "FORWARD", "1", "-j", "DOCKER-FORWARD")
    ipt("-I", "FORWARD", "1", "-j", "DOCKER-USER")
    assert daemon.topo.http(None, URL, ns=container, timeout=2).rc != 0
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["rules"]["ipv4"] == "drifted", status  # guarded, not as laid out
    # Without our jump in DOCKER-USER, dockerd's ACCEPT comes first: open, and said so.
    ipt("-D", "DOCKER-USER", "-d", "169.254.169.254/32", "-j", "IMDSGUARD-FWD")
    assert daemon.topo.http(None, URL, ns=container, timeout=2).ok
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["state"] == "unprotected" and status["rules"]["ipv4"] == "missing", status
    # remove takes out what is ours, and leaves Docker's chain as Docker made it.
    daemon.start()
    assert daemon.stop() == 0
    assert daemon.cli("remove").returncode == 0
    assert ipt("-S", "DOCKER-USER").splitlines() == ["-N DOCKER-USER", "-A DOCKER-USER -j RETURN"]


def _docker_cgroup(cid: str) -> str:
    """Where Docker (cgroupfs driver) puts a container: unified v2, or v1's name=systemd."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # cgroup2 mounted unified
        return f"/sys/fs/cgroup/docker/{cid}"
    if os.path.isdir("/sys/fs/cgroup/systemd"):  # v1 or hybrid: name=systemd names the unit
        return f"/sys/fs/cgroup/systemd/docker/{cid}"
    pytest.fail("neither a unified cgroup2 nor a name=systemd hierarchy at /sys/fs/cgroup")


def test_container_attempt_is_logged_with_src_iface_and_container_id(
    daemon: DaemonHandle, workdir: str
) -> None:
    if daemon.backend == "nftables":  # events need the queue
        require_kernel(
            "nft_queue (CONFIG_NFT_QUEUE)",
            NftablesBackend().capabilities().capture == Capture.QUEUE,
        )
    container = daemon.topo.add_container()
    # A long-lived process in the "container", in a docker-shaped cgroup.
    cid = secrets.token_hex(32)  # 64 hex digits, like a docker id; unique to this run
    cgroup = _docker_cgroup(cid)
    os.makedirs(cgroup, exist_ok=True)
    sleeper = daemon.topo.popen(container, ["sleep", "30"])
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
            fh.write(str(sleeper.pid))
        daemon.start()
        assert daemon.topo.http(None, URL, ns=container, timeout=2).rc != 0
        (event,) = daemon.wait_log("imds_access_blocked")
        assert event["src"] == "198.51.100.2" and event["iface"] == "docker0"
        assert event["uid"] is None and event["pid"] is None and event["attributed"] is False
        assert event["container"] == cid
    finally:
        sleeper.kill()
        sleeper.wait()
        os.rmdir(cgroup)  # empty now that the sleeper is gone
        with contextlib.suppress(OSError):  # another test's container may still be there
            os.rmdir(os.path.dirname(cgroup))
