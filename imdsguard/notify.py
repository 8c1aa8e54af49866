"""The systemd notification protocol (``sd_notify``), without depending on systemd.

Messages go to the datagram socket named by ``$NOTIFY_SOCKET``; with no such
variable (not under systemd) they are silently skipped. A socket that cannot
be reached (a stale variable, systemd gone) is not a reason to stop guarding
IMDS: the failure is reported once through ``on_error`` and later messages
are dropped quietly.
"""

from __future__ import annotations

import os
import socket
from typing import Callable


class Notifier:
    """Sends ``sd_notify`` messages; never raises (see the module docstring)."""

    def __init__(self, on_error: Callable[[str, str], None] | None = None) -> None:
        """``on_error(address, error)`` is called for the first failure only."""
        self._on_error = on_error
        self._failed = False

    def __call__(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines (e.g. ``READY=1``); True when a socket took them."""
        address = os.environ.get("NOTIFY_SOCKET")
        if not address:
            return False
        try:
            _send(address, "\n".join(lines).encode())
        except OSError as exc:
            if not self._failed:
                self._failed = True
                if self._on_error is not None:
                    self._on_error(address, exc.strerror or str(exc))
            return False
        return True


def _send(address: str, data: bytes) -> None:
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(data)


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines once, without reporting failures (see :class:`Notifier`)."""
    return Notifier()(*lines)
