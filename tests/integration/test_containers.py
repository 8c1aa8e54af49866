"""Container traffic: IMDS requests forwarded from a local bridge (as Docker's are)."""

from __future__ import annotations

import pytest

from tests.integration.conftest import DaemonHandle

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
        assert result.elapsed < 1.0, result  # rejected, not left to time out
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
