"""``imdsguard demo``: the guard end to end in throw-away network namespaces.

Builds the EC2-like topology of :mod:`imdsguard.netns`, starts the simulated
IMDS and a real daemon, shows an allowed user served and a denied user
blocked (over IPv4 and IPv6), prints ``status`` and cleans everything up.
Nothing here touches the host's own firewall or its real IMDS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from imdsguard.netns import Topology, User, wait_for

DEMO_USER = "nobody"
TAMPER = {"nftables": ["nft", "flush", "ruleset"], "iptables": ["iptables-legacy", "-F", "OUTPUT"]}
CREDS = "/latest/meta-data/iam/security-credentials/imdsguard-demo-role"


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo() -> int:
    """Run the demo; 0 when the guard behaved as it should."""
    work = tempfile.mkdtemp(prefix="imdsguard-demo-")
    os.chmod(work, 0o755)  # noqa: S103 - the demo's unprivileged client reads nothing here
    env = dict(os.environ)
    for key in ("run", "state", "log"):
        env[f"IMDSGUARD_{key.upper()}_DIR"] = os.path.join(work, key)
    config = os.path.join(work, "config.yaml")
    with open(config, "w") as fh:
        fh.write("# demo: only root may reach IMDS directly\nallow:\n  users: [root]\n")
    ok = True
    try:
        with Topology(prefix="imdsg-demo") as topo:
            _say(f"== network namespaces {topo.host} (host) and {topo.vpc} (IMDS), like EC2")
            topo.start_imds(work)
            _say("== simulated IMDS listening on 169.254.169.254 and [fd00:ec2::254]")
            log_path = os.path.join(work, "daemon.log")
            with open(log_path, "w") as log:
                daemon = topo.popen(
                    topo.host,
                    [sys.executable, "-m", "imdsguard", "run", "-c", config],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            state = os.path.join(env["IMDSGUARD_RUN_DIR"], "state.json")
            wait_for(lambda: os.path.exists(state), 15, "the daemon", daemon)
            _say(f"== imdsguard run (pid {daemon.pid}) is protecting the host namespace\n")
            ok &= _show(topo, "root (allowlisted)", None, expect_ok=True)
            nobody = User(65534, 65534)
            ok &= _show(topo, f"{DEMO_USER} (not allowlisted)", nobody, expect_ok=False)
            ok &= _show(topo, f"{DEMO_USER} over IPv6", nobody, expect_ok=False, v6=True)
            backend = json.loads(_read(state))["backend"]
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
            status = topo.run(
                topo.host, [sys.executable, "-m", "imdsguard", "status", "-c", config], env=env
            )
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
