"""Who is on the other end of the broker's socket, and may they have credentials.

The kernel tells us the peer's uid, gid and pid as they were at
``connect()`` (``SO_PEERCRED``), and its supplementary groups
(``SO_PEERGROUPS``). A client is allowed if its uid is in
``broker.clients.users``, its gid or any supplementary group in
``broker.clients.groups``, or its executable is one of
``broker.clients.exes``.

The executable is read from ``/proc/<pid>``, which raises two problems:

- **pid reuse**: the client may be gone and its pid taken by another
  process. We hold a pidfd of the connecting process (``SO_PEERPIDFD``,
  Linux 6.5+; else ``pidfd_open`` plus a start-time check against the time
  the connection was accepted), read ``/proc``, then check that the pidfd's
  process still lives and has the same start time. A live process keeps its
  pid, so what we read was that process.
- **a replaceable binary**: allowing ``/opt/app/bin/app`` means nothing if
  the caller can overwrite it or its directory. An allowed exe must be owned
  by root and not writable by group or others, and so must every directory
  above it (a sticky directory such as ``/tmp`` is tolerated above, not as
  the file's own directory). The running image must be that very file (same
  device and inode): a binary replaced after the process started no longer
  matches.

The identity is bound to the connection, not only to the process that made
it (:func:`check_connection`): the kernel's record of the connecting
process must pass, and so must *every* process that holds the client's end
of the connection now (found by the peer socket's inode, ``sock_diag``,
in every ``/proc/<pid>/fd``). So a denied process cannot connect, fork, and
let an allowed program hold the connection for it (connect-then-exec): the
denied child holds it too. And an exe only vouches for a connection that
the program holds close-on-exec: a socket inherited across an ``exec`` is
never close-on-exec, so a connection made before the allowed binary was
exec'd does not count as that binary's.

Even so, allowing an exe identifies a program, not a person: whoever can
run it can make it ask (arguments, ``LD_PRELOAD``, ``ptrace`` by the same
uid). List only binaries that untrusted users cannot run, never an
interpreter (``/usr/bin/python3``) or a shell, and prefer users and groups.
Note that with ``credential_process`` the peer is
``imdsguard credentials`` itself (a Python interpreter), not the SDK's
program: exes are for programs that talk to the socket directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import Callable

from imdsguard import netlink as nl
from imdsguard import trust
from imdsguard.config import BrokerClients
from imdsguard.events.procfs import Holder, ProcessInfo, read_process, socket_holders

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_MAX_PEER_GROUPS = 256  # Python's getsockopt buffer is capped at 1024 bytes


@dataclass(frozen=True)
class Peer:
    """The connecting process.

    ``uid``/``gid``/``pid``/``groups`` come from the kernel's record of the
    connection. ``exe`` and ``exe_id`` (device, inode of the running image)
    come from ``/proc`` and are None unless ``verified``: the process was
    still the one that connected after we read them.
    """

    uid: int
    gid: int
    pid: int | None
    groups: tuple[int, ...] = ()
    exe: str | None = None
    exe_id: tuple[int, int] | None = None
    verified: bool = False
    process: ProcessInfo | None = None
    #: Whether this process holds the connection close-on-exec (None: not known,
    #: or it does not hold it). An exe vouches only for a close-on-exec hold.
    socket_cloexec: bool | None = None


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that ``/proc/<pid>/stat`` start times use."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """The peer's (pid, uid, gid) at connect time (``SO_PEERCRED``); OSError if unknown."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _peer_groups(sock: socket.socket) -> tuple[int, ...] | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_PEER_GROUPS)
    except OSError:
        return None  # ERANGE (very many groups) or an old kernel: fall back to /proc
    return tuple(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


def _open_pidfd(sock: socket.socket, pid: int) -> tuple[int | None, bool]:
    """A pidfd for the peer and whether it is the kernel's own (race-free) one."""
    with contextlib.suppress(OSError):
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)), True
    try:
        return os.pidfd_open(pid), False
    except (OSError, AttributeError):
        return None, False


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; we just may not signal it
    except (OSError, AttributeError):
        return False
    return True


