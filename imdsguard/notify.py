"""The systemd notification protocol (``sd_notify``), without depending on systemd.

Messages go to the datagram socket named by ``$NOTIFY_SOCKET``; with no such
variable (not under systemd) they are silently skipped.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines (e.g. ``READY=1``); True when a socket took them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(lines).encode())
    return True
