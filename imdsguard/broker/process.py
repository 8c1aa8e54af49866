"""The broker process: started by the daemon, as the broker's own user, with nothing else.

Two ways in, one session protocol:

- under systemd, ``imdsguard broker-serve`` in ``imdsguard-broker.service``
  (``User=imdsguard-broker``, its own sandbox): :func:`unit_main` connects to
  the daemon's control socket;
- elsewhere the daemon (root) runs ``python -I -c BOOT PKGROOT ARGS`` with
  one inherited file descriptor, the broker's end of a socketpair, and
  :func:`main` first sheds every privilege (:func:`drop_privileges`),
  before it imports anything else or reads a byte from a client.

Either way the daemon then sends the hello (settings, and the listening
socket it bound, so root owns the socket file) and the channel carries the
client checks (:mod:`imdsguard.broker.checks`); the broker serves until the
daemon ends the session (the channel closes) or SIGTERM.

Nothing here needs privileges: the firewall lets the broker's uid reach
IMDS, and the daemon answers who may have credentials.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

#: What the daemon runs (``python -I -c BOOT PKGROOT ARGS``): -I ignores
#: PYTHON* variables and the current directory; the package root comes first.
BOOT = (
    "import sys; sys.dont_write_bytecode = True; sys.path.insert(0, sys.argv[1]); "
    "from imdsguard.broker.process import main; sys.exit(main(sys.argv[2:]))"
)

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
HEALTH_INTERVAL = 1.0


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 63


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``:``gid`` with no supplementary group and no capability, for good.

    Every capability leaves the bounding set (no exec can bring one back),
    the ambient set is cleared, then groups, gid and uid change (real,
    effective and saved: no way back to root), and ``no_new_privs`` makes
    setuid and file-capability binaries powerless. Checked afterwards from
    ``/proc/self/status``; any failure raises and the process must exit.
    """
    if uid == 0:
        raise PermissionError("refusing to run the broker as root")
    if os.geteuid() == 0:
        for cap in range(_cap_last() + 1):
            _prctl(PR_CAPBSET_DROP, cap)
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError(f"could not become uid {uid} gid {gid}")
    caps = capabilities()
    if any(caps[k] for k in ("CapEff", "CapPrm", "CapInh", "CapAmb")):
        raise PermissionError(f"capabilities left after dropping privileges: {caps}")


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """The capability sets of ``pid`` from ``/proc/<pid>/status`` (as bit masks)."""
    caps: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.startswith("Cap"):
                caps[key] = int(value.strip(), 16)
    return caps


def main(argv: Sequence[str]) -> int:
    """The spawned broker (``ARGS``: JSON with uid, gid, channel_fd, log_format)."""
    opts = json.loads(argv[0])
    try:
        drop_privileges(int(opts["uid"]), int(opts["gid"]))
    except OSError as exc:
        # Before logging is set up (it imports structlog): one JSON line, then exit.
        sys.stdout.write(
            json.dumps({"event": "broker_privileges_not_dropped", "error": str(exc)}) + "\n"
        )
        return 70
    import socket  # noqa: PLC0415 - imported only once privileges are gone

    stop = _stop_on_signals()
    serve_session(socket.socket(fileno=int(opts["channel_fd"])), stop, opts["log_format"])
    return 0


def unit_main(control: str) -> int:
    """``imdsguard broker-serve``: the broker as its own systemd unit (imdsguard-broker.service).

    systemd has made it the broker's user, without capabilities. It connects
    to the daemon's control socket (``control``, which it retries while the
    daemon is away or the broker is disabled), is handed the listening
    socket and its settings, serves, and connects again when the daemon
    ends the session (a reload that changes what it runs with, or a daemon
    restart).
    """
    import socket  # noqa: PLC0415

    from imdsguard import _log  # noqa: PLC0415

    if os.geteuid() == 0:
        sys.stderr.write("imdsguard: error: broker-serve must not run as root (User=)\n")
        return 2
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _log.configure("json")
    log = _log.get_logger()
    stop = _stop_on_signals()
    delay, waited = 0.2, False
    while not stop.is_set():
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            channel.connect(control)
        except OSError as exc:
            channel.close()
            if not waited:
                log.info("broker_waiting_for_daemon", control=control, error=exc.strerror)
                waited = True
            stop.wait(delay)
            delay = min(delay * 2, 5.0)
            continue
        delay, waited = 0.2, False
        serve_session(channel, stop, "json")
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the daemon reloads and tells us
    return stop


def serve_session(channel: Any, stop: threading.Event, log_format: str) -> None:
    """Serve what the daemon hands over on ``channel`` until it ends the session or ``stop``.

    The first message is the hello: :func:`settings` as JSON, with the
    listening socket (``SCM_RIGHTS``).
    """
    import socket  # noqa: PLC0415

    from imdsguard import _log  # noqa: PLC0415
    from imdsguard.broker.checks import MAX_MESSAGE, ChannelChecker  # noqa: PLC0415
    from imdsguard.broker.server import Broker  # noqa: PLC0415
    from imdsguard.config import BrokerConfig, BrokerLimits, Config  # noqa: PLC0415

    _log.configure(log_format)
    log = _log.get_logger()
    try:
        data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, 1)
    except OSError:
        data, fds = b"", []
    if not data or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        channel.close()
        return
    opts = json.loads(data)
    if opts.get("log_format", log_format) != log_format:
        _log.configure(opts["log_format"])
        log = _log.get_logger()
    listen = socket.socket(fileno=fds[0])
    config = Config(
        path=opts["config"],
        imds_url=opts["imds_url"],
        log_format=opts["log_format"],
        broker=BrokerConfig(
            enabled=True, socket=opts["socket"], limits=BrokerLimits(**opts["limits"])
        ),
    )
    checker = ChannelChecker(channel)
    broker = Broker(config, log, checker=checker, listen=listen)
    broker.start()
    checker.report(broker.health())  # at once: status need not wait a second to see it
    try:
        while not stop.wait(HEALTH_INTERVAL):
            if checker.closed or not broker.serving:
                break
            checker.report(broker.health())
        if not checker.closed:
            checker.report(broker.health())
    finally:
        broker.stop()
        channel.close()


def settings(config: Any) -> dict[str, Any]:
    """The hello's settings: what the broker needs from the daemon's ``config`` (no client
    policy: the daemon decides that)."""
    import dataclasses  # noqa: PLC0415

    return {
        "config": config.path,
        "socket": config.broker.socket,
        "imds_url": config.imds_url,
        "log_format": config.log_format,
        "limits": dataclasses.asdict(config.broker.limits),
    }
