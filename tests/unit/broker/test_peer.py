"""Who is on the other end of the broker socket, and whether broker.clients allows it."""

# ruff: noqa: S103 - these tests make files and directories writable by others on purpose

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imdsguard.broker import peer as peer_mod
from imdsguard.broker.peer import (
    ClientPolicy,
    Peer,
    boot_ticks,
    check_connection,
    exe_trust_problem,
    identify,
    peer_inode,
)
from imdsguard.config import BrokerClients, Principal
from imdsguard.events.procfs import Holder, ProcessInfo, parse_cgroup, socket_holders

PYTHON = os.path.realpath(sys.executable)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as root")

CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"x")
if len(sys.argv) > 2:
    s.recv(1)  # stay alive until told
"""


def policy(
    users: tuple[int, ...] = (), groups: tuple[int, ...] = (), exes: tuple[str, ...] = ()
) -> ClientPolicy:
    return ClientPolicy(
        BrokerClients(
            users=tuple(Principal(f"u{u}", u) for u in users),
            groups=tuple(Principal(f"g{g}", g) for g in groups),
            exes=exes,
        )
    )


def exe_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_allowed_by_user_then_group_then_exe() -> None:
    me = Peer(uid=1001, gid=1001, pid=4242, groups=(1001, 27))
    assert policy(users=(1001,)).decide(me).matched == "user:u1001"
    assert policy(groups=(1001,)).decide(me).matched == "group:g1001"  # primary group
    assert policy(groups=(27,)).decide(me).matched == "group:g27"  # supplementary
    runs_python = Peer(
        1001, 1001, 4242, (), PYTHON, exe_id(PYTHON), verified=True, socket_cloexec=True
    )
    decision = policy(exes=(PYTHON,)).decide(runs_python)
    assert decision.allowed
    assert decision.matched == f"exe:{PYTHON}"


def test_allowed_by_unit_only_from_a_verified_read() -> None:
    """broker.clients.units: the unit the peer's cgroup names, never from an unverified read."""
    clients = ClientPolicy(BrokerClients(units=("app.service",)))
    inside = ProcessInfo(pid=4242, uid=0, unit="app.service")
    outside = ProcessInfo(pid=4242, uid=0, unit="session-3.scope")
    ok = clients.decide(Peer(0, 0, 4242, (), PYTHON, exe_id(PYTHON), True, inside))
    assert ok.allowed and ok.matched == "unit:app.service"
    assert not clients.decide(Peer(0, 0, 4242, (), PYTHON, exe_id(PYTHON), True, outside)).allowed
    # The process may have gone and its pid been reused: its cgroup proves nothing.
    assert not clients.decide(Peer(0, 0, 4242, (), None, None, False, inside)).allowed
    assert not clients.decide(Peer(0, 0, 4242, ())).allowed


@pytest.mark.parametrize(
    "cgroup",
    [
        # A v1 "name=systemd" line that is not systemd's (a unified host): the firewall
        # matches the cgroup v2 one, and so must the broker.
        "1:name=systemd:/system.slice/app.service\n0::/user.slice/user-1000.slice/session-3.scope\n",
        # Another unit whose name starts with "app.service:".
        "0::/system.slice/app.service:x.service\n",
    ],
)
def test_allowed_by_unit_only_for_the_units_own_cgroup_v2(cgroup: str) -> None:
    clients = ClientPolicy(BrokerClients(units=("app.service",)))
    unit, _ = parse_cgroup(cgroup)
    info = ProcessInfo(pid=4242, uid=1000, cgroup=cgroup, unit=unit)
    peer = Peer(1000, 1000, 4242, (), PYTHON, exe_id(PYTHON), True, info)
    assert not clients.decide(peer).allowed


def test_refused_with_a_reason() -> None:
    stranger = Peer(uid=1002, gid=1002, pid=4243, groups=(1002,))
    decision = policy(users=(1001,), groups=(27,)).decide(stranger)
    assert not decision.allowed
    assert decision.reason == "uid 1002 is not an allowed broker client (broker.clients)"


def test_exe_needs_a_verified_process() -> None:
    gone = Peer(1001, 1001, 4242, (), None, None, verified=False)
    decision = policy(exes=(PYTHON,)).decide(gone)
    assert not decision.allowed
    assert decision.exe_problem is not None
    assert "could not be verified" in decision.exe_problem


