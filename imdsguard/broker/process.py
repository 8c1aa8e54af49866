"""The broker process: started by the daemon, as the broker's own user, with nothing else.

The daemon (root) runs ``python -I -c BOOT SETTINGS`` with two inherited
file descriptors: the broker's listening socket (bound by the daemon, so
root owns the socket file) and the broker's end of the check channel
(:mod:`imdsguard.broker.checks`). :func:`main` first sheds every privilege
(:func:`drop_privileges`), before it imports anything else or reads a
byte from a client, then serves until the daemon tells it to stop
(SIGTERM) or goes away (the channel closes).

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

#: What the daemon runs (``python -I -c BOOT PKGROOT SETTINGS``): -I ignores
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
    """Run the broker with the daemon's ``SETTINGS`` (JSON, see :func:`settings`)."""
    opts = json.loads(argv[0])
    try:
        drop_privileges(int(opts["uid"]), int(opts["gid"]))
    except OSError as exc:
        # Before logging is set up (it imports structlog): one JSON line, then exit.
        sys.stdout.write(
            json.dumps({"event": "broker_privileges_not_dropped", "error": str(exc)}) + "\n"
        )
        return 70
    return _serve(opts)


def _serve(opts: dict[str, Any]) -> int:
    import socket  # noqa: PLC0415 - imported only once privileges are gone

    from imdsguard import _log  # noqa: PLC0415
    from imdsguard.broker.checks import ChannelChecker  # noqa: PLC0415
    from imdsguard.broker.server import Broker  # noqa: PLC0415
    from imdsguard.config import BrokerConfig, BrokerLimits, Config  # noqa: PLC0415

    _log.configure(opts["log_format"])
    log = _log.get_logger()
    listen = socket.socket(fileno=int(opts["listen_fd"]))
    channel = socket.socket(fileno=int(opts["channel_fd"]))
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
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the daemon reloads; it restarts us if need be
    broker.start()
    try:
        while not stop.wait(HEALTH_INTERVAL):
            if checker.closed or not broker.serving:
                log.warning("broker_daemon_gone", effect="the broker stops")
                break
            checker.report(broker.health())
        checker.report(broker.health())
    finally:
        broker.stop()
    return 0


def settings(config: Any, uid: int, gid: int, listen_fd: int, channel_fd: int) -> dict[str, Any]:
    """What the broker process needs from the daemon's ``config`` (no client policy: the
    daemon decides that)."""
    import dataclasses  # noqa: PLC0415

    return {
        "uid": uid,
        "gid": gid,
        "listen_fd": listen_fd,
        "channel_fd": channel_fd,
        "config": config.path,
        "socket": config.broker.socket,
        "imds_url": config.imds_url,
        "log_format": config.log_format,
        "limits": dataclasses.asdict(config.broker.limits),
    }
