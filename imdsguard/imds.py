"""The one HTTP client for the instance metadata service (IMDS).

Shared by the broker (role credentials over IMDSv2), ``audit`` (is IMDSv1
on? what does user-data hold?) and the demo. Standard library only
(:mod:`http.client`), one short-lived connection per request, so a
half-broken IMDS connection is never reused.

- IMDSv2: a session token from ``PUT /latest/api/token`` is cached and
  renewed before its TTL runs out; a ``401`` on a GET (the token expired or
  was revoked) drops it, fetches a new one and retries once.
- IMDSv1 (``token=False``): a plain GET, for ``audit`` to probe.
- ``owner_uid``: create each socket as that uid (root only; for ``audit``,
  which borrows the broker's identity, the uid the firewall allows). The
  broker itself needs nothing: it runs as its own user, which is allowlisted.
- Every failure is an :class:`ImdsRequestError` (an
  :class:`~imdsguard.errors.ImdsError`) with a ``kind`` and a message that
  names the request but never a token or credential.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time
from calendar import timegm
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable
from urllib.parse import urlsplit

from imdsguard import __version__
from imdsguard._time import rfc3339
from imdsguard.errors import ImdsError

DEFAULT_IMDS_URL = "http://169.254.169.254"  # imds.url's default (imdsguard.config re-exports it)
TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a path, not a secret
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"
MAX_TOKEN_TTL = 21600
DEFAULT_TIMEOUT = 2.0
DEFAULT_MAX_BODY = 1 << 20  # user-data is at most 16 KiB on EC2; credentials ~1.5 KiB

_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|z|[+-]\d\d:?\d\d)?"
)


class ImdsRequestError(ImdsError):
    """An IMDS request failed.

    ``kind`` is one of ``timeout``, ``connection`` (refused, unreachable,
    reset), ``truncated`` (the answer stopped short), ``http`` (an unexpected
    status, in ``status``), ``protocol`` (not HTTP), ``invalid`` (a document
    that does not parse) or ``no-role`` (no instance profile).
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class ImdsResponse:
    """One answer from IMDS: status, body and lower-cased headers."""

    status: int
    body: bytes = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    def text(self) -> str:
        """The body as text (IMDS answers are ASCII; anything else is replaced)."""
        return self.body.decode("utf-8", "replace")


