"""The one timestamp format of every log line and event: RFC 3339, UTC, milliseconds.

``2026-11-23T00:26:40.171Z``: what the CloudWatch agent parses with
``"timestamp_format": "%Y-%m-%dT%H:%M:%S.%fZ"`` (its ``%f`` is exactly three
digits) and Fluent Bit with ``%Y-%m-%dT%H:%M:%S.%L%z``. Credentials carry whole
seconds (``timespec="seconds"``), as IMDS and AWS SDKs do.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal


def rfc3339(ts: float, timespec: Literal["milliseconds", "seconds"] = "milliseconds") -> str:
    """``ts`` (epoch seconds) as RFC 3339 UTC, milliseconds (or whole seconds) truncated.

    Whole seconds are the credentials' format (``Expiration`` in the
    ``credential_process`` document, what AWS SDKs parse):
    ``2026-11-23T00:26:40Z``.
    """
    if timespec == "seconds":
        ts = int(ts)  # not rounded up to the next second by the microseconds
    return (
        datetime.fromtimestamp(ts, tz=timezone.utc)
        .isoformat(timespec=timespec)
        .replace("+00:00", "Z")
    )