def _start_time(pid: int, proc_root: str) -> int | None:
    try:
        fd = os.open(f"{proc_root}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def kernel_peer(sock: socket.socket, proc_root: str = "/proc") -> Peer | None:
    """The peer as the kernel recorded it at ``connect()``, without reading ``/proc``.

    Enough to decide on users and groups, and race-free. ``exe`` is read
    for the log only (unverified: ``exe_id`` stays None, so it never
    matches ``broker.clients.exes``). None when the kernel cannot give the
    groups (then use :func:`identify`).
    """
    pid, uid, gid = peer_cred(sock)
    groups = _peer_groups(sock)
    if groups is None:
        return None
    exe = None
    if pid > 0:
        with contextlib.suppress(OSError):
            exe = os.readlink(f"{proc_root}/{pid}/exe")
    return Peer(uid=uid, gid=gid, pid=pid if pid > 0 else None, groups=groups, exe=exe)


def identify(sock: socket.socket, accepted_ticks: int, proc_root: str = "/proc") -> Peer:
    """Who holds the other end of ``sock`` (see the module docstring).

    ``accepted_ticks`` is :func:`boot_ticks` taken when the connection was
    accepted: without a kernel pidfd, a process that started later cannot
    be the one that connected.
    """
    pid, uid, gid = peer_cred(sock)
    groups = _peer_groups(sock)
    if pid <= 0:
        return Peer(uid=uid, gid=gid, pid=None, groups=groups or ())
    pidfd, exact = _open_pidfd(sock, pid)
    if pidfd is None:
        info, exe_id, verified = read_process(pid, proc_root), None, False
    else:
        try:
            info, exe_id, stable = _read_stable(pid, pidfd, proc_root)
        finally:
            os.close(pidfd)
        started = info.start_time if info is not None else None
        verified = stable and (exact or (started is not None and started <= accepted_ticks))
    if groups is None:
        groups = info.groups if verified and info is not None else ()
    if not verified:
        return Peer(uid=uid, gid=gid, pid=pid, groups=groups, process=info)
    assert info is not None  # noqa: S101 - part of `verified`
    return Peer(
        uid=uid,
        gid=gid,
        pid=pid,
        groups=groups,
        exe=info.exe,
        exe_id=exe_id,
        verified=True,
        process=info,
    )


# -- the connection's holders

UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_PEER = 2
_NO_COOKIE = 0xFFFFFFFF
_UNIX_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_UNIX_MSG = struct.Struct("=BBBxIII")  # family, type, state, ino, cookie[2]


def peer_inode(sock: socket.socket) -> int | None:
    """The inode of the client's end of ``sock`` (a connected Unix socket), or None.

    One ``sock_diag`` exact lookup (``UDIAG_SHOW_PEER``). None when the
    kernel does not say: no ``unix_diag``, or the connection lives in another
    network namespace (a client's accepted socket belongs to the client's).
    """
    own = os.fstat(sock.fileno()).st_ino
    req = _UNIX_REQ.pack(
        socket.AF_UNIX, 0, 0, 0xFFFFFFFF, own, UDIAG_SHOW_PEER, _NO_COOKIE, _NO_COOKIE
    )
    try:
        diag = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, nl.NETLINK_SOCK_DIAG
        )
    except OSError:
        return None
    try:
        diag.settimeout(1.0)
        diag.send(nl.message(nl.SOCK_DIAG_BY_FAMILY, nl.NLM_F_REQUEST, 1, req))
        data = diag.recv(8192)
    except OSError:
        return None
    finally:
        diag.close()
    for msg in nl.parse_messages(data):
        if msg.type != nl.SOCK_DIAG_BY_FAMILY or len(msg.payload) < _UNIX_MSG.size:
            continue
        if _UNIX_MSG.unpack_from(msg.payload)[3] != own:
            continue
        peer = nl.parse_attrs(msg.payload, _UNIX_MSG.size).get(UNIX_DIAG_PEER)
        if peer is not None and len(peer) >= 4:
            return int(struct.unpack_from("=I", peer)[0]) or None
    return None


def holder_peer(holder: Holder, proc_root: str = "/proc") -> Peer | None:
    """A process that holds the connection, as ``/proc`` shows it now (None: gone).

    Its effective uid and gid and its groups decide; its exe is verified
    against pid reuse (a pidfd, and the same start time before and after).
    """
    try:
        pidfd = os.pidfd_open(holder.pid)
    except (OSError, AttributeError):
        return None
    try:
        info, exe_id, stable = _read_stable(holder.pid, pidfd, proc_root)
    finally:
        os.close(pidfd)
    if info is None or info.uid is None or info.gid is None:
        return None
    return Peer(
        uid=info.uid,
        gid=info.gid,
        pid=holder.pid,
        groups=info.groups,
        exe=info.exe if stable else None,
        exe_id=exe_id if stable else None,
        verified=stable,
        process=info,
        socket_cloexec=holder.cloexec,
    )


