"""Prometheus metrics: a textfile for node_exporter, or a loopback ``/metrics`` endpoint.

The text exposition format is small and stable, so it is written here rather
than pulling prometheus-client into the RPM; the tests parse the output with
prometheus-client's own parser. Label sets are bounded: per-user/exe
counters keep the ``TOP`` busiest and fold the rest into ``other``.
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

TOP = 20
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


def render(snap: dict[str, Any]) -> str:
    """The exposition text for a daemon snapshot (see ``Daemon.metrics_snapshot``)."""
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
        "SIGHUP reloads refused because the new configuration was invalid.",
        [({}, snap.get("reload_failures", 0))],
    )
    w.metric(
        "imdsguard_blocked_total",
        "counter",
        "IMDS access attempts denied (or, in audit mode, audited) and logged.",
        [({}, snap.get("blocked_total", 0))],
    )
    by_who: dict[tuple[str, str], int] = snap.get("blocked_by", {})
    ranked = sorted(by_who.items(), key=lambda kv: -kv[1])
    samples = [({"user": u, "exe": e}, n) for (u, e), n in ranked[:TOP]]
    rest = sum(n for _, n in ranked[TOP:])
    if rest:
        samples.append(({"user": "other", "exe": "other"}, rest))
    w.metric(
        "imdsguard_blocked_by_process_total",
        "counter",
        f"Blocked attempts by user and executable (top {TOP}, the rest as other).",
        samples,
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
        self.config = config
        self.collect = collect
        self.log = logger
        self.interval = 15.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: ThreadingHTTPServer | None = None
        self._errors = 0

    def start(self) -> None:
        """Bind the endpoint (if configured) and start refreshing the textfile."""
        if self.config.listen is not None:
            self._server = _make_server(self.config.listen, self.collect)
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
            write_textfile(self.config.textfile, render(self.collect()))
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
        """Adopt a new config: restart when the metrics section changed."""
        if config.metrics != self.config:
            self.stop()
            self.__init__(config.metrics, self.collect, self.log)  # type: ignore[misc]
            self.start()

    def health(self) -> dict[str, Any]:
        """For ``status``."""
        return {
            "textfile": self.config.textfile,
            "listen": None
            if self.config.listen is None
            else ":".join(map(str, self.config.listen)),
            "write_errors": self._errors,
        }


def _make_server(listen: tuple[str, int], collect: Collect) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = render(collect()).encode()
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