def test_exe_matched_by_inode() -> None:
    runs_python = Peer(0, 0, 1, (), PYTHON, exe_id(PYTHON), verified=True, socket_cloexec=True)
    runs_sh = Peer(0, 0, 1, (), "/bin/sh", exe_id("/bin/sh"), verified=True, socket_cloexec=True)
    assert not policy(exes=("/bin/sh",)).decide(runs_python).allowed
    assert policy(exes=(PYTHON,)).decide(runs_python).allowed
    assert not policy(exes=(PYTHON,)).decide(runs_sh).allowed


@needs_root
def test_exe_matched_through_a_trusted_symlink(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    link = tmp_path / "python-link"
    link.symlink_to(PYTHON)
    runs_python = Peer(0, 0, 1, (), PYTHON, exe_id(PYTHON), verified=True, socket_cloexec=True)
    assert policy(exes=(str(link),)).decide(runs_python).matched == f"exe:{link}"


def test_an_exe_vouches_only_for_a_close_on_exec_hold() -> None:
    inherited = Peer(1001, 1001, 4242, (), PYTHON, exe_id(PYTHON), verified=True)
    for cloexec, why in ((False, "connect, then exec"), (None, "does not hold the connection")):
        peer = Peer(**{**inherited.__dict__, "socket_cloexec": cloexec})
        decision = policy(exes=(PYTHON,)).decide(peer)
        assert not decision.allowed
        assert decision.exe_problem is not None
        assert why in decision.exe_problem
    # Users and groups do not depend on how the socket is held.
    assert policy(users=(1001,)).decide(inherited).allowed


def test_peer_inode_and_holders_of_own_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        inode = peer_inode(a)
        assert inode == os.fstat(b.fileno()).st_ino
        assert socket_holders(inode) == [Holder(os.getpid(), b.fileno(), cloexec=True)]
        os.set_inheritable(b.fileno(), True)
        assert socket_holders(inode) == [Holder(os.getpid(), b.fileno(), cloexec=False)]


def test_the_connection_needs_a_visible_holder() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert check_connection(a, boot_ticks(), policy(users=(os.geteuid(),)))[0].allowed
        decision, _ = check_connection(a, boot_ticks(), policy(users=(os.geteuid(),)), holders=[])
    assert not decision.allowed
    assert "no process visibly holds" in decision.reason


HOLD = "import sys, time; time.sleep(30)"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another uid)")
def test_every_holder_must_pass(tmp_path: Path) -> None:
    """Allowed connector, but a process of a denied uid holds the connection too: refused."""
    server, path = _listener(tmp_path)
    with server:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        conn, _ = server.accept()
        with conn, client:
            allowed = policy(users=(os.geteuid(),))
            assert check_connection(conn, boot_ticks(), allowed)[0].allowed
            holder = subprocess.Popen(
                [PYTHON, "-c", HOLD], pass_fds=(client.fileno(),), user=65534, group=65534
            )
            try:
                deadline = time.monotonic() + 10
                while not any(h.pid == holder.pid for h in socket_holders(peer_inode(conn) or 0)):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                decision, _ = check_connection(conn, boot_ticks(), allowed)
            finally:
                holder.kill()
                holder.wait()
    assert not decision.allowed
    assert f"process {holder.pid} ({PYTHON}, uid 65534) also holds this connection" in (
        decision.reason
    )


CONNECT_THEN_EXEC = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
os.set_inheritable(s.fileno(), True)
os.execv(sys.argv[2], [sys.argv[2], "30"])
"""


@needs_root
def test_connect_then_exec_does_not_borrow_the_exe(tmp_path: Path) -> None:
    """A connection made before an exec of the allowed binary is not that binary's."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    sleep = os.path.realpath(sleep)
    server, path = _listener(tmp_path)
    with server:
        proc = subprocess.Popen([PYTHON, "-c", CONNECT_THEN_EXEC, path, sleep])
        try:
            conn, _ = server.accept()
            with conn:
                deadline = time.monotonic() + 10
                while os.path.realpath(f"/proc/{proc.pid}/exe") != sleep:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                peer = identify(conn, boot_ticks())
                decision, _ = check_connection(conn, boot_ticks(), policy(exes=(sleep,)))
        finally:
            proc.kill()
            proc.wait()
    assert peer.exe == sleep and peer.verified  # what the process runs now: sleep
    assert not decision.allowed
    assert decision.exe_problem is not None
    assert "connect, then exec" in decision.exe_problem