def _read_stable(
    pid: int, pidfd: int, proc_root: str
) -> tuple[ProcessInfo | None, tuple[int, int] | None, bool]:
    """``pid``'s process, its running image, and whether it stayed that process throughout."""
    before = _start_time(pid, proc_root)
    info = read_process(pid, proc_root)
    exe_id: tuple[int, int] | None = None
    with contextlib.suppress(OSError):
        st = os.stat(f"{proc_root}/{pid}/exe")  # the running image, even if deleted
        exe_id = (st.st_dev, st.st_ino)
    after = _start_time(pid, proc_root)
    stable = (
        info is not None
        and before is not None
        and before == after == info.start_time
        and _alive(pidfd)
    )
    return info, exe_id, stable


def check_connection(
    sock: socket.socket,
    accepted_ticks: int,
    policy: ClientPolicy,
    proc_root: str = "/proc",
    *,
    holders: list[Holder] | None = None,
) -> tuple[Decision, Peer]:
    """Whether the client on ``sock`` may have credentials, and who it is (for the log).

    The connecting process (the kernel's record, its exe verified) must
    pass ``policy``, and so must every process that holds the client's end
    now (see the module docstring). Needs to read every process's
    ``/proc/<pid>/fd``: the privileged daemon runs it for the broker.
    ``holders`` is for tests.
    """
    quick = kernel_peer(sock, proc_root)
    peer = quick or identify(sock, accepted_ticks, proc_root)
    decision = policy.decide(peer)
    if not decision.allowed and quick is not None:
        peer = identify(sock, accepted_ticks, proc_root)  # verified exe, and the log's process
        decision = policy.decide(peer)
    if not decision.allowed and not policy.clients.exes:
        return decision, peer  # nothing about the holders can turn this into an allow
    inode = peer_inode(sock) if holders is None else None
    if holders is None and inode is None:
        return _refused(
            peer,
            "the broker cannot tell which processes hold this connection "
            "(no unix_diag, or a client in another network namespace)",
        ), peer
    if not decision.allowed:
        # Only an exe can still allow it: first how the connector itself holds the
        # connection (its own fds: cheap), so refusals never cost a full scan.
        own = (
            socket_holders(inode, proc_root, [peer.pid])
            if inode is not None and peer.pid is not None
            else [h for h in holders or () if h.pid == peer.pid]
        )
        if own:
            peer = dataclasses.replace(peer, socket_cloexec=all(h.cloexec for h in own))
        decision = policy.decide(peer)
        if not decision.allowed:
            return decision, peer
    if holders is None:
        assert inode is not None  # noqa: S101 - checked above
        # Processes that pass by their user need no scan (about 20 µs per fd under
        # load): they would pass whatever they hold. Found nobody? Then look everywhere
        # before refusing (the connector may have handed its copy to an allowed child).
        by_user = policy.passes_by_user(proc_root)
        skip = None if by_user is None else (lambda pid: pid != peer.pid and by_user(pid))
        holders = socket_holders(inode, proc_root, skip=skip)
        if not holders and skip is not None:
            holders = socket_holders(inode, proc_root)
    mine = [h for h in holders if h.pid == peer.pid]
    if mine:
        peer = dataclasses.replace(peer, socket_cloexec=all(h.cloexec for h in mine))
        decision = policy.decide(peer)
    if not decision.allowed:
        return decision, peer
    if not holders:
        return _refused(
            peer,
            "no process visibly holds this connection (passed on in an SCM_RIGHTS message?)",
        ), peer
    for holder in holders:
        other = holder_peer(holder, proc_root)
        if other is None:
            continue  # gone: it no longer holds the connection
        verdict = policy.decide(other)
        if not verdict.allowed:
            who = other.exe or (other.process.comm if other.process else None) or "?"
            return Decision(
                False,
                None,
                f"process {holder.pid} ({who}, uid {other.uid}) also holds this connection, and "
                + verdict.reason,
                verdict.exe_problem,
            ), peer
    return decision, peer


def _refused(peer: Peer, reason: str) -> Decision:
    return Decision(False, None, f"uid {peer.uid}: {reason}")


