"""``imdsguard demo``: the guard end to end in throw-away network namespaces.

Builds the EC2-like topology of :mod:`imdsguard_testing.netns`, starts the simulated
IMDS and a real daemon with the broker, shows an allowed user served and a
denied user blocked (over IPv4 and IPv6), the broker serving a client whose
direct access is blocked, the attributed events, a tamper and its repair,
``status``, and that SIGTERM leaves the rules; then cleans everything up.
Nothing here touches the host's own firewall or its real IMDS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from imdsguard_testing.netns import Topology, User, ensure_broker_user, guard_env, wait_for

DEMO_USER = "nobody"
TAMPER = {"nftables": ["nft", "flush", "ruleset"], "iptables": ["iptables-legacy", "-F", "OUTPUT"]}
CREDS = "/latest/meta-data/iam/security-credentials/imdsguard-demo-role"


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo() -> int:
    """Run the demo; 0 when the guard behaved as it should."""
    work = tempfile.mkdtemp(prefix="imdsguard-demo-")
    os.chmod(work, 0o755)  # noqa: S103 - the demo's unprivileged client reads nothing here
    env = guard_env(work)
    config = os.path.join(work, "config.yaml")
    ok = True
    ensure_broker_user()  # what the packages' sysusers.d entry does on a real host
    try:
        with Topology(prefix="imdsg-demo") as topo:
            _say(f"== network namespaces {topo.host} (host) and {topo.vpc} (IMDS), like EC2")
            backend = _pick_backend(topo)
            with open(config, "w") as fh:
                fh.write(
                    f"firewall:\n  backend: {backend}\nallow:\n  users: [root]\n"
                    f"broker:\n  enabled: true\n  socket: {work}/run/broker.sock\n"
                    f"  clients: {{users: [{DEMO_USER}]}}\n"
                )
            topo.start_imds(work)
            _say("== simulated IMDS listening on 169.254.169.254 and [fd00:ec2::254]")
            log_path = os.path.join(work, "daemon.log")
            with open(log_path, "w") as log:
                daemon = topo.start_guard(config, env, log)
            _say(f"== imdsguard run (pid {daemon.pid}) is protecting the host namespace\n")
            ok &= _show(topo, "root (allowlisted)", None, expect_ok=True)
            nobody = User(65534, 65534)
            ok &= _show(topo, f"{DEMO_USER} (not allowlisted)", nobody, expect_ok=False)
            ok &= _show(topo, f"{DEMO_USER} over IPv6", nobody, expect_ok=False, v6=True)
            _say(f"\n== the broker: {DEMO_USER} is a broker client, so it gets credentials anyway")
            creds = topo.run(
                topo.host,
                [sys.executable, "-m", "imdsguard", "credentials", "-c", config],
                user=nobody,
                env=env,
            )
            if creds.returncode == 0:
                data = json.loads(creds.stdout)
                _say(
                    f"   ok  imdsguard credentials as {DEMO_USER}: Version {data['Version']}, "
                    f"AccessKeyId {data['AccessKeyId'][:8]}..., expires {data['Expiration']}"
                )
            elif "ermission denied" in creds.stderr:
                _say(f"   (skipped: {DEMO_USER} cannot run {sys.executable}: private checkout)")
            else:
                ok = False
                _say(f"   BAD imdsguard credentials as {DEMO_USER}: {creds.stderr.strip()}")
            _say("\n== imdsguard events: who tried (attributed while the packet was held)")
            events = topo.run(
                topo.host,
                [sys.executable, "-m", "imdsguard", "events", "-n", "2", "-c", config],
                env=env,
            )
            for line in events.stdout.splitlines():
                _say("   " + line)
            ok &= "BLOCKED" in events.stdout and f"({DEMO_USER})" in events.stdout
            tamper = TAMPER[backend]
            _say(f"\n== tampering: {' '.join(tamper)} (as a firewall reload would)")
            topo.run(topo.host, tamper, check=True)
            wait_for(lambda: "rules_restored" in _read(log_path), 5, "the repair", daemon)
            _say("   the daemon put the rules back:")
            for line in _read(log_path).splitlines():
                if "rules_restored" in line:
                    _say("   " + line)
            ok &= _show(topo, f"{DEMO_USER} again", nobody, expect_ok=False)
            _say("\n== imdsguard status")
            argv = [sys.executable, "-m", "imdsguard", "status", "-c", config]
            # The daemon publishes its state every 5 s (and on every change): the
            # broker's health, reported by its own process, may be a heartbeat away.
            for _ in range(25):
                status = topo.run(topo.host, argv, env=env)
                if status.returncode == 0:
                    break
                time.sleep(0.25)
            _say(status.stdout.rstrip())
            ok &= status.returncode == 0
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=15)
            _say("\n== daemon stopped with SIGTERM: rules stay in place (fail closed)")
            ok &= _show(topo, f"{DEMO_USER} after stop", nobody, expect_ok=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say("\n== cleaned up: namespaces and files removed")
    _say("demo result: " + ("OK" if ok else "UNEXPECTED BEHAVIOUR"))
    return 0 if ok else 1


def _pick_backend(topo: Topology) -> str:
    """nftables where the host uses it and the kernel can queue; else iptables.

    Attribution hands packets to the daemon through a queue; nftables needs
    CONFIG_NFT_QUEUE for that. The demo wants to show attribution, so on a
    kernel without it, it uses the iptables backend (in its throw-away namespace).
    """
    probe = (
        "from imdsguard.firewall.detect import choose\n"
        "from imdsguard.firewall.nftables import NftablesBackend\n"
        "b = choose('auto')\n"
        "queue = NftablesBackend().capabilities().capture == 'queue'\n"
        "print('iptables' if b == 'nftables' and not queue else b)\n"
    )
    chosen = topo.run(topo.host, [sys.executable, "-c", probe], check=True).stdout.strip()
    if chosen == "iptables":
        _say("   (no nft_queue in this kernel: the demo shows attribution on the iptables backend)")
    return chosen


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _show(topo: Topology, who: str, user: User | None, *, expect_ok: bool, v6: bool = False) -> Any:
    result = topo.imds_get(user, CREDS, v2=True, v6=v6)
    if result.ok:
        what = f"served credentials (AccessKeyId {result.json()['AccessKeyId'][:8]}...)"
    else:
        what = f"BLOCKED in {result.elapsed * 1000:.0f} ms ({result.stderr or result.status})"
    good = result.ok == expect_ok
    _say(f"   {'ok ' if good else 'BAD'} {who:<28} IMDSv2 {'[v6]' if v6 else '[v4]'}: {what}")
    return good


if __name__ == "__main__":  # ``make demo``: python -m imdsguard_testing.demo
    import sys

    from imdsguard.cli import main

    sys.exit(main(["demo"]))