def test_identify_own_connection() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        peer = identify(a, boot_ticks())
    assert peer.uid == os.geteuid()
    assert peer.gid == os.getegid()
    assert peer.pid == os.getpid()
    assert peer.verified
    assert peer.exe == PYTHON
    assert peer.exe_id == exe_id(PYTHON)
    assert set(os.getgroups()) <= set(peer.groups) | {os.getegid()}


def _listener(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "peer.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    return server, path


def test_a_process_gone_is_never_verified(tmp_path: Path) -> None:
    server, path = _listener(tmp_path)
    with server:
        subprocess.run([PYTHON, "-c", CONNECT, path], check=True, timeout=10)
        conn, _ = server.accept()
        with conn:
            peer = identify(conn, boot_ticks())
    assert peer.pid is not None
    assert not peer.verified  # its pid may already belong to someone else
    assert peer.exe is None
    assert not policy(exes=(PYTHON,)).decide(peer).allowed


def test_without_a_kernel_pidfd_a_later_process_is_not_the_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback for kernels before 6.5: pidfd_open plus a start-time check."""
    monkeypatch.setattr(peer_mod, "_open_pidfd", lambda sock, pid: (os.pidfd_open(pid), False))
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert identify(a, boot_ticks()).verified
        # "Accepted" before this process started: a reused pid, not our peer.
        reused = identify(a, accepted_ticks=0)
    assert not reused.verified
    assert reused.exe is None


# -- executables the caller could replace


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o755)
    d = tmp_path / "bin"
    d.mkdir(mode=0o755)
    return d


def _install(bindir: Path, name: str = "app") -> str:
    path = bindir / name
    shutil.copy2(PYTHON, path)
    os.chmod(path, 0o755)
    return str(path)


@needs_root
def test_trusted_exe(bindir: Path) -> None:
    assert exe_trust_problem(_install(bindir)) is None
    assert exe_trust_problem(PYTHON) is None


@needs_root
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda exe, d: os.chmod(exe, 0o775), "mode 0775"),
        (lambda exe, d: os.chmod(exe, 0o757), "mode 0757"),
        (lambda exe, d: os.chown(exe, 65534, 0), "owned by uid 65534"),
        (lambda exe, d: os.chmod(d, 0o777), "others could replace the binary"),
        (lambda exe, d: os.chmod(d, 0o1777), "others could replace the binary"),  # own dir
        (lambda exe, d: os.chown(d, 65534, 65534), "owned by uid 65534"),
    ],
)
def test_replaceable_exe_refused(bindir: Path, change: object, expected: str) -> None:
    exe = _install(bindir)
    change(exe, str(bindir))  # type: ignore[operator]
    problem = exe_trust_problem(exe)
    assert problem is not None
    assert expected in problem
    peer = Peer(0, 0, 1, (), exe, exe_id(exe), verified=True, socket_cloexec=True)
    decision = policy(exes=(exe,)).decide(peer)
    assert not decision.allowed
    assert decision.exe_problem is not None
    assert expected in decision.exe_problem


@needs_root
def test_symlink_in_a_writable_directory_refused(bindir: Path, tmp_path: Path) -> None:
    exe = _install(bindir)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    link = open_dir / "app"
    link.symlink_to(exe)  # anyone could point it at another root-owned binary
    problem = exe_trust_problem(str(link))
    assert problem is not None
    assert str(open_dir) in problem


@needs_root
def test_exe_replaced_after_start_no_longer_matches(bindir: Path, tmp_path: Path) -> None:
    exe = _install(bindir)
    server, path = _listener(tmp_path)
    proc = subprocess.Popen([exe, "-c", CONNECT, path, "wait"])
    try:
        with server:
            conn, _ = server.accept()
            with conn:
                assert check_connection(conn, boot_ticks(), policy(exes=(exe,)))[0].allowed
                # An upgrade (or an attacker with write access) swaps the file.
                _install(bindir, "app.new")
                os.replace(bindir / "app.new", exe)
                decision, peer = check_connection(conn, boot_ticks(), policy(exes=(exe,)))
                conn.send(b"x")
    finally:
        proc.wait(timeout=10)
    assert peer.verified
    assert not decision.allowed
    assert decision.exe_problem is not None
    assert "replaced since it started" in decision.exe_problem


def test_missing_exe_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    problem = exe_trust_problem(str(tmp_path / "nope"))
    assert problem is not None
    assert "cannot stat" in problem
