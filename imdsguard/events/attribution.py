"""From a held packet to "who": uid, user, process, its ancestors, unit and container.

The packet is still in the kernel (NFQUEUE) while this runs, so the client
is still inside ``connect()`` (or waiting for its answer): its socket and
process exist even when the program would exit a millisecond after the
reject. Steps: the kernel's uid/gid for the packet (``NFQA_UID/GID``), the
socket inode by exact 5-tuple lookup (sock_diag), the pid whose fd table
holds ``socket:[inode]``, then that process and its parents from ``/proc``.
Each step degrades: no socket or no pid gives ``attributed: false`` with
whatever is known (at least the uid).
"""

from __future__ import annotations

import pwd
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from imdsguard.events.packet import Packet
from imdsguard.events.procfs import ProcessInfo, ancestors, find_socket_owner, read_process
from imdsguard.events.redact import redact_args as redact_args  # noqa: PLC0414 - the broker imports it from here
from imdsguard.events.sockdiag import SocketInfo

_HINTS = 8
_USER_CACHE = 1024


class SocketLookup(Protocol):
    """Finds the socket of a 5-tuple (:class:`~imdsguard.events.sockdiag.SockDiag`)."""

    def lookup(
        self, family: str, proto: int, local: tuple[str, int], remote: tuple[str, int]
    ) -> SocketInfo | None:
        """The socket, or None."""


@dataclass(frozen=True)
class Attribution:
    """Who sent a packet. ``attributed`` is True when the process was found."""

    uid: int | None = None
    user: str | None = None
    gid: int | None = None
    pid: int | None = None
    ppid: int | None = None
    exe: str | None = None
    cmdline: tuple[str, ...] = ()
    comm: str | None = None
    ancestors: tuple[tuple[int, str | None, str | None], ...] = ()
    unit: str | None = None
    container: str | None = None
    attributed: bool = False
    inode: int | None = field(default=None, compare=False)

    def fields(self) -> dict[str, Any]:
        """The event fields this contributes, in docs/contract.md's order."""
        return {
            "uid": self.uid,
            "user": self.user,
            "gid": self.gid,
            "pid": self.pid,
            "ppid": self.ppid,
            "exe": self.exe,
            "cmdline": list(self.cmdline),
            "comm": self.comm,
            "ancestors": [{"pid": p, "comm": c, "exe": e} for p, c, e in self.ancestors],
            "unit": self.unit,
            "container": self.container,
            "attributed": self.attributed,
        }


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


class Attributor:
    """Attribute packets to processes (see the module docstring).

    ``proc_root``, ``sockets`` and ``user_name`` are injectable for tests.
    Keeps two small bounded caches: user names and pids that recently
    owned a socket (checked first: repeat offenders are found at once).
    """

    def __init__(
        self,
        sockets: SocketLookup | None,
        proc_root: str = "/proc",
        user_name: Callable[[int], str | None] = _user_name,
    ) -> None:
        self.sockets = sockets
        self.proc_root = proc_root
        self._user_name = user_name
        self._users: OrderedDict[int, str | None] = OrderedDict()
        self._hints: OrderedDict[int, None] = OrderedDict()

    def lookup_socket(self, pkt: Packet) -> SocketInfo | None:
        """The local socket that sent ``pkt`` (None when unknown or not TCP/UDP)."""
        if self.sockets is None or not pkt.sport:
            return None
        try:
            return self.sockets.lookup(
                pkt.family, pkt.proto, (pkt.src, pkt.sport), (pkt.dst, pkt.dport)
            )
        except OSError:
            return None

    def user(self, uid: int | None) -> str | None:
        """The user name of ``uid`` (cached; None when it has no passwd entry)."""
        if uid is None:
            return None
        if uid in self._users:
            self._users.move_to_end(uid)
            return self._users[uid]
        name = self._user_name(uid)
        self._users[uid] = name
        if len(self._users) > _USER_CACHE:
            self._users.popitem(last=False)
        return name

    def attribute(
        self,
        sock: SocketInfo | None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> Attribution:
        """Who holds ``sock``; ``uid``/``gid`` are the kernel's (NFQA_UID/GID) if known."""
        if uid is None and sock is not None:
            uid = sock.uid
        proc: ProcessInfo | None = None
        if sock is not None and sock.inode:
            pid = find_socket_owner(sock.inode, uid, self.proc_root, reversed(self._hints))
            if pid is not None:
                proc = read_process(pid, self.proc_root)
        if proc is None:
            return Attribution(
                uid=uid,
                user=self.user(uid),
                gid=gid,
                inode=sock.inode if sock else None,
            )
        self._hint(proc.pid)
        if uid is None:
            uid = proc.uid
        if gid is None:
            gid = proc.gid
        chain = ancestors(proc, self.proc_root)
        return Attribution(
            uid=uid,
            user=self.user(uid),
            gid=gid,
            pid=proc.pid,
            ppid=proc.ppid,
            exe=proc.exe,
            cmdline=redact_args(proc.cmdline),
            comm=proc.comm,
            ancestors=tuple((a.pid, a.comm, a.exe) for a in chain),
            unit=proc.unit,
            container=proc.container,
            attributed=True,
            inode=sock.inode if sock else None,
        )

    def _hint(self, pid: int) -> None:
        self._hints[pid] = None
        self._hints.move_to_end(pid)
        if len(self._hints) > _HINTS:
            self._hints.popitem(last=False)
