"""The one exception hierarchy of imdsguard.

Every error a user can meet is an :class:`ImdsGuardError` whose message says
what went wrong, where, and what to do. The CLI prints it as one line and
exits with :attr:`ImdsGuardError.exit_code`; it never shows a traceback.
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


class ImdsError(ImdsGuardError):
    """IMDS could not be reached or answered with something unusable."""


class LockTimeoutError(ImdsGuardError):
    """Another imdsguard process held the firewall lock for too long."""
