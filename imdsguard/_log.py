"""structlog set-up: JSON lines (or a console format) on stdout, for journald."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog

from imdsguard._time import rfc3339

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


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    """Route structlog to stdout as JSON (``fmt="json"``) or for people (``"console"``)."""
    from imdsguard.events.log import console_processor  # noqa: PLC0415

    tail: list[Any] = (
        [structlog.processors.JSONRenderer(sort_keys=False)]
        if fmt == "json"
        # Untrusted strings (argv, exe) must not put escapes on a terminal.
        else [console_processor, structlog.dev.ConsoleRenderer(colors=False)]
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
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Any:
    """A bound structlog logger."""
    return structlog.get_logger(**initial)
