"""The words of the domain, as types: each value set is defined here once.

Every value set a user or a document can name (``mode``, ``action``,
``containers``, ``firewall.backend``, how denied packets are captured, the
state of one family's rules) is a :class:`StrEnum` below. Values are checked
once, at the config boundary (:mod:`imdsguard.config`) or where a document is
read back (``state.json``); past that, code compares members, never strings.

The enums subclass :class:`str`, so a member equals its value, serialises to
it in JSON and YAML, and formats as it (``f"{Mode.AUDIT}"`` is ``audit`` on
every Python from 3.9, where ``enum.StrEnum`` does not exist yet).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

_E = TypeVar("_E", bound="StrEnum")


class StrEnum(str, Enum):
    """A string-valued enum that prints, formats and compares as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Every value, in definition order (for messages and validation)."""
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls: type[_E], value: str) -> _E:
        """The member for ``value``; ValueError naming the choices when there is none."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{value!r} is not one of {', '.join(cls.values())}") from None


class Mode(StrEnum):
    """``mode``: whether denied traffic is blocked or only recorded."""

    ENFORCE = "enforce"
    AUDIT = "audit"


class Action(StrEnum):
    """``action``: what a denied packet meets in enforce mode."""

    REJECT = "reject"
    DROP = "drop"


class Containers(StrEnum):
    """``containers``: IMDS traffic the host forwards from local bridges."""

    DENY = "deny"
    ALLOW = "allow"


class BackendName(StrEnum):
    """``firewall.backend``; ``auto`` is resolved to one of the others at start."""

    AUTO = "auto"
    IPTABLES = "iptables"
    NFTABLES = "nftables"


class Capture(StrEnum):
    """How denied (audit: audited) packets reach the daemon for attribution.

    ``queue``: held in NFQUEUE until the daemon has read the process
    (attribution even for short-lived ones); ``log``: copied to NFLOG and
    decided in the kernel at once (attribution best effort); ``none``: no
    capture (rules applied without a running daemon, e.g. ``imdsguard apply``).
    """

    QUEUE = "queue"
    LOG = "log"
    NONE = "none"


class FamilyState(StrEnum):
    """Values of ``rules.ipv4`` / ``rules.ipv6`` in ``status``."""

    OK = "ok"
    MISSING = "missing"  # some IMDS traffic of this family is not under our rules
    DRIFTED = "drifted"  # our rules are in effect but differ from the policy
    DISABLED = "disabled"  # no endpoint of this family, or the family is off in the kernel


class LogFormat(StrEnum):
    """``logging.format``."""

    JSON = "json"
    CONSOLE = "console"
