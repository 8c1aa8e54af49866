"""The broker's client side: what ``imdsguard credentials`` runs.

AWS SDKs run ``credential_process`` commands on every refresh, so this
module is small and imports only the standard library and the error types.
Its output on success is the ``credential_process`` JSON document
(``Version: 1``) on stdout; on any failure, one line on stderr naming the
reason and exit code 1, which every SDK reports as a credential error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import sys
import time
from typing import Any

from imdsguard.errors import BrokerError

CREDENTIALS_ROUTE = "/v1/credentials"
HEALTH_ROUTE = "/v1/health"
_MAX_RESPONSE = 64 * 1024
_REQUIRED = ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")


def _exchange(socket_path: str, route: str, timeout: float) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            _connect(sock, socket_path, deadline)
        except FileNotFoundError:
            raise BrokerError(
                f"the broker socket {socket_path} does not exist: is the imdsguard daemon "
                "running with 'broker: {enabled: true}'?"
            ) from None
        except ConnectionRefusedError:
            raise BrokerError(
                f"nothing is listening on {socket_path}: the imdsguard daemon is not running"
            ) from None
        except PermissionError:
            raise BrokerError(
                f"permission denied connecting to {socket_path} (check its directory's mode)"
            ) from None
        request = f"GET {route} HTTP/1.1\r\nHost: imdsguard\r\nConnection: close\r\n\r\n"
        # Answered and closed early (e.g. "busy")? The answer may still be there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request.encode())
        data = b""
        while len(data) <= _MAX_RESPONSE:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout
            sock.settimeout(left)
            chunk = sock.recv(16384)
            if not chunk:
                break
            data += chunk
            status, body = _parse(data)
            if status is not None:
                return status, body
    except socket.timeout:
        raise BrokerError(
            f"the broker at {socket_path} did not answer within {timeout:g}s"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            raise BrokerError(f"the broker at {socket_path} closed the connection") from None
        raise BrokerError(f"cannot talk to the broker at {socket_path}: {exc.strerror}") from None
    finally:
        sock.close()
    raise BrokerError(f"the broker at {socket_path} sent an incomplete or oversized answer")


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    """``connect``, waiting while the broker's listen queue is full (EAGAIN).

    A burst of connections (another user's, say) can fill the queue for a
    few milliseconds; the kernel then refuses a timed socket at once rather
    than making it wait, so we wait ourselves, within the deadline.
    """
    pause = 0.001
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() + pause > deadline:
                raise socket.timeout from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _parse(data: bytes) -> tuple[int | None, bytes]:
    """(status, body) once ``data`` holds a whole response, else (None, b"")."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None, b""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise BrokerError("the broker sent something that is not an HTTP response")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    if length is None or len(body) < length:
        return None, b""
    return int(parts[1]), body[:length]


def fetch_credentials(socket_path: str, timeout: float = 5.0) -> dict[str, Any]:
    """The ``credential_process`` document from the broker.

    Raises :class:`~imdsguard.errors.BrokerError` with the broker's own
    reason when it refuses (403) or has nothing to serve (503), or with what
    went wrong when it cannot be reached.
    """
    status, body = _exchange(socket_path, CREDENTIALS_ROUTE, timeout)
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        doc = None
    if status != 200:
        reason = doc.get("error") if isinstance(doc, dict) else None
        if not isinstance(reason, str) or not reason:
            reason = f"HTTP {status}"
        prefix = "refused" if status == 403 else "cannot serve credentials"
        raise BrokerError(f"the broker {prefix}: {reason}")
    if (
        not isinstance(doc, dict)
        or doc.get("Version") != 1
        or not all(isinstance(doc.get(k), str) and doc.get(k) for k in _REQUIRED)
    ):
        raise BrokerError("the broker sent an incomplete credentials document")
    return doc


def fetch_health(socket_path: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
    """``GET /v1/health``: the HTTP status (200 or 503) and the broker's health document."""
    status, body = _exchange(socket_path, HEALTH_ROUTE, timeout)
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BrokerError("the broker sent an unreadable health document") from None
    if not isinstance(doc, dict):
        raise BrokerError("the broker sent an unreadable health document")
    return status, doc


def credentials_main(socket_path: str, timeout: float = 5.0) -> int:
    """``imdsguard credentials``: print the document (exit 0) or one line of reason (exit 1)."""
    try:
        doc = fetch_credentials(socket_path, timeout)
    except BrokerError as exc:
        print(f"imdsguard: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()
    return 0
