"""The blocked-attempt event: its schema as a type, and the names of the event lines.

:class:`Event` is the contract's event (one JSON object per line of the event
log, and the same fields on stdout): its keys, in the order they are written,
are :data:`EVENT_FIELDS`. The README's table of event fields is tested against
it. Forwarded (container) traffic adds ``src`` (after ``family``) and ``iface``
(last); every other field is always present, ``null`` when unknown.

The type is built in layers only to keep that order: a TypedDict's keys are
its bases' keys first, and ``src``/``iface`` are the optional ones.
"""

from __future__ import annotations

from typing import NamedTuple, TypedDict

BLOCKED = "imds_access_blocked"
AUDITED = "imds_access_audited"
#: The periodic line saying what the rate limit held back (not an :class:`Event`).
SUMMARY = "events_suppressed"


class Ancestor(TypedDict):
    """One parent process, up to PID 1."""

    pid: int
    comm: str | None
    exe: str | None


class _Head(TypedDict):
    event: str  # BLOCKED, or AUDITED in audit mode
    timestamp: str  # RFC 3339, UTC, milliseconds
    mode: str  # the Mode the capture ran in
    family: str  # "ipv4" | "ipv6"


class _Source(_Head, total=False):
    src: str  # forwarded traffic only: the container's address


class _Body(_Source):
    dst: str
    dport: int | None
    uid: int | None
    user: str | None
    gid: int | None
    pid: int | None
    ppid: int | None
    exe: str | None
    cmdline: list[str]  # redacted
    comm: str | None
    ancestors: list[Ancestor]
    unit: str | None
    container: str | None
    attempts: int  # SYN retransmits and repeats folded into this event
    attributed: bool  # the process was found
    imds_version: str  # "v1" | "v2" | "unknown"


class Event(_Body, total=False):
    """One blocked (or audited) attempt; see the module docstring."""

    iface: str | None  # forwarded traffic only: the interface it came in on


#: Every field of an event, in the order they are written.
EVENT_FIELDS: tuple[str, ...] = tuple(Event.__annotations__)
#: The fields only forwarded traffic has.
FORWARDED_FIELDS: tuple[str, ...] = tuple(sorted(Event.__optional_keys__))


class ProcessKey(NamedTuple):
    """Whose attempts a per-process count is: user name (or source address) and exe."""

    user: str
    exe: str


#: Where counts go once :data:`~imdsguard.events.capture.MAX_PROCESS_KEYS` pairs are known.
OTHER_PROCESS = ProcessKey("other", "other")
