"""Just enough HTTP/1.1 for the broker: parse a bounded request head, build a response.

Shared with the metrics endpoint (:mod:`imdsguard.metrics`), which also reads
and writes its non-blocking connections with :func:`recv_some` and
:func:`send_some`.

No bodies are accepted, every response closes the connection, and the
limits (request line, header block, header count) are checked on every
partial read, so a client cannot make us buffer more than a few KiB.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from imdsguard.errors import HttpError as HttpError  # noqa: PLC0414 - raised here

MAX_REQUEST_LINE = 2048
MAX_HEADER_BYTES = 8192  # request line included
MAX_HEADERS = 64

REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")


@dataclass(frozen=True)
class Request:
    """A parsed request head."""

    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]


def _head_end(buf: bytes) -> int:
    """Index just past the blank line that ends the head, or -1."""
    crlf, lf = buf.find(b"\r\n\r\n"), buf.find(b"\n\n")
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


def parse_head(buf: bytes, max_head: int = MAX_HEADER_BYTES) -> Request | None:
    """The request in ``buf``, None if it is incomplete (and still within limits).

    ``max_head`` bounds the whole head (``broker.limits.max_header_bytes``);
    the request line and the number of fields have fixed bounds.

    Raises :class:`HttpError` (400, 413, 414, 431, 505) for a request we
    will not serve.
    """
    raw_size = len(buf)
    buf = buf.lstrip(b"\r\n")  # RFC 9112: ignore blank lines before the request line
    skipped = raw_size - len(buf)
    end = _head_end(buf)
    line_end = buf.find(b"\n")
    if (line_end < 0 and len(buf) > MAX_REQUEST_LINE) or line_end > MAX_REQUEST_LINE:
        raise HttpError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
    # The skipped blank lines count too, so the answer does not depend on how
    # the bytes were split into reads.
    if (end < 0 and raw_size > max_head) or (end >= 0 and skipped + end > max_head):
        raise HttpError(431, f"request head larger than {max_head} bytes")
    if end < 0:
        return None
    try:
        text = buf[:end].decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request head is not ASCII") from None
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    match = _VERSION.fullmatch(version)
    if match is None:
        raise HttpError(400, "malformed HTTP version")
    if match.group(1) != "1":
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    if not target.startswith("/"):
        raise HttpError(400, "request target must be a path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise HttpError(400, "folded header lines are not accepted")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line")
        key = name.lower()
        if key in headers and key in ("content-length", "transfer-encoding", "host"):
            raise HttpError(400, f"duplicate {name} header")
        headers[key] = value.strip(" \t")
        if len(headers) > MAX_HEADERS:
            raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    if "transfer-encoding" in headers:
        raise HttpError(400, "request bodies are not accepted")
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise HttpError(400, "malformed Content-Length")
    if int(length) > 0:
        raise HttpError(413, "request bodies are not accepted")
    return Request(method, target, version, headers)


def response(
    status: int,
    document: dict[str, Any] | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A complete ``Connection: close`` response with a JSON body."""
    body = b"" if document is None else (json.dumps(document) + "\n").encode()
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def recv_some(sock: socket.socket, size: int = 4096) -> bytes | None:
    """What non-blocking ``sock`` has: None when nothing yet, ``b""`` when the peer
    closed or the socket failed (either way: close it)."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def send_some(sock: socket.socket, data: bytes) -> bytes | None:
    """Send what non-blocking ``sock`` takes of ``data``: what is left to send
    (``b""`` when all went), or None when the socket failed."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        return data
    except OSError:
        return None
    return data[sent:]
