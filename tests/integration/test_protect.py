"""End to end against the real kernel: who reaches IMDS, drift repair, reload, kill -9, remove."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from imdsguard.firewall.nftables import BACKSTOP
from imdsguard_testing.netns import Topology, User, scaled, wait_for
from tests.integration.conftest import DaemonHandle

CREDS = "/latest/meta-data/iam/security-credentials/imdsguard-demo-role"
ALLOW_ALL_KINDS = """\
allow:
  users: [imdsg-app, {byuid}]
  groups: [imdsg-readers]
"""


def _save(daemon: DaemonHandle) -> str:
    return daemon.ruleset_text()


def _ours_in(text: str) -> bool:
    return "-A IMDSGUARD" in text or "table inet imdsguard" in text


def _denied(topo: Topology, user: User | None, v6: bool = False) -> bool:
    result = topo.imds_get(user, "/latest/meta-data/instance-id", v2=False, v6=v6)
    return result.rc != 0


@pytest.mark.parametrize("v2", [True, False], ids=["imdsv2", "imdsv1"])
def test_allowlisted_users_get_credentials(
    daemon: DaemonHandle, test_users: dict[str, User], v2: bool
) -> None:
    daemon.write_config(ALLOW_ALL_KINDS.format(byuid=test_users["imdsg-byuid"].uid))
    daemon.start()
    for name in ("imdsg-app", "imdsg-byuid", "imdsg-member"):
        for v6 in (False, True):
            result = daemon.topo.imds_get(test_users[name], CREDS, v2=v2, v6=v6)
            assert result.ok, (name, v6, result)
            assert result.json()["Code"] == "Success"


def test_denied_user_fails_fast_with_reject(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    daemon.start()
    for v6 in (False, True):
        result = daemon.topo.imds_get(test_users["imdsg-denied"], CREDS, v2=True, v6=v6)
        assert result.rc == 7, result  # curl: couldn't connect (TCP reset)
        assert result.elapsed < scaled(0.1 + 0.05), result  # reject: at once (plus process start)
    member = test_users["imdsg-member"]
    no_groups = User(member.uid, member.gid, ())
    daemon.write_config("allow:\n  groups: [imdsg-readers]\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("config_reloaded")
    assert daemon.topo.imds_get(member, CREDS, v2=True).ok
    if daemon.backend == "iptables":
        # xt_owner --suppl-groups checks the socket's credentials: the same user
        # running without the group is denied. nftables can only match uids, so
        # there membership comes from /etc/group (expanded to member uids).
        assert _denied(daemon.topo, no_groups)
    else:
        assert not _denied(daemon.topo, no_groups)


def test_drop_action_times_out(daemon: DaemonHandle, test_users: dict[str, User]) -> None:
    daemon.write_config("action: drop\n")
    daemon.start()
    result = daemon.topo.http(
        test_users["imdsg-denied"], "http://169.254.169.254/latest/meta-data/", timeout=1
    )
    assert result.rc == 28, result  # operation timed out: packets silently dropped


def test_root_is_denied_unless_listed(daemon: DaemonHandle, test_users: dict[str, User]) -> None:
    daemon.write_config("allow:\n  users: [imdsg-app]\n")
    daemon.start()
    assert _denied(daemon.topo, None)
    assert _denied(daemon.topo, None, v6=True)
    assert daemon.topo.imds_get(test_users["imdsg-app"], CREDS, v2=True).ok


SWAP_TO_NOBODY = ["-m", "owner", "--uid-owner", "65534", "-j", "RETURN"]
TAMPERS = {
    "iptables": {
        "flush-output": [["iptables-legacy", "-F", "OUTPUT"]],
        "flush-our-chain": [["iptables-legacy", "-F", "IMDSGUARD"]],
        # One commit (as three commands, the daemon can put the jump back between them
        # and -X then fails: our chain is referenced again).
        "delete-our-chain": [
            [
                "sh",
                "-c",
                "printf '*filter\\n-D OUTPUT -d 169.254.169.254/32 -j IMDSGUARD\\n"
                "-F IMDSGUARD\\n-X IMDSGUARD\\nCOMMIT\\n' | iptables-legacy-restore --noflush",
            ]
        ],
        "accept-inserted-first": [["iptables-legacy", "-I", "OUTPUT", "-j", "ACCEPT"]],
        # Flush and delete every chain in one step (iptables-restore of an empty
        # table): as `-F` then `-X`, the daemon can put its jumps back in between.
        "whole-table-flush": [
            ["sh", "-c", "printf '*filter\\nCOMMIT\\n' | iptables-legacy-restore"]
        ],
        "ipv6-flush": [["ip6tables-legacy", "-F"]],
        # Same-size edits: the table's blob keeps its length, only a uid changes
        # (the daemon skips parsing while the blob is unchanged; this must not).
        "allowlist-uid-swapped": [
            ["iptables-legacy", "-R", "IMDSGUARD", "1", *SWAP_TO_NOBODY],
        ],
        "ipv6-allowlist-uid-swapped": [
            ["ip6tables-legacy", "-R", "IMDSGUARD", "1", *SWAP_TO_NOBODY],
        ],
    },
    # Our own table is owned by the daemon (test_owned_table_refuses_other_processes);
    # what others can change is the backstop, which the daemon puts back.
    "nftables": {
        "flush-ruleset": [["nft", "flush", "ruleset"]],  # what a firewalld reload does
        "flush-backstop-chain": [["nft", "flush", "chain", "inet", BACKSTOP, "guard"]],
        "delete-backstop-table": [["nft", "delete", "table", "inet", BACKSTOP]],
        "delete-backstop-output-hook": [["nft", "delete", "chain", "inet", BACKSTOP, "output"]],
        "backstop-allow-set-edited": [
            ["nft", "add", "element", "inet", BACKSTOP, "allow_uids", "{ 65534 }"]
        ],
    },
}
TAMPER_CASES = [(b, t) for b in sorted(TAMPERS) for t in sorted(TAMPERS[b])]


@pytest.mark.parametrize(
    ("backend", "tamper"), TAMPER_CASES, ids=[f"{b}-{t}" for b, t in TAMPER_CASES]
)
def test_daemon_repairs_drift(
    daemon: DaemonHandle, test_users: dict[str, User], tamper: str
) -> None:
    daemon.start()
    for argv in TAMPERS[daemon.backend][tamper]:
        daemon.topo.run(daemon.topo.host, argv, check=True)
    start = time.monotonic()
    repaired = daemon.wait_log("rules_restored", timeout=2)
    # nftables notifies us of changes; x_tables is polled every 0.25 s.
    assert time.monotonic() - start < scaled(0.3 if daemon.backend == "nftables" else 1.0)
    assert repaired[0]["problems"], repaired
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["rules"] == {"ipv4": "ok", "ipv6": "ok"}, status
    assert _denied(daemon.topo, test_users["imdsg-denied"])
    assert _denied(daemon.topo, test_users["imdsg-denied"], v6=True)
    if tamper == "accept-inserted-first":
        # The other tool's rule stays; ours is first again.
        save = _save(daemon)
        assert "-A OUTPUT -j ACCEPT" in save
        first = next(line for line in save.splitlines() if line.startswith("-A OUTPUT"))
        assert "IMDSGUARD" in first


@pytest.mark.parametrize("backend", ["nftables"])
def test_other_tools_accepting_first_do_not_open_imds(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    """Docker-style insertions and iptables-restore without our rules leave IMDS closed."""
    daemon.start()
    topo = daemon.topo
    denied = test_users["imdsg-denied"]
    steps = [
        ["iptables-nft", "-I", "OUTPUT", "-j", "ACCEPT"],
        ["iptables-nft", "-N", "DOCKER-USER"],
        ["iptables-nft", "-I", "FORWARD", "-j", "DOCKER-USER"],
        ["ip6tables-nft", "-I", "OUTPUT", "-j", "ACCEPT"],
    ]
    for argv in steps:
        topo.run(topo.host, argv, check=True)
        assert _denied(topo, denied) and _denied(topo, denied, v6=True), argv
    restore = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
    restore += "-A OUTPUT -j ACCEPT\nCOMMIT\n"
    topo.run(topo.host, ["iptables-nft-restore"], input=restore, check=True)
    assert _denied(topo, denied)
    assert not [e for e in daemon.logs() if e.get("event") == "rules_restored"]
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["state"] == "protected", status


def test_bad_config_on_sighup_keeps_old_rules(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    daemon.write_config("allow:\n  users: [imdsg-app]\n")
    daemon.start()
    before = _save(daemon)
    daemon.write_config("allow:\n  users: [imdsg-app, no-such-user]\n")
    daemon.signal(signal.SIGHUP)
    failed = daemon.wait_log("config_reload_failed")
    assert "no-such-user" in failed[0]["error"] and ":4: allow.users[1]" in failed[0]["error"]
    assert _save(daemon) == before
    assert daemon.topo.imds_get(test_users["imdsg-app"], CREDS, v2=True).ok
    assert _denied(daemon.topo, test_users["imdsg-denied"])
    assert daemon.proc is not None and daemon.proc.poll() is None


@pytest.mark.parametrize("failure", ["broker-socket-unbindable", "firewall-lock-held"])
def test_sighup_reload_that_cannot_be_put_in_place_keeps_the_old_policy(
    daemon: DaemonHandle, test_users: dict[str, User], failure: str
) -> None:
    """A valid config whose broker cannot start, or whose rules cannot go in, is rolled back."""
    app, denied = test_users["imdsg-app"], test_users["imdsg-denied"]
    daemon.start()
    before = _save(daemon)
    assert _denied(daemon.topo, app)
    wanted = "allow:\n  users: [root, imdsg-app]\n"
    held = None
    if failure == "broker-socket-unbindable":
        not_a_dir = os.path.join(daemon.workdir, "not-a-dir")
        with open(not_a_dir, "w"):
            pass
        daemon.write_config(
            wanted + f"broker:\n  enabled: true\n  socket: {not_a_dir}/sub/broker.sock\n"
        )
    else:
        # Another imdsguard (a one-shot apply, say) holds the firewall lock past the timeout.
        lock = os.path.join(daemon.env["IMDSGUARD_RUN_DIR"], "firewall.lock")
        held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(held, fcntl.LOCK_EX)
        daemon.write_config(wanted)
    try:
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_log("config_reload_failed", timeout=20)
    finally:
        if held is not None:
            os.close(held)
    assert failed[0]["kept"] == "previous policy"
    if failure == "broker-socket-unbindable":
        # The broker starts after the new rules (its uid's allowance) are in: those
        # went in, so they are rolled back too.
        assert failed[0]["stage"] == "components" and "not-a-dir/sub" in failed[0]["error"]
    else:
        assert failed[0]["stage"] == "apply" and "firewall lock" in failed[0]["error"]

    def rolled_back() -> bool:
        return any(
            e.get("event") == "rules_applied" and e.get("reason") == "reload_rolled_back"
            for e in daemon.logs()
        )

    wait_for(rolled_back, 15, "the previous rules re-applied", daemon.proc)
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert _save(daemon) == before
    assert _denied(daemon.topo, app) and _denied(daemon.topo, denied)
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["state"] == "protected", status
    assert status["broker"]["enabled"] is False
    # The next good config goes in as usual.
    daemon.write_config(wanted)
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("config_reloaded")
    assert daemon.topo.imds_get(app, CREDS, v2=True).ok
    assert _denied(daemon.topo, denied)
    assert not [e for e in daemon.logs() if e.get("event") == "rules_restored"]


def test_reload_never_opens_a_window(daemon: DaemonHandle, test_users: dict[str, User]) -> None:
    """A denied client hammering IMDS never gets through while policies are swapped."""
    daemon.start()
    script = os.path.join(daemon.workdir, "hammer.py")
    with open(script, "w") as fh:
        fh.write(
            "import socket, sys, time\n"
            "ok = 0\nend = time.monotonic() + float(sys.argv[1])\n"
            "while time.monotonic() < end:\n"
            "    try:\n"
            "        socket.create_connection(('169.254.169.254', 80), timeout=0.5).close()\n"
            "        ok += 1\n"
            "    except OSError:\n"
            "        pass\n"
            "print(ok)\n"
        )
    os.chmod(script, 0o644)
    hammer = daemon.topo.popen(
        daemon.topo.host,
        ["/usr/bin/python3", script, str(scaled(4))],
        user=test_users["imdsg-denied"],
        stdout=subprocess.PIPE,
        text=True,
    )
    configs = ["allow:\n  users: [root, imdsg-app]\n", "action: drop\n", "allow:\n  users: []\n"]
    for i in range(12):
        daemon.write_config(configs[i % len(configs)])
        daemon.signal(signal.SIGHUP)
        time.sleep(scaled(0.25))
    out, _ = hammer.communicate(timeout=scaled(30))
    assert out.strip() == "0"
    assert len(daemon.wait_log("config_reloaded", count=12)) >= 12


@pytest.mark.kernel
def test_kill_9_leaves_host_protected_and_restart_adopts(
    daemon: DaemonHandle, test_users: dict[str, User]
) -> None:
    daemon.start()
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait()
    assert _denied(daemon.topo, test_users["imdsg-denied"])
    assert _denied(daemon.topo, test_users["imdsg-denied"], v6=True)
    status = daemon.cli("status", "--json")
    assert status.returncode == 1, status.stdout
    assert "daemon is not running" in " ".join(json.loads(status.stdout)["reasons"])
    before = _save(daemon)
    daemon.start()
    assert daemon.cli("status").returncode == 0
    assert _save(daemon).count("-A OUTPUT") == before.count("-A OUTPUT")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_stop_signal_exits_0_and_leaves_rules(
    daemon: DaemonHandle, test_users: dict[str, User], signum: int
) -> None:
    daemon.start()
    assert daemon.proc is not None
    daemon.signal(signum)
    assert daemon.proc.wait(timeout=scaled(15)) == 0
    assert daemon.wait_log("daemon_stopped")[0]["rules_left_in_place"] is True
    assert _denied(daemon.topo, test_users["imdsg-denied"])
    assert _denied(daemon.topo, test_users["imdsg-denied"], v6=True)
    assert _ours_in(_save(daemon))


def test_remove_leaves_no_trace_and_touches_nothing_else(daemon: DaemonHandle) -> None:
    topo = daemon.topo
    topo.run(
        topo.host, ["iptables-legacy", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT"], check=True
    )
    topo.run(topo.host, ["ip6tables-legacy", "-N", "OTHER"], check=True)
    topo.run(topo.host, ["nft", "add", "table", "inet", "othertool"], check=True)
    before = _save(daemon)
    assert daemon.cli("apply").returncode == 0
    assert daemon.cli("apply").stdout.startswith("rules already in place")
    assert _ours_in(_save(daemon))
    daemon.start()
    refused = daemon.cli("remove")
    assert refused.returncode == 1 and "daemon is running" in refused.stderr
    daemon.stop()
    removed = daemon.cli("remove")
    assert removed.returncode == 0, removed.stderr
    after = _save(daemon)
    assert not _ours_in(after) and "imdsguard" not in after.lower()
    strip = lambda text: [ln for ln in text.splitlines() if not ln.startswith("#")]  # noqa: E731
    assert strip(after) == strip(before)
    assert daemon.cli("remove").stdout.startswith("no imdsguard rules")
    assert not _denied(topo, None)


def test_status_json_in_each_state(daemon: DaemonHandle) -> None:
    keys = {"protected", "state", "reasons", "mode", "backend", "daemon", "rules", "broker"}
    # No rules at all: unprotected.
    doc = daemon.cli("status", "--json")
    assert doc.returncode == 2
    data = json.loads(doc.stdout)
    assert keys <= set(data) and data["state"] == "unprotected"
    assert data["rules"] == {"ipv4": "missing", "ipv6": "missing"}
    assert data["blocked"] == {"total": 0, "recent": []}
    # Daemon running: protected.
    daemon.start()
    data = json.loads(daemon.cli("status", "--json").stdout)
    assert data["protected"] is True and data["state"] == "protected"
    assert data["daemon"]["running"] and data["daemon"]["pid"] == daemon.proc.pid  # type: ignore[union-attr]
    assert data["backend"] == daemon.backend and data["mode"] == "enforce"
    # Audit mode: degraded.
    daemon.write_config("mode: audit\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("config_reloaded")
    audit = daemon.cli("status", "--json")
    assert audit.returncode == 1 and json.loads(audit.stdout)["state"] == "degraded"
    # Rules in place, daemon gone: degraded.
    daemon.write_config("mode: enforce\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("config_reloaded", count=2)
    daemon.stop()
    gone = daemon.cli("status", "--json")
    assert gone.returncode == 1 and json.loads(gone.stdout)["daemon"]["running"] is False
    # Cannot tell without privileges: unknown.
    nobody = daemon.topo.run(
        daemon.topo.host,
        [sys.executable, "-m", "imdsguard", "status", "--json", "-c", daemon.config_path],
        user=User(65534, 65534),
        env=daemon.env,
    )
    if nobody.returncode != 3:
        pytest.fail(f"expected exit 3 as nobody, got {nobody.returncode}: {nobody.stderr}")
    assert json.loads(nobody.stdout)["state"] == "unknown"


def test_ready_is_sent_only_after_rules_are_in_place(daemon: DaemonHandle) -> None:
    sock_path = os.path.join(daemon.workdir, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(scaled(15))
        daemon.env["NOTIFY_SOCKET"] = sock_path
        daemon.start(wait=False)
        seen: list[str] = []

        def rules_now() -> None:
            seen.append(_save(daemon))

        while True:
            message = sock.recv(4096).decode()
            if "READY=1" in message:
                threading.Thread(target=rules_now).start()
                break
        time.sleep(scaled(0.5))
    assert _ours_in(seen[0])


def test_check_config_reports_file_key_and_line(daemon: DaemonHandle) -> None:
    daemon.write_config("mode: enforce\nallow:\n  users: [root]\n  grups: [x]\n")
    result = daemon.cli("check-config")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"{daemon.config_path}:6: allow.grups: unknown key" in result.stderr
    # A bad config at start: exit 2, and rules already in place stay.
    daemon.write_config("mode: enforce\n")
    assert daemon.cli("apply").returncode == 0
    daemon.write_config("mode: enforcing\n")
    started = daemon.topo.run(
        daemon.topo.host,
        [sys.executable, "-m", "imdsguard", "run", "-c", daemon.config_path],
        env=daemon.env,
    )
    assert started.returncode == 2 and "mode" in started.stderr
    assert _ours_in(_save(daemon))
