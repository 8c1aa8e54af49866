"""Who may have credentials: the broker asks, the privileged side answers.

The broker process runs as its own unprivileged user and cannot read other
users' ``/proc/<pid>/fd`` or ``exe``, which :func:`~imdsguard.broker.peer.
check_connection` needs. So it asks the root daemon over a narrow channel
(an anonymous ``SOCK_SEQPACKET`` socketpair made at spawn, nothing on the
file system): it passes the *connected client socket itself*
(``SCM_RIGHTS``) and the time it accepted it; the daemon reads the peer's
credentials, pidfd and holders from the kernel, decides with
``broker.clients`` and answers allow or deny. The broker cannot make the
daemon decide about anything but a live connection to it, and nothing it
says about the client is believed.

Messages are JSON, one per datagram:

- broker → daemon ``{"op": "check", "id": N, "ticks": T, "quiet": Q}`` + the
  socket fd (``quiet``: a health request, whose refusal is not logged);
  daemon → broker ``{"op": "verdict", "id": N, "allowed", "matched",
  "reason", "exe"}``.
- broker → daemon ``{"op": "health", "doc": {...}}`` once a second (what
  ``status`` shows; never a secret).

:class:`InlineChecker` decides in-process with the same code (for a broker
that runs with the privileges itself: tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import json
import pwd
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from imdsguard._log import Logger
from imdsguard.broker.peer import (
    ClientPolicy,
    Decision,
    Peer,
    check_connection,
    exe_trust_problem,
)
from imdsguard.config import Config
from imdsguard.events.attribution import Attribution, redact_args
from imdsguard.events.procfs import ancestors
from imdsguard.throttle import IntervalLimiter

MAX_MESSAGE = 65536
SEND_TIMEOUT = 2.0  # backpressure: a full channel (net.unix.max_dgram_qlen) waits this long
_REFUSAL_LOG_INTERVAL = 10.0  # per (uid, exe): one broker_refused line, then a count
_REFUSAL_LOG_BURST = 20  # and at most this many lines per interval in all
_MAX_REFUSAL_KEYS = 1024


def send_message(
    channel: socket.socket,
    data: bytes,
    fds: tuple[int, ...] = (),
    timeout: float = SEND_TIMEOUT,
) -> None:
    """Send one message on a non-blocking channel, waiting while its queue is full.

    A datagram channel holds only ``net.unix.max_dgram_qlen`` messages (10 by
    default): a burst of clients must wait for the other side, not fail.
    Raises ``TimeoutError`` after ``timeout``, ``OSError`` if the channel broke.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if fds:
                socket.send_fds(channel, [data], list(fds))
            else:
                channel.send(data)
            return
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the channel stayed full") from None
            select.select([], [channel], [], remaining)


@dataclass(frozen=True)
class Verdict:
    """The answer on one connection: allowed or not, as what, why not; its exe (for the log)."""

    allowed: bool
    matched: str | None = None
    reason: str = ""
    exe: str | None = None

    @classmethod
    def of(cls, decision: Decision, peer: Peer) -> Verdict:
        """From a decision on ``peer``."""
        exe = peer.exe or (peer.process.exe if peer.process else None)
        return cls(decision.allowed, decision.matched, decision.reason, exe)

    def to_message(self, ident: int) -> dict[str, Any]:
        """The channel message that carries this verdict."""
        return {
            "op": "verdict",
            "id": ident,
            "allowed": self.allowed,
            "matched": self.matched,
            "reason": self.reason,
            "exe": self.exe,
        }

    @classmethod
    def from_message(cls, doc: dict[str, Any]) -> Verdict:
        """Inverse of :meth:`to_message` (anything malformed is a refusal)."""
        return cls(
            allowed=doc.get("allowed") is True,
            matched=str(doc["matched"]) if doc.get("matched") else None,
            reason=str(doc.get("reason") or "refused"),
            exe=str(doc["exe"]) if doc.get("exe") else None,
        )


class RefusalLog:
    """``broker_refused`` lines with attribution, bounded per (uid, exe) and in all."""

    def __init__(self, logger: Logger, proc_root: str = "/proc") -> None:
        self.log = logger
        self._proc_root = proc_root
        self._throttle = IntervalLimiter(
            _REFUSAL_LOG_INTERVAL, _MAX_REFUSAL_KEYS, total=_REFUSAL_LOG_BURST
        )
        self._users: dict[int, str | None] = {}

    def _user(self, uid: int) -> str | None:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = None
            if len(self._users) > 1024:
                self._users.pop(next(iter(self._users)))
        return self._users[uid]

    def record(self, peer: Peer, decision: Decision, socket_path: str) -> None:
        """Log a refusal of ``peer`` (or count it, when the log is at its bounds)."""
        info = peer.process
        key = (peer.uid, info.exe if info else None)
        logged, suppressed = self._throttle.allow(key)
        if not logged:
            return  # reading /proc for the log costs ~1 ms: a refusal flood must not buy that
        chain = ancestors(info, self._proc_root) if info else []
        who = Attribution(
            uid=peer.uid,
            user=self._user(peer.uid),
            gid=peer.gid,
            pid=peer.pid,
            ppid=info.ppid if info else None,
            exe=info.exe if info else None,
            cmdline=redact_args(info.cmdline) if info else (),
            comm=info.comm if info else None,
            ancestors=tuple((a.pid, a.comm, a.exe) for a in chain),
            unit=info.unit if info else None,
            container=info.container if info else None,
            attributed=peer.verified,
        )
        self.log.warning(
            "broker_refused",
            **who.fields(),
            groups=list(peer.groups),
            reason=decision.reason,
            exe_problem=decision.exe_problem,
            suppressed_before=suppressed,
            socket=socket_path,
        )


