"""The one timestamp format of every log line and event: RFC 3339, UTC, milliseconds.

``2026-11-23T00:26:40.171Z``: what the CloudWatch agent parses with
``"timestamp_format": "%Y-%m-%dT%H:%M:%S.%fZ"`` (its ``%f`` is exactly three
digits) and Fluent Bit with ``%Y-%m-%dT%H:%M:%S.%L%z``.
"""

from __future__ import annotations

from datetime import datetime, timezone


def rfc3339(ts: float) -> str:
    """``ts`` (epoch seconds) as RFC 3339 UTC with milliseconds."""
    return (
        datetime.fromtimestamp(ts, tz=timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
