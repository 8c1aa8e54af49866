"""structlog set-up: JSON lines (or a console format) on stdout, for journald.

Priorities: journald reads a ``<N>`` syslog prefix at the start of each
stdout line (``SyslogLevelPrefix=yes``, its default), strips it from
``MESSAGE`` and stores ``PRIORITY=N``, so ``journalctl -p warning`` and a
shipper's priority-based routing see our levels. The prefix is written only
when stdout *is* the journal: ``$JOURNAL_STREAM`` (``device:inode``, set by
systemd) names the stream, and we compare it with stdout's own, as
``systemd.exec(5)`` advises, so a redirect to a file or pipe (tests, a
shell, a container runtime) keeps plain JSON lines.
``IMDSGUARD_LOG_PRIORITY_PREFIX=yes|no`` overrides the detection (e.g. for a
supervisor that pipes stdout to ``systemd-cat``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, Protocol, TextIO

import structlog

from imdsguard._time import rfc3339


class Logger(Protocol):
    """What the package calls on a logger: structlog's bound loggers (and
    ``structlog.testing.capture_logs``) fit it. One keyword per field, never
    a preformatted message: the event name is the first argument.
    """

    def debug(self, event: str, **fields: Any) -> Any:
        """Log ``event`` at debug level."""

    def info(self, event: str, **fields: Any) -> Any:
        """Log ``event`` at info level."""

    def warning(self, event: str, **fields: Any) -> Any:
        """Log ``event`` at warning level."""

    def error(self, event: str, **fields: Any) -> Any:
        """Log ``event`` at error level."""


#: Keys whose values are never logged, whatever a caller passes by mistake.
SECRET_KEYS = frozenset(
    {"SecretAccessKey", "SessionToken", "Token", "token", "secret", "secret_access_key"}
)


def _redact(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in SECRET_KEYS.intersection(event_dict):
        event_dict[key] = "[redacted]"
    return event_dict


def _timestamp(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # The events' precision (ms, imdsguard._time) for every line: one format to
    # parse. An event that carries its own time (the attempt's) keeps it.
    event_dict.setdefault("timestamp", rfc3339(time.time()))
    return event_dict


#: structlog level names -> syslog priorities (RFC 5424 severities, as journald stores them).
PRIORITIES = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
PREFIX_ENV = "IMDSGUARD_LOG_PRIORITY_PREFIX"


def stdout_is_journal(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (stdout) is connected to journald, per ``$JOURNAL_STREAM``."""
    if env is None:
        env = os.environ
    forced = str(env.get(PREFIX_ENV, "")).strip().lower()
    if forced in ("1", "yes", "true", "on"):
        return True
    if forced in ("0", "no", "false", "off"):
        return False
    dev, sep, ino = str(env.get("JOURNAL_STREAM", "")).partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stdout).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def _with_priority(render: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a final renderer: ``<N>`` (from the line's level) before what it renders."""

    def prefixed(logger: Any, name: str, event_dict: dict[str, Any]) -> str:
        level = str(event_dict.get("level") or name or "info").lower()
        return f"<{PRIORITIES.get(level, 6)}>{render(logger, name, event_dict)}"

    return prefixed


def configure(
    fmt: str = "json",
    level: int = logging.INFO,
    journal: bool | None = None,
    stream: TextIO | None = None,
) -> None:
    """Route structlog to stdout as JSON (``fmt="json"``) or for people (``"console"``).

    ``journal``: write journald's ``<N>`` priority prefix (None: when stdout
    is the journal, see the module docstring). ``stream``: instead of stdout.
    """
    stream = stream or sys.stdout
    from imdsguard.events.log import console_processor  # noqa: PLC0415

    render: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    if stdout_is_journal(stream) if journal is None else journal:
        render = _with_priority(render)
    tail: list[Any] = (
        [render]
        if fmt == "json"
        # Untrusted strings (argv, exe) must not put escapes on a terminal.
        else [console_processor, render]
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _timestamp,
            _redact,
            structlog.processors.format_exc_info,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line (message and newline together), under a per-file lock.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Logger:
    """A bound structlog logger."""
    logger: Logger = structlog.get_logger(**initial)
    return logger
