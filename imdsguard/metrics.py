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

import os
import tempfile
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from imdsguard.config import MetricsConfig
from imdsguard.errors import ImdsGuardError

MAX_SERIES = 50
OTHER = ("other", "other")
Collect = Callable[[], dict[str, Any]]


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
            self.lines.append(f"{name}{_labels(labels)} {float(value):g}")


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
    w.metric(
        "imdsguard_protected",
        "gauge",
        "1 when rules are in place for every enabled family in enforce mode.",
        [({}, 1 if snap["protected"] else 0)],
    )
    w.metric(
        "imdsguard_rules_state",
        "gauge",
        "1 for the current state of each address family's rules.",
        [
            ({"family": family, "state": state}, 1)
            for family, state in sorted(snap.get("rules", {}).items())
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
    return "\n".join(w.lines) + "\n"


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

    def __init__(self, config: MetricsConfig, collect: Collect, logger: Any) -> None:
        self.collect = collect
        self.log = logger
        self.interval = 15.0
        self._series = ProcessSeries()  # kept across reconfigure: counters never jump
        self._reset(config)

    def _reset(self, config: MetricsConfig) -> None:
        self.config = config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: ThreadingHTTPServer | None = None
        self._errors = 0

    def render(self) -> str:
        """The current exposition text."""
        return render(self.collect(), self._series)

    def start(self) -> None:
        """Bind the endpoint (if configured) and start refreshing the textfile."""
        if self.config.listen is not None:
            host, port = self.config.listen
            try:
                self._server = _make_server(self.config.listen, self.render)
            except OSError as exc:
                raise ImdsGuardError(
                    f"metrics.listen: cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from None
            threading.Thread(
                target=self._server.serve_forever, name="metrics-http", daemon=True
            ).start()
        if self.config.textfile is not None:
            self._thread = threading.Thread(target=self._loop, name="metrics-file", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.write_now()
            self._stop.wait(self.interval)

    def write_now(self) -> None:
        """Write the textfile once (also called by the daemon after notable changes)."""
        if self.config.textfile is None:
            return
        try:
            write_textfile(self.config.textfile, self.render())
        except OSError as exc:
            self._errors += 1
            self.log.error("metrics_write_failed", path=self.config.textfile, error=str(exc))

    def stop(self) -> None:
        """Stop serving; the textfile stays (node_exporter marks it stale by its mtime)."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reconfigure(self, config: Any) -> None:
        """Adopt a new config: restart when the metrics section changed.

        Raises ImdsGuardError when the new endpoint cannot be bound; the old
        one is back in service by then (the daemon rolls the reload back).
        """
        if config.metrics == self.config:
            return
        old = self.config
        self.stop()
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
        return {
            "textfile": self.config.textfile,
            "listen": None
            if self.config.listen is None
            else ":".join(map(str, self.config.listen)),
            "write_errors": self._errors,
        }


def _make_server(listen: tuple[str, int], text: Callable[[], str]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    import socket  # noqa: PLC0415 - only needed for the endpoint

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET

    return Server(listen, Handler)
