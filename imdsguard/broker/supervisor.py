"""The broker as the daemon runs it: a process of its own, as its own user, supervised.

Privilege separation (the fail2ban split, turned around: the part that
parses what any local user sends is the unprivileged one):

- The daemon (root, the firewall's owner) binds the broker's socket, so the
  socket file belongs to root in a root-owned directory and the broker
  cannot replace it, and resolves the broker's account
  (:func:`imdsguard.identity.broker_account`).
- The broker process (:mod:`imdsguard.broker.process`) runs as that account
  with no capability (bounding set included), no supplementary group and
  ``no_new_privs``, in one of two ways:

  - **unit** (``IMDSGUARD_BROKER_UNIT`` set, as ``imdsguard.service`` does):
    systemd runs it as ``imdsguard-broker.service``, a unit of its own with
    a tighter sandbox than the daemon's, and restarts it; it connects to the
    daemon's control socket (``/run/imdsguard/broker-control.sock``), which
    accepts only the broker's uid (``SO_PEERCRED``). The daemon needs no
    capability to switch users.
  - **spawn** (anywhere else, e.g. run by hand or in tests): the daemon
    starts it itself with one end of a socketpair; it drops privileges
    before it imports anything else; the daemon restarts it with backoff.

  Either way the daemon then hands it the settings and the listening
  socket (the hello) over that channel. The broker parses HTTP,
  keeps the credential cache and reaches IMDS as its own uid, which the
  firewall allowlists (no packet mark: any CAP_NET_RAW process can set one).
- Who may have credentials needs other users' ``/proc``: for each request
  the broker passes the connected socket to the daemon over the channel,
  and the daemon answers (:mod:`imdsguard.broker.checks`). The daemon also
  logs refusals, with attribution.

The daemon serves the broker only after the rules are in (it is not a
``BEFORE_RULES`` component); in spawn mode it restarts it when it exits
(backoff from 0.5 s, doubling to 30 s, back to 0.5 s after a minute of
uptime); it reports the process, its restarts (sessions) and its health
(sent by the broker every second) in ``status``; on stop it ends the
session (spawn: and the process; unit: ``PartOf=`` stops the unit); on
SIGHUP new clients apply at once, and a change of what the broker runs
with (socket, IMDS URL, limits, log format) ends the session, so the
broker starts over with the new settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import imdsguard
from imdsguard import paths
from imdsguard._log import Logger
from imdsguard.broker.checks import MAX_MESSAGE, Decider, check_exes, clients_doc, send_message
from imdsguard.broker.peer import ClientPolicy
from imdsguard.broker.process import BOOT, HEALTH_INTERVAL, settings
from imdsguard.broker.socketfile import answers, bind_socket, unlink_socket
from imdsguard.config import Config
from imdsguard.errors import BrokerError, ImdsGuardError
from imdsguard.identity import Account, broker_account

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # seconds of uptime after which a crash starts the backoff over
STALE_AFTER = 3 * HEALTH_INTERVAL + 2.0
STOP_TIMEOUT = 5.0
UNIT_ENV = "IMDSGUARD_BROKER_UNIT"


def control_socket() -> str:
    """Where the broker's unit connects to the daemon (unit mode)."""
    return os.path.join(paths.run_dir(), "broker-control.sock")


def _runs_with(config: Config) -> tuple[Any, ...]:
    """What the broker process is started with: a change means a restart."""
    return (config.imds_url, config.broker.limits, config.log_format, config.path)


