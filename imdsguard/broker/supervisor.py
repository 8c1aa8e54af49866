"""The broker as the daemon runs it: a process of its own, as its own user, supervised.

Privilege separation (the fail2ban split, turned around: the part that
parses what any local user sends is the unprivileged one):

- The daemon (root, the firewall's owner) binds the broker's socket, so the
  socket file belongs to root in a root-owned directory and the broker
  cannot replace it; it resolves the broker's account
  (:func:`imdsguard.identity.broker_account`) and starts
  :mod:`imdsguard.broker.process` with the listening socket and one end of
  a socketpair, the check channel.
- The broker process drops to that account at once: no capability (bounding
  set included), no supplementary group, ``no_new_privs``. It parses HTTP,
  keeps the credential cache and reaches IMDS as its own uid, which the
  firewall allowlists (no packet mark: any CAP_NET_RAW process can set one).
- Who may have credentials needs other users' ``/proc``: for each request
  the broker passes the connected socket to the daemon over the channel,
  and the daemon answers (:mod:`imdsguard.broker.checks`). The daemon also
  logs refusals, with attribution.

The daemon starts the broker after the rules are in (it is not a
``BEFORE_RULES`` component), restarts it when it exits (backoff from 0.5 s,
doubling to 30 s, back to 0.5 s after a minute of uptime), reports its
process, restarts and health (sent by the broker every second) in
``status``, stops it on stop, and on SIGHUP applies new clients at once and
restarts it only when what it runs with changed (socket, IMDS URL, limits,
log format).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import imdsguard
from imdsguard.broker.checks import MAX_MESSAGE, Decider
from imdsguard.broker.peer import ClientPolicy
from imdsguard.broker.process import BOOT, HEALTH_INTERVAL, settings
from imdsguard.broker.server import _answers, bind_socket, check_exes, unlink_socket
from imdsguard.config import Config
from imdsguard.errors import BrokerError, ImdsGuardError
from imdsguard.identity import Account, broker_account

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # seconds of uptime after which a crash starts the backoff over
STALE_AFTER = 3 * HEALTH_INTERVAL + 2.0
STOP_TIMEOUT = 5.0


def _runs_with(config: Config) -> tuple[Any, ...]:
    """What the broker process is started with: a change means a restart."""
    return (config.imds_url, config.broker.limits, config.log_format, config.path)


class BrokerSupervisor:
    """The ``broker`` daemon component (start/stop/reconfigure/health); see the module docstring."""

    def __init__(self, config: Config, logger: Any, proc_root: str = "/proc") -> None:
        self.config = config
        self.log = logger
        self.decider = Decider(ClientPolicy(config.broker.clients), logger, proc_root)
        self.account: Account | None = None
        self.restarts = 0
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._listen: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._spawned_at = 0.0
        self._next_spawn: float | None = None
        self._backoff = FIRST_BACKOFF
        self._last_exit: str | None = None
        self._report: dict[str, Any] = {}
        self._report_at = 0.0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- life cycle

    def start(self) -> None:
        """Bind the socket and start the broker process; BrokerError if impossible."""
        try:
            self.account = broker_account()
        except ImdsGuardError as exc:
            raise BrokerError(str(exc)) from None
        check_exes(self.config, self.log)
        self._listen, self._socket_id = _bind(self.config.broker.socket)
        try:
            with self._lock:
                self._spawn()
        except OSError as exc:
            self._close_socket()
            raise BrokerError(f"cannot start the broker process: {exc}") from None
        self._stopping.clear()
        self._thread = threading.Thread(target=self._supervise, name="broker-supervisor")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop the broker process, close and unlink the socket (only if still ours)."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with self._lock:
            self._end_process("stop")
            self._close_socket()
        self.log.info("broker_process_stopped", restarts=self.restarts)

    def reconfigure(self, config: Config) -> None:
        """New clients at once; a new socket, IMDS URL, limits or log format restart the
        broker. Never raises: a socket that cannot be used keeps the old one."""
        with self._lock:
            old = self.config
            self.decider.policy = ClientPolicy(config.broker.clients)
            check_exes(config, self.log)
            restart = _runs_with(old) != _runs_with(config)
            if config.broker.socket != old.broker.socket:
                try:
                    listen, ident = _bind(config.broker.socket)
                except ImdsGuardError as exc:
                    self.log.error(
                        "broker_reconfigure_failed", error=str(exc), kept=old.broker.socket
                    )
                    broker = dataclasses.replace(config.broker, socket=old.broker.socket)
                    config = dataclasses.replace(config, broker=broker)
                else:
                    self._close_socket()
                    self._listen, self._socket_id = listen, ident
                    restart = True
            self.config = config
            if restart:
                self._end_process("reconfigure")
                try:
                    self._spawn()
                except OSError as exc:
                    self.log.error("broker_unavailable", error=str(exc))
                    self._next_spawn = time.monotonic() + self._backoff
        self._wake()
        self.log.info("broker_reconfigured", socket=config.broker.socket, restarted=restart)

    def health(self) -> dict[str, Any]:
        """The broker's own report (fresh, or it is not healthy) and its process; no secret."""
        with self._lock:
            proc = self._proc
            running = proc is not None and proc.poll() is None
            doc = dict(self._report)
            fresh = running and time.monotonic() - self._report_at < STALE_AFTER
            if not fresh:
                if not running:
                    why = "the broker process is not running" + (
                        f" (it {self._last_exit}; restarting)" if self._last_exit else ""
                    )
                elif not self._report:
                    why = "the broker process is starting"
                else:
                    why = "the broker process stopped reporting"
                doc.update(status="unavailable", healthy=False, last_error=why)
            doc["socket"] = self.config.broker.socket
            doc["process"] = {
                "pid": proc.pid if running and proc is not None else None,
                "user": self.account.name if self.account else None,
                "uid": self.account.uid if self.account else None,
                "running": running,
                "restarts": self.restarts,
                "last_exit": self._last_exit,
                "uptime": round(time.monotonic() - self._spawned_at, 1) if running else None,
            }
            return doc

    # -- the process

    def _spawn(self) -> None:
        assert self._listen is not None and self.account is not None  # noqa: S101
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            opts = settings(
                self.config,
                self.account.uid,
                self.account.gid,
                self._listen.fileno(),
                theirs.fileno(),
            )
            root = os.path.dirname(os.path.dirname(os.path.abspath(imdsguard.__file__)))
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", BOOT, root, json.dumps(opts)],
                pass_fds=(self._listen.fileno(), theirs.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=sys.stdout,
                stderr=subprocess.STDOUT,
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._channel = ours
        self._spawned_at = time.monotonic()
        self._next_spawn = None
        self._report, self._report_at = {}, 0.0
        self.log.info(
            "broker_process_started",
            pid=self._proc.pid,
            user=self.account.name,
            uid=self.account.uid,
            socket=self.config.broker.socket,
            restarts=self.restarts,
        )

    def _end_process(self, why: str) -> None:
        """Stop the current process (SIGTERM, then SIGKILL) and forget it."""
        proc, self._proc = self._proc, None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.log.warning("broker_process_killed", pid=proc.pid, reason=why)

    def _exited(self, proc: subprocess.Popen[bytes]) -> None:
        code = proc.returncode
        self._last_exit = f"was killed by signal {-code}" if code < 0 else f"exited {code}"
        uptime = time.monotonic() - self._spawned_at
        if uptime >= STABLE_AFTER:
            self._backoff = FIRST_BACKOFF
        delay = self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        self._proc = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._next_spawn = time.monotonic() + delay
        self.log.error(
            "broker_process_exited",
            pid=proc.pid,
            returncode=code,
            uptime=round(uptime, 1),
            restart_in=delay,
            restarts=self.restarts,
        )

    # -- the supervisor thread

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - supervision must go on
                self.log.error("broker_supervisor_error", error=f"{type(exc).__name__}: {exc}")
                time.sleep(0.5)

    def _tick(self) -> None:
        with self._lock:
            channel = self._channel
        fds: list[Any] = [self._wake_r] + ([channel] if channel is not None else [])
        ready, _, _ = select.select(fds, [], [], 0.25)
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                while os.read(self._wake_r, 4096):
                    pass
        with self._lock:
            if self._stopping.is_set():
                return
            if channel is not None and channel in ready and channel is self._channel:
                self._serve_channel(channel)
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                self._exited(proc)
            due = self._next_spawn
            if self._proc is None and due is not None and time.monotonic() >= due:
                self.restarts += 1
                try:
                    self._spawn()
                except OSError as exc:
                    self.log.error("broker_unavailable", error=str(exc))
                    self._next_spawn = time.monotonic() + self._backoff

    def _serve_channel(self, channel: socket.socket) -> None:
        """Answer every question waiting on the channel, keep the health reports."""
        for _ in range(64):
            try:
                data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, 4)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                channel.close()  # the broker went away; its exit is seen next
                self._channel = None
                return
            self._handle(channel, data, fds)

    def _handle(self, channel: socket.socket, data: bytes, fds: list[int]) -> None:
        try:
            doc = json.loads(data)
            op = doc.get("op") if isinstance(doc, dict) else None
        except ValueError:
            op = None
        if op == "health" and isinstance(doc.get("doc"), dict):
            self._report, self._report_at = doc["doc"], time.monotonic()
        if op != "check" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        try:
            client = socket.socket(fileno=fds[0])
        except OSError:
            os.close(fds[0])
            return
        with client:
            if client.family != socket.AF_UNIX:
                verdict_doc = {"op": "verdict", "id": doc.get("id"), "allowed": False}
            else:
                ticks = doc.get("ticks") if isinstance(doc.get("ticks"), int) else 0
                quiet = doc.get("quiet") is True
                verdict = self.decider.decide(client, ticks, self.config.broker.socket, quiet)
                verdict_doc = verdict.to_message(doc.get("id", 0))
        with contextlib.suppress(OSError):
            channel.send(json.dumps(verdict_doc).encode())

    def _close_socket(self) -> None:
        if self._listen is not None:
            self._listen.close()
            unlink_socket(self.config.broker.socket, self._socket_id)
            self._listen = None


def _bind(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """:func:`bind_socket`, waiting up to 3 s for a broker of a killed daemon to exit.

    Only one daemon runs (its lock), so a broker listening at our path is an
    orphan of a daemon killed a moment ago: it exits once its channel closes.
    """
    deadline = time.monotonic() + 3.0
    while True:
        try:
            return bind_socket(path)
        except BrokerError:
            if time.monotonic() >= deadline or not (os.path.exists(path) and _answers(path)):
                raise
            time.sleep(0.1)
