"""The one exception hierarchy of imdsguard.

Every error a user can meet is an :class:`ImdsGuardError` whose message says
what went wrong, where, and what to do. The CLI prints it as one line and
exits with :attr:`ImdsGuardError.exit_code`; it never shows a traceback.

The tree (every class is defined here; a few are re-exported where they are
raised, e.g. ``imdsguard.events.nfqueue.CaptureError``)::

    ImdsGuardError
    ├── ConfigError                 the configuration file (exit 2)
    ├── PermissionDeniedError       the caller lacks privileges (exit 3)
    ├── LockTimeoutError            another imdsguard held the firewall lock
    ├── FirewallError               the kernel firewall could not be read or changed
    │   └── BlobError               an x_tables blob could not be read (also OSError)
    ├── CaptureError                packet capture (NFQUEUE / NFLOG) failed
    │   └── QueueBusyError          another process reads our queue
    ├── PacketError                 bytes that are not an IP packet we read (also ValueError)
    ├── EventLogError               the event log file is not safe to write (also OSError)
    ├── BrokerError                 the credential broker refused or is unreachable
    │   └── HttpError               a broker request answered with an HTTP error status
    └── ImdsError                   IMDS unreachable or its answer unusable
        └── ImdsRequestError        (imdsguard.imds) one request failed

Where a class also subclasses a builtin (``OSError``, ``ValueError``), that is
so the ``except OSError`` / ``except ValueError`` around the code raising it
keep working. ``imdsguard_testing.netns.NamespaceSafetyError`` (the test
harness, not shipped) subclasses :class:`ImdsGuardError` from outside.
"""

from __future__ import annotations


class ImdsGuardError(Exception):
    """Base class: a failure with a message a user can act on."""

    exit_code = 1


class ConfigError(ImdsGuardError):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = 2

    def __init__(
        self, path: str, message: str, key: str | None = None, line: int | None = None
    ) -> None:
        self.path = path
        self.key = key
        self.line = line
        self.detail = message
        where = path
        if line is not None:
            where += f":{line}"
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {message}")


class FirewallError(ImdsGuardError):
    """The kernel firewall could not be read or changed."""


class PermissionDeniedError(ImdsGuardError):
    """The caller lacks the privileges the command needs."""

    exit_code = 3


class BrokerError(ImdsGuardError):
    """The credential broker refused or could not be reached."""


class BlobError(FirewallError, OSError):
    """The table could not be read this way (no such table, no permission, odd blob).

    Raised as ``BlobError(errno, message)``: callers look at ``errno`` (EAGAIN:
    the table changed while read) and fall back to parsing on any OSError.
    """


class CaptureError(ImdsGuardError):
    """The packet capture (NFQUEUE) could not be set up or failed."""


class QueueBusyError(CaptureError):
    """Another process (another imdsguard daemon?) already reads our queue."""


class PacketError(ImdsGuardError, ValueError):
    """The bytes are not an IPv4/IPv6 packet we can read."""


class EventLogError(ImdsGuardError, OSError):
    """The event log file is not something we may write to (``EventLogError(errno, msg)``)."""


class HttpError(BrokerError):
    """A request we answer with an error ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ImdsError(ImdsGuardError):
    """IMDS could not be reached or answered with something unusable."""


class LockTimeoutError(ImdsGuardError):
    """Another imdsguard process held the firewall lock for too long."""