def parse_time(text: str) -> float:
    """An RFC 3339 timestamp (``2024-05-01T12:00:00Z``) as epoch seconds.

    Raises :class:`ValueError`. Without a zone the time is taken as UTC, as
    IMDS means it.
    """
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        raise ValueError("not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = float("0." + match.group(7)) if match.group(7) else 0.0
    seconds = timegm((year, month, day, hour, minute, second, 0, 0, 0)) + fraction
    datetime(year, month, day, hour, minute, second)  # range checks (month 13, ...)
    zone = match.group(8)
    if zone and zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds


def format_time(epoch: float) -> str:
    """Epoch seconds as RFC 3339 UTC with a ``Z`` (what AWS tools print and parse)."""
    return rfc3339(epoch, "seconds")


@dataclass(frozen=True)
class Credentials:
    """Role credentials from IMDS. The secret parts never show in a repr."""

    role: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: float  # epoch seconds
    last_updated: float | None = None

    @classmethod
    def from_document(cls, body: bytes, role: str) -> Credentials:
        """Parse IMDS's ``security-credentials/<role>`` document.

        Raises :class:`ImdsRequestError` (``kind="invalid"``) for anything
        that is not a complete, successful credentials document. The message
        never quotes the document (it holds the secrets).
        """
        where = f"credentials document for role {role!r}"
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ImdsRequestError(
                f"IMDS sent a {where} that is not valid JSON ({len(body)} bytes; truncated?)",
                kind="invalid",
            ) from None
        if not isinstance(data, dict):
            raise ImdsRequestError(f"IMDS sent a {where} that is not a JSON object", kind="invalid")
        code = data.get("Code", "Success")
        if code != "Success":
            shown = code if isinstance(code, str) and len(code) < 80 else "?"
            raise ImdsRequestError(f"IMDS {where} has Code {shown!r}", kind="invalid")
        values: dict[str, str] = {}
        for key in ("AccessKeyId", "SecretAccessKey", "Token", "Expiration"):
            value = data.get(key)
            if not isinstance(value, str) or not value:
                raise ImdsRequestError(f"IMDS {where} lacks {key}", kind="invalid")
            values[key] = value
        try:
            expiration = parse_time(values["Expiration"])
        except ValueError:
            raise ImdsRequestError(
                f"IMDS {where} has an unreadable Expiration", kind="invalid"
            ) from None
        last_updated: float | None = None
        raw_updated = data.get("LastUpdated")
        if isinstance(raw_updated, str):
            try:
                last_updated = parse_time(raw_updated)
            except ValueError:
                last_updated = None
        return cls(
            role=role,
            access_key_id=values["AccessKeyId"],
            secret_access_key=values["SecretAccessKey"],
            session_token=values["Token"],
            expiration=expiration,
            last_updated=last_updated,
        )

    def process_output(self) -> dict[str, Any]:
        """The AWS SDK ``credential_process`` document (``Version: 1``)."""
        return {
            "Version": 1,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": format_time(self.expiration),
        }


class _Connection(http.client.HTTPConnection):
    """An HTTP connection whose socket is optionally created as another uid."""

    def __init__(self, host: str, port: int, timeout: float, owner_uid: int | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self._owner_uid = owner_uid

    def connect(self) -> None:
        last: OSError | None = None
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        for family, kind, proto, _, address in infos:
            sock = _socket_as(self._owner_uid, family, kind, proto)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(self.timeout)
                sock.connect(address)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            return
        raise last or OSError(f"no address for {self.host}")


def _socket_as(uid: int | None, family: int, kind: int, proto: int) -> socket.socket:
    """A socket owned by ``uid`` (the firewall matches the socket's owner).

    The kernel records the creator's (fs)uid in the socket; switching the
    effective uid for the call is enough and is undone at once. It changes
    the uid of the whole process, so only single-threaded callers (``audit``)
    may pass a ``uid``.
    """
    if uid is None or uid == os.geteuid():
        return socket.socket(family, kind, proto)
    os.seteuid(uid)
    try:
        return socket.socket(family, kind, proto)
    finally:
        os.seteuid(0)


class ImdsClient:
    """IMDS over HTTP (see the module docstring).

    ``url`` is ``http://HOST[:PORT]`` (IPv6 hosts in brackets). ``timeout``
    bounds the connect and every read. ``token_ttl`` is what the token PUT
    asks for. Thread-safe: requests may run concurrently; the token is shared.
    """

    def __init__(
        self,
        url: str = DEFAULT_IMDS_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        owner_uid: int | None = None,
        token_ttl: int = MAX_TOKEN_TTL,
        max_body: int = DEFAULT_MAX_BODY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"IMDS URL must be http://HOST[:PORT], got {url!r}")
        if not 1 <= token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token TTL must be 1..{MAX_TOKEN_TTL} seconds")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout
        self.owner_uid = owner_uid
        self.token_ttl = token_ttl
        self.max_body = max_body
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._count_lock = threading.Lock()
        self._requests = 0

    def __repr__(self) -> str:
        return f"ImdsClient({self.url!r}, owner_uid={self.owner_uid!r}, timeout={self.timeout!r})"

    @property
    def request_count(self) -> int:
        """HTTP requests sent to IMDS so far (token PUTs included)."""
        return self._requests

    # -- low level

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> ImdsResponse:
        """Send one request on a fresh connection and read the whole answer."""
        what = f"IMDS {method} {path} at {self.url}"
        with self._count_lock:
            self._requests += 1
        conn = _Connection(self.host, self.port, self.timeout, self.owner_uid)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            conn.putheader("User-Agent", f"imdsguard/{__version__}")
            conn.putheader("Accept", "*/*")
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if method == "PUT":
                conn.putheader("Content-Length", "0")
            conn.endheaders()
            resp = conn.getresponse()
            if resp.length is not None and resp.length > self.max_body:
                raise ImdsRequestError(
                    f"{what}: answer larger than {self.max_body} bytes", kind="protocol"
                )
            # With a known length, read() raises IncompleteRead on a short body; read(n) would not.
            body = resp.read() if resp.length is not None else resp.read(self.max_body + 1)
            if len(body) > self.max_body:
                raise ImdsRequestError(
                    f"{what}: answer larger than {self.max_body} bytes", kind="protocol"
                )
            return ImdsResponse(resp.status, body, {k.lower(): v for k, v in resp.getheaders()})
        except ImdsRequestError:
            raise
        except http.client.IncompleteRead as exc:
            raise ImdsRequestError(
                f"{what}: answer cut short after {len(exc.partial)} bytes", kind="truncated"
            ) from None
        except socket.timeout:
            raise ImdsRequestError(
                f"{what}: no answer within {self.timeout:g}s", kind="timeout"
            ) from None
        except (http.client.RemoteDisconnected, ConnectionResetError):
            raise ImdsRequestError(f"{what}: connection reset", kind="connection") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ImdsRequestError(f"{what}: {reason}", kind="connection") from None
        except http.client.HTTPException as exc:
            raise ImdsRequestError(
                f"{what}: not a valid HTTP answer ({type(exc).__name__})", kind="protocol"
            ) from None
        finally:
            conn.close()

    # -- tokens

    def token(self) -> str:
        """A valid IMDSv2 session token (cached; renewed before its TTL)."""
        with self._lock:
            if self._token is not None and self._clock() < self._token_renew_at:
                return self._token
            started = self._clock()
            resp = self.request("PUT", TOKEN_PATH, {TTL_HEADER: str(self.token_ttl)})
            if resp.status != 200:
                hint = " (hop limit, or IMDS disabled?)" if resp.status in (403, 404) else ""
                raise ImdsRequestError(
                    f"IMDS token request (PUT {TOKEN_PATH}) answered HTTP {resp.status}{hint}",
                    kind="http",
                    status=resp.status,
                )
            token = resp.text().strip()
            if not token or any(c.isspace() for c in token):
                raise ImdsRequestError("IMDS sent an empty or malformed token", kind="invalid")
            try:
                ttl = int(resp.headers.get(TTL_HEADER.lower(), self.token_ttl))
            except ValueError:
                ttl = self.token_ttl
            ttl = max(1, min(ttl, self.token_ttl))
            # Renew well before the TTL: by 10% of it, at most 5 minutes.
            self._token = token
            self._token_renew_at = started + ttl - min(300.0, ttl * 0.1)
            return token

    def drop_token(self) -> None:
        """Forget the cached token (the next v2 request gets a new one)."""
        with self._lock:
            self._token = None
            self._token_renew_at = 0.0

    # -- reads

    def get(self, path: str, *, token: bool = True) -> ImdsResponse:
        """GET ``path``: IMDSv2 with a token (default) or IMDSv1 (``token=False``).

        Any HTTP status is returned, except that a v2 ``401`` (expired or
        revoked token) is retried once with a new token.
        """
        if not token:
            return self.request("GET", path)
        resp = self.request("GET", path, {TOKEN_HEADER: self.token()})
        if resp.status == 401:
            self.drop_token()
            resp = self.request("GET", path, {TOKEN_HEADER: self.token()})
        return resp

    def get_bytes(self, path: str, *, token: bool = True) -> bytes:
        """The body of a ``200`` answer; any other status raises :class:`ImdsRequestError`."""
        resp = self.get(path, token=token)
        if resp.status != 200:
            version = "IMDSv2" if token else "IMDSv1"
            raise ImdsRequestError(
                f"IMDS GET {path} ({version}) answered HTTP {resp.status}",
                kind="http",
                status=resp.status,
            )
        return resp.body

    def get_text(self, path: str, *, token: bool = True) -> str:
        """Like :meth:`get_bytes`, decoded."""
        return self.get_bytes(path, token=token).decode("utf-8", "replace")

    def imdsv1_enabled(self) -> bool:
        """Whether IMDS answers a token-less GET (``HttpTokens: optional``)."""
        status = self.get("/latest/meta-data/", token=False).status
        if status == 401:
            return False
        if status == 200:
            return True
        raise ImdsRequestError(
            f"IMDS GET /latest/meta-data/ (IMDSv1) answered HTTP {status}",
            kind="http",
            status=status,
        )

    def role_name(self) -> str:
        """The instance profile's role, from ``iam/security-credentials/``."""
        resp = self.get(CREDENTIALS_PATH)
        if resp.status == 404:
            raise ImdsRequestError(
                "no IAM role is attached to this instance (IMDS has no security-credentials)",
                kind="no-role",
                status=404,
            )
        if resp.status != 200:
            raise ImdsRequestError(
                f"IMDS GET {CREDENTIALS_PATH} answered HTTP {resp.status}",
                kind="http",
                status=resp.status,
            )
        names = [line.strip() for line in resp.text().splitlines() if line.strip()]
        if not names:
            raise ImdsRequestError(
                "no IAM role is attached to this instance (empty security-credentials)",
                kind="no-role",
            )
        role = names[0]
        if "/" in role or len(role) > 128:
            raise ImdsRequestError("IMDS listed an invalid role name", kind="invalid")
        return role

    def role_credentials(self, role: str | None = None) -> Credentials:
        """The role's current credentials (the role is discovered when not given)."""
        role = role or self.role_name()
        path = CREDENTIALS_PATH + role
        resp = self.get(path)
        if resp.status == 404:
            raise ImdsRequestError(
                f"IMDS has no credentials for role {role!r} (instance profile changed?)",
                kind="no-role",
                status=404,
            )
        if resp.status != 200:
            raise ImdsRequestError(
                f"IMDS GET {path} answered HTTP {resp.status}", kind="http", status=resp.status
            )
        return Credentials.from_document(resp.body, role)
