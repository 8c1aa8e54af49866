"""The broker's socket server: HTTP/1.1 over a Unix socket, one event-loop thread.

Routes (see docs/contract.md, "Broker"):

- ``GET /v1/credentials``: 200 with the ``credential_process`` document for
  an allowed peer, 403 ``{"error": ...}`` for any other, 503 when nothing
  unexpired can be served.
- ``GET /v1/health``: 200 while credentials can be served (``status`` is
  ``ok`` or ``degraded``), else 503. Open to every local user: it holds no
  secret.
- Any other path is 404, any other method 405.

Why one selector loop rather than a thread per connection: a client that
connects and sends nothing (or a byte a second) then costs a file
descriptor and a few KiB, not a thread, and every connection has a hard
deadline for its whole request head. Connections are capped in total and
per uid, so one user cannot crowd out the others. Answering is immediate
from the cache; only when nothing is servable does a request wait (in a
small worker pool, bounded) for the refresher's fetch.

Who may have credentials is decided by a checker
(:mod:`imdsguard.broker.checks`): in the broker process, the privileged
daemon over a channel; in-process (:class:`~imdsguard.broker.checks.
InlineChecker`) when the broker runs with the privileges itself. The loop
never waits for it: a connection being checked is parked until its verdict
arrives.

The socket file (mode, directory, refusing a live socket, unlinking only
our own) is :mod:`imdsguard.broker.socketfile`; the HTTP head parser and
responses are :mod:`imdsguard.broker._http`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import queue
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imdsguard._log import Logger
from imdsguard.broker import _http
from imdsguard.broker.cache import CredentialCache, Refresher, RefreshPolicy
from imdsguard.broker.checks import (
    ChannelChecker,
    Decider,
    InlineChecker,
    Verdict,
    check_exes,
    clients_doc,
)
from imdsguard.broker.peer import ClientPolicy, boot_ticks, peer_cred
from imdsguard.broker.socketfile import bind_socket, unlink_socket
from imdsguard.config import BrokerLimits, Config
from imdsguard.errors import ImdsGuardError
from imdsguard.imds import Credentials, ImdsClient
from imdsguard.throttle import IntervalLimiter

CREDENTIALS_ROUTE = "/v1/credentials"
HEALTH_ROUTE = "/v1/health"
_BUSY_LOG_INTERVAL = 10.0
_FAILED_LOG_INTERVAL = 10.0  # per (uid, status >= 400): one broker_request line, then a count


#: What a client may cost the broker: ``broker.limits`` in the configuration.
Limits = BrokerLimits


class _Conn:
    """One client connection and where it is in its life."""

    __slots__ = (
        "buf",
        "checking",
        "deadline",
        "exe",
        "fd",
        "matched",
        "method",
        "out",
        "path",
        "pid",
        "sock",
        "started",
        "status",
        "ticks",
        "uid",
    )

    def __init__(self, sock: socket.socket, uid: int, pid: int | None, ticks: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.uid = uid
        self.pid = pid
        self.ticks = ticks
        self.started = time.monotonic()
        self.deadline: float | None = None
        self.buf = b""
        self.out = b""
        self.status: int | None = None
        self.method: str | None = None
        self.path: str | None = None
        self.exe: str | None = None
        self.matched: str | None = None
        self.checking: int | None = None  # the id of the check it waits for


def _peer_pid_uid(sock: socket.socket) -> tuple[int | None, int]:
    """(pid or None, uid) of the client; (None, -1) when the kernel cannot say."""
    try:
        pid, uid, _ = peer_cred(sock)
    except OSError:
        return None, -1
    return (pid if pid > 0 else None), uid


class Broker:
    """The credential broker, a daemon component (start/stop/reconfigure/health).

    ``checker`` decides who is a client (default: in-process, which needs
    the privileges to read other users' ``/proc``); ``listen`` is a
    listening socket bound by someone else (the daemon), which the broker
    then neither binds nor unlinks. ``imds``, ``refresh``, ``limits`` and
    ``proc_root`` are for tests.
    """

    def __init__(
        self,
        config: Config,
        logger: Logger,
        *,
        imds: ImdsClient | None = None,
        refresh: RefreshPolicy | None = None,
        limits: Limits | None = None,
        proc_root: str = "/proc",
        checker: InlineChecker | ChannelChecker | None = None,
        listen: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.log = logger
        self._given_limits = limits
        self.limits = limits or config.broker.limits
        self._refresh_policy = refresh
        self._given_imds = imds
        self._given_listen = listen
        self.checker = checker or InlineChecker(
            Decider(ClientPolicy(config.broker.clients), logger, proc_root)
        )
        self._check_ids = 0
        self._lock = threading.Lock()
        self._requests = 0
        self._by_status: collections.Counter[int] = collections.Counter()
        self._rejected = 0
        self._failed_log = IntervalLimiter(_FAILED_LOG_INTERVAL)
        self._running = False
        self._new_state()

    def _new_state(self) -> None:
        self.imds = self._given_imds or ImdsClient(self.config.imds_url)
        self.cache = CredentialCache(
            self.imds.role_credentials, self._refresh_policy, logger=self.log
        )
        self._refresher = Refresher(self.cache, self.log)
        self._listen: socket.socket | None = None
        self._socket_path = self.config.broker.socket
        self._socket_id: tuple[int, int] | None = None
        self._sel: selectors.BaseSelector | None = None
        self._conns: dict[int, _Conn] = {}
        self._checking: dict[int, _Conn] = {}
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._waiting = 0
        self._finished: queue.SimpleQueue[tuple[_Conn, int, dict[str, Any]]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._wake_r, self._wake_w = -1, -1
        self._accept_paused_until = 0.0
        self._busy_log = IntervalLimiter(_BUSY_LOG_INTERVAL, max_keys=1)
        self._channel_fd: int | None = None

    # -- life cycle

    def start(self) -> None:
        """Bind the socket, start fetching credentials and serving; BrokerError if impossible."""
        path = self.config.broker.socket
        if isinstance(self.checker, InlineChecker):
            check_exes(self.config, self.log)
        if self._given_listen is not None:
            self._listen, self._socket_id = self._given_listen, None
            self._listen.setblocking(False)
        else:
            self._listen, self._socket_id = bind_socket(path)
        self._socket_path = path
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._channel_fd = self.checker.fileno()
        if self._channel_fd is not None:
            self._sel.register(self._channel_fd, selectors.EVENT_READ, "check")
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="broker-wait")
        self._refresher.start()
        self._loop_thread = threading.Thread(target=self._loop, name="broker", daemon=True)
        self._running = True
        self._loop_thread.start()
        self.log.info(
            "broker_started",
            socket=path,
            imds=self.imds.url,
            # In the broker process the daemon holds the client policy (and logs it).
            clients=clients_doc(self.config) if isinstance(self.checker, InlineChecker) else None,
            uid=os.geteuid(),
        )

    def stop(self) -> None:
        """Stop serving, close and unlink the socket (only if it is still ours)."""
        if self._loop_thread is None:
            return
        self._stopping.set()
        self._wake()
        self._loop_thread.join(10)
        self._loop_thread = None
        self._running = False
        if self._pool is not None:
            # Waiting requests end within request_wait; only then may the wake pipe close.
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._refresher.stop()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.log.info("broker_stopped", socket=self._socket_path, requests=self._requests)

    def reconfigure(self, config: Config) -> None:
        """Adopt a new configuration: new clients at once; a new socket or IMDS URL restarts.

        Never raises: if the new socket cannot be used, the broker goes back
        to the old one (a reload must not take the daemon down).
        """
        old = self.config
        self.config = config
        if isinstance(self.checker, InlineChecker):
            self.checker.decider.policy = ClientPolicy(config.broker.clients)
        # New limits apply to new connections (the worker pool keeps its size).
        self.limits = self._given_limits or config.broker.limits
        if (old.broker.socket, old.imds_url) == (config.broker.socket, config.imds_url):
            if isinstance(self.checker, InlineChecker):
                check_exes(config, self.log)
            self.log.info("broker_reconfigured", socket=config.broker.socket)
            return
        self.stop()
        self._new_state()
        try:
            self.start()
        except ImdsGuardError as exc:
            self.log.error("broker_reconfigure_failed", error=str(exc), kept=old.broker.socket)
            # The new clients apply; the socket and IMDS URL stay as they were.
            self.config = dataclasses.replace(
                config,
                imds_url=old.imds_url,
                broker=dataclasses.replace(config.broker, socket=old.broker.socket),
            )
            self._new_state()
            try:
                self.start()
            except ImdsGuardError as again:
                self.log.error("broker_unavailable", error=str(again))
            return
        self.log.info("broker_reconfigured", socket=config.broker.socket)

    @property
    def serving(self) -> bool:
        """Whether the loop runs (it ends when stopped, or when the daemon's channel closes)."""
        return self._loop_thread is not None and self._loop_thread.is_alive()

    def health(self) -> dict[str, Any]:
        """For ``status`` and metrics: state, expiry, errors and counters; never a secret."""
        doc = self.cache.health()
        if not self._running:
            doc.update(status="unavailable", healthy=False, last_error="broker is not running")
        with self._lock:
            by_status = {str(k): v for k, v in sorted(self._by_status.items())}
            doc.update(
                requests=self._requests,
                requests_by_status=by_status,
                rejected_connections=self._rejected,
                connections=len(self._conns),
            )
        doc.update(imds_requests=self.imds.request_count, socket=self.config.broker.socket)
        return doc

    # -- the loop

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        sel = self._sel
        assert sel is not None  # noqa: S101 - set by start()
        try:
            while not self._stopping.is_set():
                try:
                    events = sel.select(self._timeout())
                    for key, mask in events:
                        self._on_event(key.data, mask)
                    self._deliver_finished()
                    self._expire()
                except Exception as exc:  # noqa: BLE001 - one bad connection must not stop serving
                    self.log.error("broker_loop_error", error=type(exc).__name__)
        finally:
            self._close_all()

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [c.deadline for c in self._conns.values() if c.deadline is not None]
        if self._accept_paused_until:
            deadlines.append(self._accept_paused_until)
        if not deadlines:
            return 1.0
        return max(0.0, min(min(deadlines) - now, 1.0))

    def _on_event(self, tag: Any, mask: int) -> None:
        if tag == "listen":
            self._accept()
        elif tag == "wake":
            with contextlib.suppress(OSError):
                while os.read(self._wake_r, 4096):
                    pass
        elif tag == "check":
            for ident, verdict in self.checker.results():
                conn = self._checking.pop(ident, None)
                if conn is not None and self._live(conn):
                    conn.checking = None
                    self._after_check(conn, verdict)
            if self.checker.closed and self._channel_fd is not None:
                assert self._sel is not None  # noqa: S101
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(self._channel_fd)
                self._stopping.set()  # the daemon is gone: so is the broker
        elif isinstance(tag, _Conn) and self._live(tag):
            if mask & selectors.EVENT_READ:
                self._on_read(tag)
            if mask & selectors.EVENT_WRITE and self._live(tag):
                self._flush(tag)

    def _accept(self) -> None:
        assert self._listen is not None and self._sel is not None  # noqa: S101
        for _ in range(64):
            try:
                sock, _ = self._listen.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # Out of file descriptors: stop accepting for a moment rather than spin.
                self.log.error("broker_accept_failed", error=exc.strerror or str(exc))
                self._sel.unregister(self._listen)
                self._accept_paused_until = time.monotonic() + 0.1
                return
            ticks = boot_ticks()
            sock.setblocking(False)
            pid, uid = _peer_pid_uid(sock)
            if (
                len(self._conns) >= self.limits.max_connections
                or self._per_uid[uid] >= self.limits.max_per_uid
            ):
                self._refuse_busy(sock, uid)
                continue
            conn = _Conn(sock, uid, pid, ticks)
            conn.deadline = conn.started + self.limits.read_timeout
            self._conns[conn.fd] = conn
            self._per_uid[uid] += 1
            self._sel.register(sock, selectors.EVENT_READ, conn)
            # The request has often arrived already (clients send right after
            # connect): serve it now rather than after another trip through select.
            self._on_read(conn)

    def _refuse_busy(self, sock: socket.socket, uid: int) -> None:
        with contextlib.suppress(OSError):
            sock.send(_http.response(503, {"error": "broker busy: too many connections"}))
            sock.recv(65536)  # what already arrived, so close() does not reset the answer
        sock.close()
        with self._lock:
            self._rejected += 1
            self._by_status[503] += 1
        if self._busy_log.allow()[0]:
            self.log.warning(
                "broker_busy",
                uid=uid,
                connections=len(self._conns),
                uid_connections=self._per_uid[uid],
                rejected_total=self._rejected,
            )

    def _on_read(self, conn: _Conn) -> None:
        data = _http.recv_some(conn.sock)
        if data is None:
            return
        if not data:
            self._close(conn)  # gone before a complete request: nothing to answer
            return
        conn.buf += data
        try:
            request = _http.parse_head(conn.buf, self.limits.max_header_bytes)
        except _http.HttpError as exc:
            self._reply(conn, exc.status, {"error": exc.message})
            return
        if request is not None:
            conn.method, conn.path = request.method, request.path
            self._dispatch(conn, request)

    def _dispatch(self, conn: _Conn, request: _http.Request) -> None:
        if request.path not in (CREDENTIALS_ROUTE, HEALTH_ROUTE):
            self._reply(conn, 404, {"error": f"no such path: use GET {CREDENTIALS_ROUTE}"})
            return
        if request.method != "GET":
            self._reply(conn, 405, {"error": "only GET is served"}, (("Allow", "GET"),))
            return
        self._check_ids += 1
        ident = self._check_ids
        # Health is open to everyone; it is checked too, quietly, for the exe in the log.
        verdict = self.checker.check(
            conn.sock,
            conn.ticks,
            ident,
            self.config.broker.socket,
            quiet=request.path == HEALTH_ROUTE,
        )
        if verdict is not None:
            self._after_check(conn, verdict)
            return
        # Parked until the verdict arrives (its deadline still runs).
        conn.checking = ident
        self._checking[ident] = conn
        self._unwatch(conn)

    def _after_check(self, conn: _Conn, verdict: Verdict) -> None:
        conn.exe = verdict.exe
        if conn.path == HEALTH_ROUTE:
            doc = self.health()
            public = {
                k: doc.get(k)
                for k in ("status", "healthy", "credentials_expire", "serving_until", "last_error")
            }
            self._reply(conn, 503 if doc["status"] == "unavailable" else 200, public)
            return
        if not verdict.allowed:
            self._reply(
                conn,
                403,
                {
                    "error": f"{verdict.reason}: ask an administrator to add this user, a group "
                    f"of it or the program to broker.clients in {self.config.path}"
                },
            )
            return
        conn.matched = verdict.matched
        creds = self.cache.current()
        if creds is not None:
            self._reply(conn, 200, creds.process_output())
            return
        if self._waiting >= self.limits.max_waiting or self._pool is None:
            self._reply(conn, 503, self._unavailable())
            return
        # Nothing servable: wait (off the loop) for the refresher's next fetch.
        self._waiting += 1
        self._unwatch(conn)
        conn.deadline = None
        self._pool.submit(self._wait_for_credentials, conn)

    def _unavailable(self) -> dict[str, Any]:
        error = self.cache.health().get("last_error") or "no credentials yet"
        return {"error": f"no unexpired credentials to serve: {error}"}

    def _wait_for_credentials(self, conn: _Conn) -> None:
        creds: Credentials | None = None
        try:
            creds = self.cache.wait_current()
        finally:
            if creds is not None:
                self._finished.put((conn, 200, creds.process_output()))
            else:
                self._finished.put((conn, 503, self._unavailable()))
            self._wake()

    def _deliver_finished(self) -> None:
        while True:
            try:
                conn, status, doc = self._finished.get_nowait()
            except queue.Empty:
                return
            self._waiting -= 1
            if self._live(conn):
                self._reply(conn, status, doc)

    def _expire(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            assert self._sel is not None and self._listen is not None  # noqa: S101
            self._sel.register(self._listen, selectors.EVENT_READ, "listen")
        for conn in [c for c in self._conns.values() if c.deadline and c.deadline <= now]:
            if conn.checking is not None:
                self._checking.pop(conn.checking, None)
                conn.checking = None
                self._reply(conn, 503, {"error": "the client check did not finish in time"})
            elif conn.out:
                self._close(conn)  # the client does not read its answer
            elif conn.buf:
                self._reply(conn, 408, {"error": "request head not received in time"})
            else:
                self._close(conn)  # connected and never said anything

    # -- answering

    def _unwatch(self, conn: _Conn) -> None:
        assert self._sel is not None  # noqa: S101
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)

    def _reply(
        self,
        conn: _Conn,
        status: int,
        doc: dict[str, Any],
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        conn.status = status
        conn.out = _http.response(status, doc, headers)
        conn.deadline = time.monotonic() + self.limits.write_timeout
        self._unwatch(conn)
        self._flush(conn)
        if self._live(conn) and conn.out:
            assert self._sel is not None  # noqa: S101
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)

    def _flush(self, conn: _Conn) -> None:
        left = _http.send_some(conn.sock, conn.out)
        if left is None:
            self._finish(conn, delivered=False)
            return
        conn.out = left
        if not conn.out:
            self._finish(conn, delivered=True)

    def _finish(self, conn: _Conn, delivered: bool) -> None:
        status = conn.status or 0
        with self._lock:
            self._requests += 1
            self._by_status[status] += 1
        extra: dict[str, Any] = {}
        if status >= 400 or status == 0:
            # Junk, slow or refused requests cost an abuser nothing to repeat:
            # one line per (uid, status) and interval keeps the journal usable.
            logged, held = self._failed_log.allow((conn.uid, status))
            if not logged:
                self._close(conn)
                return
            extra["suppressed_before"] = held
        log = self.log.debug if conn.path == HEALTH_ROUTE and status == 200 else self.log.info
        log(
            "broker_request",
            method=conn.method,
            path=conn.path,
            status=status,
            uid=conn.uid,
            pid=conn.pid,
            exe=conn.exe,
            allowed_as=conn.matched,
            delivered=delivered,
            ms=round((time.monotonic() - conn.started) * 1000, 2),
            **extra,
        )
        self._close(conn)

    def _live(self, conn: _Conn) -> bool:
        # By identity: a closed connection's fd number may already be a new one's.
        return self._conns.get(conn.fd) is conn

    def _close(self, conn: _Conn) -> None:
        if not self._live(conn):
            return
        self._unwatch(conn)
        del self._conns[conn.fd]
        if conn.checking is not None:
            self._checking.pop(conn.checking, None)
        self._per_uid[conn.uid] -= 1
        if self._per_uid[conn.uid] <= 0:
            del self._per_uid[conn.uid]
        conn.out = b""
        # Unread input would turn our close into a reset that can cost the
        # client our answer (e.g. a 431 sent while it was still writing).
        with contextlib.suppress(OSError):
            for _ in range(16):
                if not conn.sock.recv(4096):
                    break
        conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._sel is not None:
            self._sel.close()
        if self._listen is not None:
            self._listen.close()
            if self._given_listen is None:  # a socket bound by the daemon is the daemon's
                unlink_socket(self._socket_path, self._socket_id)
            self._listen = None