class Decider:
    """``broker.clients`` applied to connections, refusals logged: the privileged part."""

    def __init__(self, policy: ClientPolicy, logger: Logger, proc_root: str = "/proc") -> None:
        self.policy = policy
        self.refusals = RefusalLog(logger, proc_root)
        self._proc_root = proc_root

    def decide(
        self, sock: socket.socket, ticks: int, socket_path: str, quiet: bool = False
    ) -> Verdict:
        """The verdict on the client of ``sock``, accepted at ``ticks`` (``quiet``: a refusal
        is not logged, for a health request)."""
        try:
            decision, peer = check_connection(sock, ticks, self.policy, self._proc_root)
        except OSError as exc:
            return Verdict(False, None, f"the client could not be identified: {exc.strerror}")
        if not decision.allowed and not quiet:
            self.refusals.record(peer, decision, socket_path)
        return Verdict.of(decision, peer)


class InlineChecker:
    """Decides in the broker's own process (it must then be privileged: tests, benchmarks)."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    def fileno(self) -> int | None:
        """Nothing to watch: every answer is immediate."""
        return None

    def check(
        self, sock: socket.socket, ticks: int, ident: int, socket_path: str, quiet: bool = False
    ) -> Verdict | None:
        """The verdict now."""
        return self.decider.decide(sock, ticks, socket_path, quiet)

    def results(self) -> list[tuple[int, Verdict]]:
        """Answers that arrived since (none: see :meth:`check`)."""
        return []

    @property
    def closed(self) -> bool:
        """Whether the decider went away (never, in-process)."""
        return False

    def report(self, doc: dict[str, Any]) -> None:
        """Health goes nowhere: the broker's own ``health()`` is read directly."""


class ChannelChecker:
    """The broker's end of the channel: questions out, verdicts in (see the module docstring)."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.channel.setblocking(False)
        self._send_lock = threading.Lock()
        self.closed = False

    def fileno(self) -> int | None:
        """The channel, for the broker's selector."""
        return None if self.closed else self.channel.fileno()

    def check(
        self, sock: socket.socket, ticks: int, ident: int, socket_path: str, quiet: bool = False
    ) -> Verdict | None:
        """Ask; the verdict comes through :meth:`results` (a refusal now if the channel is gone)."""
        msg = json.dumps({"op": "check", "id": ident, "ticks": ticks, "quiet": quiet}).encode()
        try:
            with self._send_lock:
                send_message(self.channel, msg, (sock.fileno(),))
        except TimeoutError:
            return Verdict(False, None, "the broker is too busy to check clients now: retry")
        except OSError as exc:
            self.closed = True
            why = exc.strerror or type(exc).__name__
            return Verdict(False, None, f"the broker cannot check clients now (daemon gone: {why})")
        return None

    def results(self) -> list[tuple[int, Verdict]]:
        """Every verdict waiting on the channel."""
        out: list[tuple[int, Verdict]] = []
        while not self.closed:
            try:
                data, fds, _, _ = socket.recv_fds(self.channel, MAX_MESSAGE, 4)
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                break
            for fd in fds:  # the daemon never sends any
                with contextlib.suppress(OSError):
                    socket.close(fd)
            if not data:
                self.closed = True  # the daemon went away
                break
            with contextlib.suppress(ValueError, TypeError, KeyError):
                doc = json.loads(data)
                if doc.get("op") == "verdict":
                    out.append((int(doc["id"]), Verdict.from_message(doc)))
        return out

    def report(self, doc: dict[str, Any]) -> None:
        """Send the broker's health to the daemon (best effort)."""
        msg = json.dumps({"op": "health", "doc": doc}, default=str).encode()
        if len(msg) > MAX_MESSAGE:
            return
        try:
            with self._send_lock:
                self.channel.send(msg)
        except BlockingIOError:
            pass
        except OSError:
            self.closed = True


def clients_doc(config: Config) -> dict[str, list[str]]:
    """``broker.clients`` as logged (``broker_started``, the daemon's ``broker_clients``)."""
    clients = config.broker.clients
    return {
        "users": [str(p) for p in clients.users],
        "groups": [str(p) for p in clients.groups],
        "exes": list(clients.exes),
    }


def check_exes(config: Config, logger: Logger) -> None:
    """Warn about allowed exes that cannot be trusted (processes running them are refused)."""
    for exe in config.broker.clients.exes:
        problem = exe_trust_problem(exe)
        if problem:
            logger.warning(
                "broker_exe_untrusted",
                exe=exe,
                problem=problem,
                effect="processes running it are not allowed",
            )
