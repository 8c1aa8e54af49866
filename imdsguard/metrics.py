"""Prometheus metrics: a textfile for node_exporter, or a loopback ``/metrics`` endpoint.

The text exposition format is small and stable, so it is written here rather
than pulling prometheus-client into the RPM; the tests parse the output with
prometheus-client's own parser.

Every counter only goes up while the daemon runs, so that ``rate()`` and
``increase()`` alarms mean what they say. That is why the per-user/exe
label set is sticky rather than a "top N" re-ranked on every scrape (a
process dropping out of a top list would make its series vanish and the
``other`` bucket jump): a (user, exe) pair that gets a series of its own
keeps it, up to ``MAX_SERIES`` pairs; pairs first seen after that are
counted in ``other`` for good.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import selectors
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

from imdsguard._log import Logger
from imdsguard.broker import _http
from imdsguard.config import MetricsConfig
from imdsguard.errors import ImdsGuardError
from imdsguard.events.packet import IPPROTO_TCP
from imdsguard.firewall.base import FamilyState
from imdsguard.throttle import IntervalLimiter

MAX_SERIES = 50
FAMILIES = ("ipv4", "ipv6")
RULE_STATES = (FamilyState.OK, FamilyState.MISSING, FamilyState.DRIFTED, FamilyState.DISABLED)
OTHER = ("other", "other")
Collect = Callable[[], dict[str, Any]]


def format_value(value: float) -> str:
    """A sample value, exactly: integers as integers, floats with every digit they have.

    ``repr`` of a float is its shortest round-trip form (1796174521.389, not
    the 6-digit ``1.79617e+09`` of ``%g``), so a scrape reads back the value
    the daemon held; counters past a million keep counting by one.
    """
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {format_value(value)}")


class ProcessSeries:
    """Which (user, exe) pairs get a series of their own (see the module docstring).

    Thread-safe: the endpoint's threads and the textfile writer share one.
    """

    def __init__(self, cap: int = MAX_SERIES) -> None:
        self.cap = cap
        self._own: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def samples(self, counts: dict[tuple[str, str], int]) -> list[tuple[dict[str, str], int]]:
        """One sample per pair with a series, plus ``other`` for the rest (once non-zero)."""
        with self._lock:
            # New pairs are admitted busiest first while there is room; once
            # full, never again (so a pair counted in ``other`` stays there).
            new = sorted(
                (k for k in counts if k not in self._own and k != OTHER),
                key=lambda k: (-counts[k], k),
            )
            self._own.update(new[: max(0, self.cap - len(self._own))])
            own = sorted(k for k in counts if k in self._own)
        samples = [({"user": u, "exe": e}, counts[(u, e)]) for u, e in own]
        rest = sum(n for k, n in counts.items() if k not in self._own)
        if rest:
            samples.append(({"user": OTHER[0], "exe": OTHER[1]}, rest))
        return samples


def render(snap: dict[str, Any], series: ProcessSeries | None = None) -> str:
    """The exposition text for a daemon snapshot (see ``Daemon.metrics_snapshot``).

    ``series``: the exporter's sticky per-process label set (a fresh one when
    rendering once).
    """
    w = _Writer()
    w.metric(
        "imdsguard_build_info",
        "gauge",
        "Version, backend and mode of the running daemon.",
        [({"version": snap["version"], "backend": snap["backend"], "mode": snap["mode"]}, 1)],
    )
    up = bool(snap.get("up", True))
    w.metric(
        "imdsguard_daemon_up",
        "gauge",
        "1 while the daemon runs; its last textfile says 0 (the rules stay, unwatched).",
        [({}, 1 if up else 0)],
    )
    w.metric(
        "imdsguard_protected",
        "gauge",
        "1 when rules are in place for every enabled family in enforce mode and the daemon "
        "watches them.",
        [({}, 1 if snap["protected"] and up else 0)],
    )
    rules = snap.get("rules", {})
    w.metric(
        "imdsguard_rules_state",
        "gauge",
        "Each address family's rules: 1 for the state they are in, 0 for every other state.",
        [
            ({"family": family, "state": state}, 1 if rules.get(family) == state else 0)
            for family in sorted(set(FAMILIES) | set(rules))
            for state in RULE_STATES
        ],
    )
    w.metric(
        "imdsguard_rules_restored_total",
        "counter",
        "Times the daemon found its rules tampered with and put them back.",
        [({}, snap.get("rules_restored_total", 0))],
    )
    w.metric(
        "imdsguard_config_reload_failures_total",
        "counter",
        "SIGHUP reloads refused (config invalid, or its rules or components could not be "
        "put in place); the previous policy stayed.",
        [({}, snap.get("reload_failures", 0))],
    )
    w.metric(
        "imdsguard_blocked_total",
        "counter",
        "IMDS connection attempts denied (in audit mode: audited) since the daemon started, "
        "each counted once (SYN retransmits folded), including those the rate limit kept "
        "out of the event log.",
        [({}, snap.get("blocked_total", 0))],
    )
    w.metric(
        "imdsguard_blocked_by_process_total",
        "counter",
        "Blocked attempts written to the event log, by user and executable (the first "
        f"{MAX_SERIES} pairs seen have their own series, later ones count as other).",
        (series or ProcessSeries()).samples(snap.get("blocked_by", {})),
    )
    w.metric(
        "imdsguard_broker_requests_total",
        "counter",
        "Credential broker requests by HTTP status.",
        [({"status": str(s)}, n) for s, n in sorted(snap.get("broker_requests", {}).items())]
        or [({"status": "200"}, 0)],
    )
    w.metric(
        "imdsguard_broker_healthy",
        "gauge",
        "1 when the broker can serve unexpired credentials (absent when disabled).",
        [] if snap.get("broker_healthy") is None else [({}, 1 if snap["broker_healthy"] else 0)],
    )
    w.metric(
        "imdsguard_last_update_timestamp_seconds",
        "gauge",
        "When these figures were taken.",
        [({}, snap.get("updated", time.time()))],
    )
    _process_metrics(w, snap.get("process") or {})
    return "\n".join(w.lines) + "\n"


#: The standard ``process_*`` metrics (as prometheus-client's process collector names them).
_PROCESS_METRICS = (
    ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds."),
    ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
    ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
    ("process_open_fds", "gauge", "Number of open file descriptors."),
    ("process_max_fds", "gauge", "Maximum number of open file descriptors."),
    (
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
    ),
)


def _process_metrics(w: _Writer, facts: dict[str, float]) -> None:
    for name, kind, help_text in _PROCESS_METRICS:
        if facts.get(name) is not None:  # a fact we could not read is left out, not 0
            w.metric(name, kind, help_text, [({}, facts[name])])


def process_facts(proc: str = "/proc/self") -> dict[str, float]:
    """The ``process_*`` figures of this process from ``/proc`` (each one skipped on error).

    Read by hand (as prometheus-client's collector does) rather than through
    psutil: five small files, no extra dependency in the daemon's hot loop.
    """
    facts: dict[str, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open(f"{proc}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
        fields = stat[stat.rindex(")") + 2 :].split()
        # After "pid (comm) ": state is fields[0]; utime 11, stime 12, starttime 19,
        # vsize 20, rss 21 (proc(5), numbered from state as 0).
        facts["process_cpu_seconds_total"] = (int(fields[11]) + int(fields[12])) / ticks
        facts["process_virtual_memory_bytes"] = int(fields[20])
        facts["process_resident_memory_bytes"] = int(fields[21]) * page
        with open("/proc/stat", "rb") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
        facts["process_start_time_seconds"] = btime + int(fields[19]) / ticks
    except (OSError, ValueError, IndexError, StopIteration):
        pass  # each figure is optional; the others still go out
    # EMFILE itself makes the fd directory unreadable: better absent than a wrong figure.
    with contextlib.suppress(OSError):
        facts["process_open_fds"] = len(os.listdir(f"{proc}/fd"))
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        facts["process_max_fds"] = soft
    return facts


def write_textfile(path: str, text: str) -> None:
    """Replace ``path`` atomically (node_exporter must never read half a file)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".imdsguard.", suffix=".prom.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class MetricsExporter:
    """Daemon component: keeps the textfile fresh and/or serves ``/metrics``."""

    def __init__(self, config: MetricsConfig, collect: Collect, logger: Logger) -> None:
        self.collect = collect
        self.log = logger
        self.interval = 15.0
        self._series = ProcessSeries()  # kept across reconfigure: counters never jump
        self._reset(config)

    def _reset(self, config: MetricsConfig) -> None:
        self.config = config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: MetricsServer | None = None
        self._errors = 0

    def render(self, up: bool = True) -> str:
        """The current exposition text (``up=False``: the daemon's last word)."""
        snap = dict(self.collect())
        snap["process"] = process_facts()
        if not up:
            snap["up"] = False
        return render(snap, self._series)

    def start(self) -> None:
        """Bind the endpoint (if configured) and start refreshing the textfile."""
        if self.config.listen is not None:
            host, port = self.config.listen
            try:
                self._server = MetricsServer(self.config.listen, self.render, self.log)
            except OSError as exc:
                raise ImdsGuardError(
                    f"metrics.listen: cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from None
            self._server.start()
        if self.config.textfile is not None:
            self._thread = threading.Thread(target=self._loop, name="metrics-file", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.write_now()
            self._stop.wait(self.interval)

    def write_now(self, up: bool = True) -> None:
        """Write the textfile once (also called by the daemon after notable changes)."""
        if self.config.textfile is None:
            return
        try:
            write_textfile(self.config.textfile, self.render(up))
        except Exception as exc:  # noqa: BLE001 - metrics must never take the daemon down
            self._errors += 1
            self.log.error("metrics_write_failed", path=self.config.textfile, error=str(exc))

    def _halt(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stop(self) -> None:
        """Stop serving and leave a last textfile that says the daemon is down.

        ``imdsguard_daemon_up 0`` and ``imdsguard_protected 0``: the rules
        stay in the kernel (fail closed), but nobody watches or repairs them,
        which is what ``status`` calls not protected too.
        """
        self._halt()
        self.write_now(up=False)

    def reconfigure(self, config: Any) -> None:
        """Adopt a new config: restart when the metrics section changed.

        Raises ImdsGuardError when the new endpoint cannot be bound; the old
        one is back in service by then (the daemon rolls the reload back).
        """
        if config.metrics == self.config:
            return
        old = self.config
        self._halt()
        if old.textfile is not None and old.textfile != config.metrics.textfile:
            self.write_now(up=False)  # nobody refreshes the old file any more
        self._reset(config.metrics)
        try:
            self.start()
        except ImdsGuardError:
            self._reset(old)
            try:
                self.start()
            except ImdsGuardError as again:
                self.log.error("metrics_unavailable", error=str(again))
            raise

    def health(self) -> dict[str, Any]:
        """For ``status``."""
        out: dict[str, Any] = {
            "textfile": self.config.textfile,
            "listen": None
            if self.config.listen is None
            else ":".join(map(str, self.config.listen)),
            "write_errors": self._errors,
        }
        if self._server is not None:
            out.update(self._server.stats())
        return out


# --- the endpoint -----------------------------------------------------------------

#: Limits of the ``/metrics`` endpoint. A scrape is one short request from a
#: Prometheus (or an agent) on this host; nothing legitimate needs more.
MAX_CONNECTIONS = 32
MAX_PER_UID = 4
DEADLINE = 5.0  # for the whole exchange: request head in, response out
MAX_HEAD = 4096
ACCEPT_PAUSE = 0.5  # after EMFILE/ENFILE/ENOMEM on accept, before trying again
_LOG_INTERVAL = 10.0


@dataclass
class _Conn:
    sock: socket.socket
    key: Any  # the peer's uid (or address, when sock_diag cannot tell)
    deadline: float
    inbuf: bytes = b""
    outbuf: bytes = b""
    replied: bool = False


class MetricsServer:
    """``GET /metrics`` on a loopback address: one selector thread, bounded in every way.

    Why not ``http.server``: its threading server spends a thread and a file
    descriptor on every connection for as long as the client likes, so a
    local user holding ~1,000 idle connections ran the daemon out of file
    descriptors. Here every connection has one deadline for the whole
    exchange, connections are capped in total and per peer uid (found with
    sock_diag: on loopback the peer's socket is ours to look up), and a
    connection over a cap is answered 503 and closed at once. Accept errors
    (EMFILE and friends) pause accepting briefly instead of spinning.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        text: Callable[[], str],
        logger: Logger,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_per_uid: int = MAX_PER_UID,
        deadline: float = DEADLINE,
    ) -> None:
        self.text = text
        self.log = logger
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
        self.deadline = deadline
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(listen)
            self._listener.listen(64)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.address = self._listener.getsockname()[:2]
        self._family = "ipv6" if family == socket.AF_INET6 else "ipv4"
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._conns: dict[int, _Conn] = {}
        self._per_key: dict[Any, int] = {}
        self._diag: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._accept_paused_until = 0.0
        self._log_throttle = IntervalLimiter(_LOG_INTERVAL)
        self.counters = {"served": 0, "refused_busy": 0, "timed_out": 0, "accept_errors": 0}

    def start(self) -> None:
        """Serve in a thread of its own."""
        try:
            from imdsguard.events.sockdiag import SockDiag  # noqa: PLC0415

            self._diag = SockDiag()
        except OSError:
            self._diag = None  # per-uid caps fall back to the peer address
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close every connection and the listener."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for conn in list(self._conns.values()):
            self._close(conn)
        with contextlib.suppress(Exception):
            self._sel.close()
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._diag is not None:
            self._diag.close()

    def stats(self) -> dict[str, Any]:
        """Counters for ``status``."""
        return dict(self.counters, connections=len(self._conns))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - the endpoint must outlive any one client
                self._warn("metrics_server_error", error=f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.1)

    def _step(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._sel.register(self._listener, selectors.EVENT_READ, None)
        soonest = min((c.deadline for c in self._conns.values()), default=now + 1.0)
        if self._accept_paused_until:
            soonest = min(soonest, self._accept_paused_until)
        for key, mask in self._sel.select(max(0.0, min(1.0, soonest - now))):
            if key.data is None:
                self._accept()
            elif key.data == "wake":
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
            elif mask & selectors.EVENT_READ:
                self._on_read(key.data)
            else:
                self._on_write(key.data)
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self.counters["timed_out"] += 1
            self._close(conn)  # a client this slow gets no answer: no buffer waits for it

    def _accept(self) -> None:
        for _ in range(64):  # then serve the others; the rest wait in the backlog
            try:
                sock, peer = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: stop accepting for a moment
                # (the kernel keeps the backlog) rather than spin on the error.
                self.counters["accept_errors"] += 1
                self._warn("metrics_accept_failed", error=str(exc), paused_s=ACCEPT_PAUSE)
                self._sel.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                return
            sock.setblocking(False)
            key = self._peer_key(peer)
            if (
                len(self._conns) >= self.max_connections
                or self._per_key.get(key, 0) >= self.max_per_uid
            ):
                self.counters["refused_busy"] += 1
                self._warn(
                    "metrics_busy",
                    peer_uid=key if isinstance(key, int) else None,
                    connections=len(self._conns),
                    refused_total=self.counters["refused_busy"],
                )
                with contextlib.suppress(OSError):
                    sock.send(_response(503, b"too many connections\n"))
                sock.close()
                continue
            conn = _Conn(sock, key, time.monotonic() + self.deadline)
            self._conns[sock.fileno()] = conn
            self._per_key[key] = self._per_key.get(key, 0) + 1
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _peer_key(self, peer: tuple[Any, ...]) -> Any:
        """The uid of the peer's socket (it is local: loopback only), else its address."""
        if self._diag is not None:
            try:
                found = self._diag.lookup(
                    self._family, IPPROTO_TCP, (peer[0], peer[1]), self.address
                )
            except OSError:
                found = None
            if found is not None:
                return int(found.uid)
        return str(peer[0])

    def _on_read(self, conn: _Conn) -> None:
        data = _http.recv_some(conn.sock)
        if data is None:
            return
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        try:
            request = _http.parse_head(conn.inbuf, MAX_HEAD)
        except _http.HttpError as exc:
            self._reply(conn, _response(exc.status, (exc.message + "\n").encode()))
            return
        if request is None:
            return
        if request.method != "GET":
            self._reply(conn, _response(405, b"only GET is served\n"))
        elif request.path != "/metrics":
            self._reply(conn, _response(404, b"not found: try /metrics\n"))
        else:
            self.counters["served"] += 1
            self._reply(conn, _response(200, self.text().encode(), PROMETHEUS_TEXT))

    def _reply(self, conn: _Conn, data: bytes) -> None:
        conn.replied, conn.outbuf, conn.inbuf = True, data, b""
        self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._on_write(conn)

    def _on_write(self, conn: _Conn) -> None:
        left = _http.send_some(conn.sock, conn.outbuf)
        if left is None:
            self._close(conn)
            return
        conn.outbuf = left
        if not conn.outbuf:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock.fileno(), None) is None:
            return
        left = self._per_key.get(conn.key, 1) - 1
        if left:
            self._per_key[conn.key] = left
        else:
            self._per_key.pop(conn.key, None)
        with contextlib.suppress(Exception):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _warn(self, event: str, **fields: Any) -> None:
        """At most one line per kind and ``_LOG_INTERVAL``: a flood must not flood the log."""
        if self._log_throttle.allow(event)[0] and self.log is not None:
            self.log.warning(event, **fields)


PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_http.REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