class BrokerSupervisor:
    """The ``broker`` daemon component (start/stop/reconfigure/health); see the module docstring."""

    def __init__(self, config: Config, logger: Logger, proc_root: str = "/proc") -> None:
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
        self.unit = os.environ.get(UNIT_ENV) or None  # unit mode: systemd runs the broker
        self._control: socket.socket | None = None
        self._session_pid: int | None = None
        self._sessions = 0

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
                if self.unit:
                    self._control = _bind_control(control_socket())
                    self.log.info("broker_waiting", unit=self.unit, control=control_socket())
                else:
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
            if self._control is not None:
                self._control.close()
                self._control = None
                with contextlib.suppress(OSError):
                    os.unlink(control_socket())
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
                    if not self.unit:  # the unit's broker connects again by itself
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
            if self.unit:
                running = self._channel is not None
                pid = self._session_pid if running else None
            else:
                running = proc is not None and proc.poll() is None
                pid = proc.pid if running and proc is not None else None
            doc = dict(self._report)
            fresh = running and time.monotonic() - self._report_at < STALE_AFTER
            if not fresh:
                if not running and self.unit:
                    why = f"waiting for {self.unit} to connect (systemctl status {self.unit})"
                elif not running:
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
                "pid": pid,
                "unit": self.unit,
                "user": self.account.name if self.account else None,
                "uid": self.account.uid if self.account else None,
                "running": running,
                "restarts": self.restarts,
                "last_exit": self._last_exit,
                "uptime": round(time.monotonic() - self._spawned_at, 1) if running else None,
            }
            return doc

    # -- the process

    def _hello(self, channel: socket.socket) -> None:
        """The session's first message: the settings, and the listening socket."""
        assert self._listen is not None  # noqa: S101
        msg = json.dumps(settings(self.config)).encode()
        socket.send_fds(channel, [msg], [self._listen.fileno()])

    def _spawn(self) -> None:
        assert self._listen is not None and self.account is not None  # noqa: S101
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            opts = {
                "uid": self.account.uid,
                "gid": self.account.gid,
                "channel_fd": theirs.fileno(),
                "log_format": self.config.log_format,
            }
            root = os.path.dirname(os.path.dirname(os.path.abspath(imdsguard.__file__)))
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", BOOT, root, json.dumps(opts)],
                pass_fds=(theirs.fileno(),),
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
        self._hello(ours)
        ours.setblocking(False)
        self._channel = ours
        self._spawned_at = time.monotonic()
        self._next_spawn = None
        self._report, self._report_at = {}, 0.0
        self.log.info(
            "broker_process_started",
            clients=clients_doc(self.config),
            pid=self._proc.pid,
            user=self.account.name,
            uid=self.account.uid,
            socket=self.config.broker.socket,
            restarts=self.restarts,
        )

    def _end_process(self, why: str) -> None:
        """End the session (the broker stops serving at once); spawned: the process too."""
        proc, self._proc = self._proc, None
        if self._channel is not None:
            self._channel.close()  # the broker sees EOF and stops
            self._channel = None
        if proc is None:
            return
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
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
            channel, control = self._channel, self._control
        fds: list[Any] = [self._wake_r] + [f for f in (channel, control) if f is not None]
        ready, _, _ = select.select(fds, [], [], 0.25)
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                while os.read(self._wake_r, 4096):
                    pass
        with self._lock:
            if self._stopping.is_set():
                return
            mine = channel is not None and channel in ready and channel is self._channel
            if mine and channel is not None and not self._serve_channel(channel) and self.unit:
                self._last_exit = "disconnected"
                self.log.warning("broker_disconnected", unit=self.unit, pid=self._session_pid)
            if control is not None and control in ready and control is self._control:
                self._accept_session(control)
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

    def _accept_session(self, control: socket.socket) -> None:
        """A broker unit connects: only the broker's uid, one session at a time."""
        try:
            conn, _ = control.accept()
        except OSError:
            return
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid, _ = struct.unpack("3i", raw)
        expected = self.account.uid if self.account is not None else None
        if uid != expected:
            conn.close()
            self.log.warning("broker_control_refused", uid=uid, pid=pid, expected_uid=expected)
            return
        if self._channel is not None:  # a broker that restarted before we saw it go
            self._channel.close()
        try:
            self._hello(conn)
        except OSError as exc:
            conn.close()
            self.log.error("broker_unavailable", error=str(exc))
            return
        conn.setblocking(False)
        self._channel, self._session_pid = conn, pid
        self._sessions += 1
        self.restarts = self._sessions - 1
        self._spawned_at = time.monotonic()
        self._report, self._report_at = {}, 0.0
        self.log.info(
            "broker_process_started",
            clients=clients_doc(self.config),
            pid=pid,
            unit=self.unit,
            uid=uid,
            socket=self.config.broker.socket,
            restarts=self.restarts,
        )

    def _serve_channel(self, channel: socket.socket) -> bool:
        """Answer every question waiting on the channel, keep the health reports.

        False when the broker ended the session.
        """
        for _ in range(64):
            try:
                data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, 4)
            except BlockingIOError:
                return True
            except (ConnectionError, EOFError):
                data, fds = b"", []
            except OSError as exc:
                # Anything else (EMFILE receiving a client's socket...) is this
                # message's problem, not the session's: that request times out (503).
                self.log.error("broker_channel_error", error=exc.strerror or str(exc))
                return True
            if not data:
                for fd in fds:
                    os.close(fd)
                channel.close()  # the broker went away; its exit is seen next
                self._channel = None
                return False
            self._handle(channel, data, fds)
        return True

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
        with contextlib.suppress(OSError):  # TimeoutError included: that request gets a 503
            send_message(channel, json.dumps(verdict_doc).encode())

    def _close_socket(self) -> None:
        if self._listen is not None:
            self._listen.close()
            unlink_socket(self.config.broker.socket, self._socket_id)
            self._listen = None


def _bind_control(path: str) -> socket.socket:
    """The control socket the broker's unit connects to (0666: the uid is checked)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # only one daemon runs (its lock): a leftover of an earlier one
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)  # noqa: S103 - access control is by SO_PEERCRED
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


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
            if time.monotonic() >= deadline or not (os.path.exists(path) and answers(path)):
                raise
            time.sleep(0.1)