def exe_trust_problem(path: str) -> str | None:
    """Why ``path`` cannot be trusted as an allowed client executable, or None.

    Only root may change what it names (:func:`imdsguard.trust.untrusted`):
    every directory on the way and every symlink followed (each hop's owner
    included) must be root's and not writable by group or others, and so
    must the regular file it ends at. Stricter than for the config: a
    sticky directory (``/tmp``) is tolerated above, never as the directory
    that holds the file or a symlink to it. That the running image is this
    very file is checked by the caller (device and inode, :class:`ClientPolicy`).
    """
    problem, _ = trust.untrusted(path, sticky_own_dir=False)
    if problem is None:
        return None
    st = problem.st
    if problem.kind == "file" and st is not None:
        return (
            f"{problem.entry} is owned by uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):04o}: whoever can write it could run anything as an "
            f"allowed client (chown root: {problem.entry} && chmod go-w {problem.entry})"
        )
    if problem.kind == "directory" and st is not None:
        return (
            f"directory {problem.entry} (above {path}) is owned by uid {st.st_uid} with "
            f"mode {stat.S_IMODE(st.st_mode):04o}: others could replace the binary"
        )
    if problem.kind == "symlink" and st is not None:
        return (
            f"symlink {problem.entry} (on the way to {path}) is owned by uid {st.st_uid}: "
            f"it could lead to another binary (chown -h root: {problem.entry})"
        )
    if problem.kind == "lookup":
        return f"cannot stat {problem.entry}: {problem.strerror}"
    return problem.message


@dataclass(frozen=True)
class Decision:
    """Whether a peer may have credentials, what matched, and why not."""

    allowed: bool
    matched: str | None = None  # e.g. "user:app", "group:readers", "exe:/usr/bin/app"
    reason: str = ""
    exe_problem: str | None = None  # why an allowed exe did not count, for the log


class ClientPolicy:
    """``broker.clients`` as a decision on a :class:`Peer`."""

    def __init__(self, clients: BrokerClients) -> None:
        self.clients = clients
        self._users = {p.id: p.name for p in clients.users}
        self._groups = {p.id: p.name for p in clients.groups}

    def passes_by_user(self, proc_root: str = "/proc") -> Callable[[int], bool] | None:
        """A cheap test for processes that pass by their user alone, whatever they hold.

        Their fds need no scan. ``/proc/<pid>`` belongs to the process's
        effective uid, except for a non-dumpable one, whose directory is
        root's: so a root-owned directory counts only when ``status`` says
        the effective uid is 0 too. None when no user is allowed.
        """
        users = set(self._users)
        if not users:
            return None

        def skip(pid: int) -> bool:
            try:
                owner = os.stat(f"{proc_root}/{pid}").st_uid
            except OSError:
                return False
            if owner not in users:
                return False
            if owner != 0:
                return True
            info = read_process(pid, proc_root, brief=True)
            return info is not None and info.uid == 0

        return skip

    def decide(self, peer: Peer) -> Decision:
        """Allowed by user, then group, then exe; otherwise the reason for refusal."""
        if peer.uid in self._users:
            return Decision(True, f"user:{self._users[peer.uid]}")
        for gid in (peer.gid, *peer.groups):
            if gid in self._groups:
                return Decision(True, f"group:{self._groups[gid]}")
        # broker.clients.units: the unit named by the peer's cgroup (/proc/<pid>/cgroup),
        # only from a read verified to be of the connecting process (pid reuse).
        unit = peer.process.unit if peer.verified and peer.process is not None else None
        if unit is not None and unit in self.clients.units:
            return Decision(True, f"unit:{unit}")
        problems: list[str] = []
        if self.clients.exes:
            if not peer.verified or peer.exe_id is None:
                problems.append("its executable could not be verified (process gone?)")
            elif peer.socket_cloexec is not True:
                problems.append(
                    "it does not hold the connection close-on-exec, so the connection may "
                    "predate its executable (connect, then exec): an exe vouches only for "
                    "sockets it opens with SOCK_CLOEXEC"
                    if peer.socket_cloexec is False
                    else "it does not hold the connection (passed on, or closed)"
                )
            else:
                for allowed in self.clients.exes:
                    matched, problem = self._exe_matches(peer, allowed)
                    if matched:
                        return Decision(True, f"exe:{allowed}")
                    if problem:
                        problems.append(problem)
        reason = f"uid {peer.uid} is not an allowed broker client (broker.clients)"
        return Decision(False, None, reason, "; ".join(problems) or None)

    @staticmethod
    def _exe_matches(peer: Peer, allowed: str) -> tuple[bool, str | None]:
        try:
            st = os.stat(allowed)
        except OSError:
            return False, None
        if (st.st_dev, st.st_ino) != peer.exe_id:
            exe = peer.exe or ""
            if exe.endswith(" (deleted)") and exe[: -len(" (deleted)")] == os.path.realpath(
                allowed
            ):
                return False, f"it runs a former {allowed} (replaced since it started)"
            return False, None
        problem = exe_trust_problem(allowed)
        if problem:
            return False, f"allowed exe refused: {problem}"
        return True, None
