"""A simulated EC2 instance metadata service (IMDS) for tests and demos.

It answers the way AWS documents IMDS, closely enough that real clients
(cloud-init's EC2 datasource, amazon-ec2-utils' ``ec2-metadata``,
cloud-guest-utils' ``ec2metadata``, botocore and the AWS CLI) work against it
unmodified (tests/integration/test_clients.py). Faults can be injected through
a control file or in process, and every request can be appended as one JSON
line to a request log so harnesses can count what reached IMDS. The log never
holds a token value.

From AWS's documentation (EC2 User Guide, "Instance metadata" pages and the
``InstanceMetadataOptions`` API reference):

- IMDSv2 session tokens from ``PUT /latest/api/token`` with
  ``X-aws-ec2-metadata-token-ttl-seconds`` 1..21600 (400 otherwise, 403 when
  the PUT carries ``X-Forwarded-For``); tokened GETs with an invalid or
  expired token are 401; with ``http-tokens required`` a GET without a token
  is 401; ``http-endpoint disabled`` refuses access (403 here, see below).
- ``http-put-response-hop-limit`` (1..64, default 1): the IP TTL / IPv6 hop
  limit of token responses, so a client one forwarding hop away (a container
  behind the host's bridge) gets no token with 1 and does with 2.
- ``GET /`` lists the API versions, then ``latest``; the categories of
  ``meta-data/`` (ami-id, block-device-mapping/, events/maintenance/{history,
  scheduled}, hostname, iam/{info, security-credentials/ROLE},
  identity-credentials/ec2/{info, security-credentials/ec2-instance},
  instance-action, instance-id, instance-life-cycle, instance-type, ipv6,
  local-hostname, local-ipv4, mac, metrics/vhostmd, network/interfaces/macs/
  MAC/{device-number, interface-id, ipv4-associations/, ipv6s, local-hostname,
  local-ipv4s, mac, network-card-index, owner-id, public-hostname,
  public-ipv4s, security-group-ids, security-groups, subnet-id,
  subnet-ipv4-cidr-block, subnet-ipv6-cidr-blocks, vpc-id,
  vpc-ipv4-cidr-block(s), vpc-ipv6-cidr-blocks}, placement/{availability-zone,
  availability-zone-id, region}, public-hostname, public-ipv4,
  public-keys/0=NAME, reservation-id, security-groups, services/{domain,
  partition}) and ``dynamic/instance-identity/{document, pkcs7, signature,
  rsa2048}`` with the document's fields, and the first API version of each
  category (the "Version when category was released" column).
- Listings: one name a line, subdirectories with a trailing ``/``;
  multi-valued leaves one value a line; JSON documents pretty-printed.

Inferred (from what clients rely on and from captured EC2 output, not from a
specification):

- Which dated versions ``GET /`` lists (1.0 .. 2022-09-24 here; EC2 may list
  later ones) and that a dated tree hides the categories released after its
  version (2009-04-04 has no ``iam/``, ``mac`` or ``network/``; ``placement/``
  there holds only ``availability-zone``). Releases between listed versions
  (2018-05-23, 2020-08-24, 2020-11-01) appear from the next listed version.
- Empty path segments and a trailing slash are ignored, on leaves as on
  directories (botocore asks ``placement/availability-zone/``, ec2-metadata
  ``/latest//meta-data/reservation-id``, and both work on EC2).
- Status 403 for every request while ``http-endpoint`` is disabled; the error
  bodies (the XHTML page below) and ``Server: EC2ws``; 405 for other methods;
  ``GET /latest/`` listing ``dynamic``, ``meta-data`` and ``user-data`` (only
  when there is user data).
- That the hop limit covers every packet of the connection after a token
  response (so its retransmissions die as the reply did), not the handshake.
- Values: the zone id (``use1-az1``) follows the zone letter (EC2 maps letters
  to ids per account); ``profile`` is ``default-hvm``; no kernel, ramdisk,
  product codes, ancestor AMIs or tags; maintenance events ``[]``.
  ``pkcs7``, ``signature`` and ``rsa2048`` have the shape of AWS's (base64,
  64 columns) but are random bytes that no AWS certificate verifies.

Standard library only. Run it as::

    python -m imdsguard_testing.imds_sim --listen 169.254.169.254:80 \\
        --listen '[fd00:ec2::254]:80' --ready-file /run/imds-sim.ready

or in process::

    sim = ImdsSimulator(SimConfig())
    [(host, port)] = sim.serve([("127.0.0.1", 0)])
    ...
    sim.shutdown()
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import json
import os
import re
import secrets
import signal
import socket
import socketserver
import string
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Union, cast
from urllib.parse import urlsplit

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a path, not a secret
TOKEN_SEGMENTS = ["latest", "api", "token"]
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL = 21600
DEFAULT_ROLE = "imdsguard-demo-role"
DEFAULT_INSTANCE_ID = "i-0123456789abcdef0"
#: Fault kinds understood by :meth:`ImdsSimulator.set_fault` and the control file.
FAULT_KINDS = frozenset({"500", "timeout", "truncate", "reset", "expire-tokens"})
DEFAULT_TIMEOUT_DELAY = 10.0
#: The dated API versions ``GET /`` lists before ``latest`` (as EC2 lists them).
API_VERSIONS = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15",
    "2008-02-01", "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12",
    "2014-02-25", "2014-11-05", "2015-10-20", "2016-04-19", "2016-06-30", "2016-09-02",
    "2018-03-28", "2018-08-17", "2018-09-24", "2019-10-01", "2020-10-27", "2021-01-03",
    "2021-03-23", "2021-07-15", "2022-09-24",
)  # fmt: skip
#: EC2's default ``http-put-response-hop-limit``.
DEFAULT_HOP_LIMIT = 1
MAX_HOP_LIMIT = 64
#: New credentials are issued this long before the current ones expire.
ROTATION_MARGIN = 300.0

_DIRECTION_ABBREV = {
    "east": "e", "west": "w", "north": "n", "south": "s", "central": "c",
    "northeast": "ne", "northwest": "nw", "southeast": "se", "southwest": "sw",
}  # fmt: skip
_MAX_REQUEST_BODY = 1 << 20
_MAX_TOKENS = 4096
_MAX_RECORDS = 10000
_ACCESS_KEY_ALPHABET = string.ascii_uppercase + string.digits
_TTL_RE = re.compile(r"[0-9]{1,9}")
_LISTEN_V6_RE = re.compile(r"\[([0-9A-Fa-f:.]+(?:%[\w.-]+)?)\]:([0-9]{1,5})")
_LISTEN_V4_RE = re.compile(r"([^\[\]:\s]+):([0-9]{1,5})")

# The body real IMDS sends with its error statuses.
_ERROR_HTML = """<?xml version="1.0" encoding="iso-8859-1"?>
<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"
\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">
 <head>
  <title>%(code)d - %(message)s</title>
 </head>
 <body>
  <h1>%(code)d - %(message)s</h1>
 </body>
</html>
"""
_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    500: "Internal Server Error",
}


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """What the simulated instance looks like and how strict its IMDS is."""

    instance_id: str = DEFAULT_INSTANCE_ID
    ami_id: str = "ami-0abcdef1234567890"
    instance_type: str = "t3.micro"
    region: str = "us-east-1"
    availability_zone: str | None = None  # default: region + "a"
    local_ipv4: str = "172.31.16.5"
    hostname: str | None = None  # default: derived from local_ipv4 and region
    mac: str = "0e:12:34:56:78:9a"
    account_id: str = "123456789012"
    role: str | None = DEFAULT_ROLE  # None: no instance profile attached
    http_tokens: str = "optional"  # "optional" (IMDSv1 allowed) or "required"
    http_endpoint: str = "enabled"  # "disabled": every request is 403
    #: IP TTL / IPv6 hop limit of token (PUT) responses: 1 stops them one
    #: forwarding hop away (a container behind the host's bridge), as on EC2.
    hop_limit: int = DEFAULT_HOP_LIMIT
    public_ipv4: str | None = "203.0.113.25"  # None: no public address
    ipv6: str | None = "2600:1f18:4b2:b300:5c1d:2e3f:4a5b:6c7d"  # None: no IPv6 address
    subnet_ipv4_cidr: str = "172.31.16.0/20"
    vpc_ipv4_cidr: str = "172.31.0.0/16"
    subnet_ipv6_cidr: str = "2600:1f18:4b2:b300::/64"
    vpc_ipv6_cidr: str = "2600:1f18:4b2:b300::/56"
    vpc_id: str = "vpc-0a1b2c3d4e5f67890"
    subnet_id: str = "subnet-0a1b2c3d4e5f67890"
    interface_id: str = "eni-0a1b2c3d4e5f67890"
    security_groups: tuple[tuple[str, str], ...] = (("default", "sg-0a1b2c3d4e5f67890"),)
    key_name: str | None = "imdsguard-demo-key"  # None: launched without a key pair
    availability_zone_id: str | None = None  # default: derived from the zone's name
    user_data: bytes | None = None  # None: /latest/user-data is 404
    credential_lifetime: float = 3600.0
    request_log: str | None = None
    control_file: str | None = None
    verbose: bool = False  # one line per request on stderr

    def __post_init__(self) -> None:
        if self.http_tokens not in ("optional", "required"):
            raise ValueError(
                f"http_tokens must be 'optional' or 'required', not {self.http_tokens!r}"
            )
        if not self.credential_lifetime > 0:
            raise ValueError("credential_lifetime must be a positive number of seconds")
        if self.role is not None and (not self.role or "/" in self.role):
            raise ValueError(f"invalid role name {self.role!r}")
        if self.http_endpoint not in ("enabled", "disabled"):
            raise ValueError(
                f"http_endpoint must be 'enabled' or 'disabled', not {self.http_endpoint!r}"
            )
        if isinstance(self.hop_limit, bool) or not 1 <= self.hop_limit <= MAX_HOP_LIMIT:
            raise ValueError(f"hop_limit must be 1..{MAX_HOP_LIMIT}, not {self.hop_limit!r}")

    @property
    def effective_availability_zone(self) -> str:
        """The availability zone, defaulting to the region's first zone."""
        return self.availability_zone or self.region + "a"

    @property
    def effective_availability_zone_id(self) -> str:
        """The zone id (``use1-az1``): region initials plus the zone letter's number.

        EC2 maps zone letters to zone ids per account; this fixed mapping
        (a -> az1, b -> az2, ...) only keeps the two consistent.
        """
        if self.availability_zone_id:
            return self.availability_zone_id
        zone = self.effective_availability_zone
        parts = self.region.split("-")
        middle = "".join(_DIRECTION_ABBREV.get(p, p[:1]) for p in parts[1:-1])
        letter = zone[len(self.region) :] or "a"
        return f"{parts[0]}{middle}{parts[-1]}-az{ord(letter[0]) - ord('a') + 1}"

    @property
    def public_hostname(self) -> str | None:
        """The public DNS name EC2 derives from the public address, if any."""
        if self.public_ipv4 is None:
            return None
        stem = "ec2-" + self.public_ipv4.replace(".", "-")
        if self.region == "us-east-1":
            return stem + ".compute-1.amazonaws.com"
        return f"{stem}.{self.region}.compute.amazonaws.com"

    @property
    def effective_hostname(self) -> str:
        """The private DNS name, defaulting to the one EC2 derives from the IP."""
        if self.hostname:
            return self.hostname
        stem = "ip-" + self.local_ipv4.replace(".", "-")
        if self.region == "us-east-1":
            return stem + ".ec2.internal"
        return f"{stem}.{self.region}.compute.internal"


@dataclasses.dataclass(frozen=True)
class Fault:
    """An injected fault: what goes wrong, for which paths, after what delay.

    ``kind`` is ``None`` (no fault; a positive ``delay`` still adds latency) or
    one of :data:`FAULT_KINDS`. ``paths`` holds path prefixes the fault applies
    to (``None``: every request). ``delay`` is slept before the fault acts;
    for ``"timeout"`` an unset or non-positive delay means
    :data:`DEFAULT_TIMEOUT_DELAY`. ``"expire-tokens"`` revokes every token
    issued so far once, when the fault is applied; it ignores ``paths``.
    """

    kind: str | None = None
    paths: tuple[str, ...] | None = None
    delay: float | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if self.delay is not None and not self.delay >= 0:
            raise ValueError("delay must be a non-negative number of seconds")

    @classmethod
    def from_json(cls, data: object) -> Fault:
        """Build a fault from the parsed JSON of a control file."""
        if not isinstance(data, dict):
            raise ValueError("control file must hold a JSON object")
        kind = data.get("fault")
        if isinstance(kind, int) and not isinstance(kind, bool):
            kind = str(kind)
        if kind is not None and not isinstance(kind, str):
            raise ValueError("'fault' must be null or a string")
        paths = data.get("paths")
        if paths is not None and (
            not isinstance(paths, list) or not all(isinstance(p, str) for p in paths)
        ):
            raise ValueError("'paths' must be null or a list of strings")
        delay = data.get("delay")
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))):
            raise ValueError("'delay' must be null or a number")
        return cls(
            kind=kind,
            paths=None if paths is None else tuple(paths),
            delay=None if delay is None else float(delay),
        )

    def matches(self, path: str) -> bool:
        """Whether a request for ``path`` is subject to this fault."""
        return self.paths is None or any(path.startswith(p) for p in self.paths)

    def effective_delay(self) -> float:
        """Seconds to wait before acting on a matching request."""
        if self.kind == "timeout" and not self.delay:
            return DEFAULT_TIMEOUT_DELAY
        return self.delay or 0.0

    def acts_per_request(self) -> bool:
        """Whether matching requests are affected (rather than only state)."""
        return self.kind in ("500", "timeout", "truncate", "reset") or self.effective_delay() > 0


@dataclasses.dataclass(frozen=True)
class Response:
    """An HTTP answer computed by :meth:`ImdsSimulator.respond`."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()
    #: IP TTL / IPv6 hop limit for the reply's packets (None: the kernel's default).
    hop_limit: int | None = None


@dataclasses.dataclass(frozen=True)
class _Credentials:
    access_key_id: str
    secret_access_key: str
    token: str
    issued: float  # on the simulator's monotonic clock
    expires: float


class _Dir:
    """A directory of the metadata tree.

    ``slash`` marks subdirectories with a trailing ``/`` in listings (AWS does
    so below the version level); ``since`` holds, per entry, the first API
    version that has it (entries without one exist since 1.0); ``labels``
    replaces an entry's name in listings (``public-keys/`` lists ``0=name``
    for the directory ``0``).
    """

    __slots__ = ("entries", "labels", "since", "slash")

    def __init__(self, entries: Mapping[str, _Node] | None = None, slash: bool = True) -> None:
        self.entries: dict[str, _Node] = dict(entries or {})
        self.since: dict[str, str] = {}
        self.labels: dict[str, str] = {}
        self.slash = slash

    def add(
        self, name: str, node: _Node, since: str | None = None, label: str | None = None
    ) -> _Dir:
        """Add an entry (first present in API version ``since``); returns self."""
        self.entries[name] = node
        if since is not None:
            self.since[name] = since
        if label is not None:
            self.labels[name] = label
        return self

    def visible(self, name: str, version: str | None) -> bool:
        """Whether ``name`` exists in API ``version`` (``None``: latest)."""
        # Dated versions compare as strings: "1.0" sorts before every "YYYY-MM-DD".
        return name in self.entries and (version is None or self.since.get(name, "1.0") <= version)

    def listing(self, version: str | None = None) -> bytes:
        names = []
        for name, node in self.entries.items():
            if not self.visible(name, version):
                continue
            if name in self.labels:
                names.append(self.labels[name])
            else:
                names.append(name + "/" if self.slash and isinstance(node, _Dir) else name)
        return "\n".join(names).encode()


_Node = Union[_Dir, Callable[[], bytes]]


def _error(status: int, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    body = _ERROR_HTML % {"code": status, "message": _REASONS.get(status, "Error")}
    return Response(status, body.encode("latin-1"), "text/html", headers)


def _rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: str) -> Callable[[], bytes]:
    data = value.encode()
    return lambda: data


def _wrapped_b64(data: bytes) -> str:
    text = base64.b64encode(data).decode()
    return "\n".join(text[i : i + 64] for i in range(0, len(text), 64))


def _json_leaf(build: Callable[[], Mapping[str, object]]) -> Callable[[], bytes]:
    # AWS pretty-prints its JSON documents with two-space indentation.
    return lambda: json.dumps(build(), indent=2).encode()


class ImdsSimulator:
    """A simulated IMDS: state (tokens, credentials, faults) plus HTTP listeners.

    ``clock`` is a monotonic clock (default :func:`time.monotonic`); token and
    credential lifetimes follow it, and the wall-clock times the service shows
    (``LastUpdated``, ``Expiration``) advance with it from ``wall_clock()`` at
    construction, so tests can move time forward by advancing ``clock`` alone.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config if config is not None else SimConfig()
        self._clock = clock or time.monotonic
        self._mono_base = self._clock()
        self._wall_base = (wall_clock or time.time)()
        self._lock = threading.Lock()
        self._control_lock = threading.Lock()
        self._stop = threading.Event()
        self._tokens: dict[str, float] = {}
        self._credentials: dict[str, _Credentials] = {}
        self._fault: Fault | None = None
        self._control_sig: tuple[int, int, int] | None = None
        self._request_count = 0
        self._by_path: collections.Counter[str] = collections.Counter()
        self._records: collections.deque[dict[str, object]] = collections.deque(maxlen=_MAX_RECORDS)
        self._log_warned = False
        self._servers: list[tuple[_SimServer, threading.Thread]] = []
        self._profile_id = "AIPA" + self._random_id(17)
        self._tree = self._build_tree()

    # -- lifecycle -----------------------------------------------------------

    def serve(self, listen: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Bind one HTTP server per ``(host, port)`` and serve each in a thread.

        IPv6 hosts may be given with or without brackets. Returns the bound
        ``(host, port)`` pairs in order (useful with port 0). Raises
        :class:`OSError` if any address cannot be bound; none is left open then.
        """
        created: list[_SimServer] = []
        try:
            for host, port in listen:
                bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
                family = socket.AF_INET6 if ":" in bare else socket.AF_INET
                created.append(_SimServer((bare, port), self, family))
        except OSError:
            for server in created:
                server.server_close()
            raise
        self._poll_control()
        bound: list[tuple[str, int]] = []
        for server in created:
            address = server.server_address
            host, port = str(address[0]), int(address[1])
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"imds-sim-{host}:{port}",
                daemon=True,
            )
            thread.start()
            self._servers.append((server, thread))
            bound.append((host, port))
        return bound

    def shutdown(self) -> None:
        """Stop every listener, drop open connections and wait for the threads."""
        self._stop.set()
        servers, self._servers = self._servers, []
        for server, _ in servers:
            server.shutdown()
        for server, _ in servers:
            server.close_connections()
            server.server_close()
        for _, thread in servers:
            thread.join(timeout=5)

    def __enter__(self) -> ImdsSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- faults and control --------------------------------------------------

    @property
    def fault(self) -> Fault | None:
        """The fault in force, if any."""
        return self._fault

    def set_fault(
        self, kind: str | None, paths: Sequence[str] | None = None, delay: float | None = None
    ) -> None:
        """Inject a fault (see :class:`Fault`); ``kind=None`` clears it."""
        self._apply_fault(Fault(kind, None if paths is None else tuple(paths), delay))

    def clear_fault(self) -> None:
        """Remove any injected fault."""
        self._apply_fault(None)

    def expire_tokens(self) -> None:
        """Invalidate every session token issued so far."""
        with self._lock:
            self._tokens.clear()

    def _apply_fault(self, fault: Fault | None) -> None:
        if fault is not None and fault.kind is None and not fault.delay:
            fault = None
        self._fault = fault
        if fault is not None and fault.kind == "expire-tokens":
            self.expire_tokens()

    def _poll_control(self) -> None:
        path = self.config.control_file
        if path is None:
            return
        try:
            st = Path(path).stat()
        except FileNotFoundError:
            sig = None
        except OSError:
            return
        else:
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._control_lock:
            if sig == self._control_sig:
                return
            self._control_sig = sig
            if sig is None:
                self._apply_fault(None)
                return
            try:
                with open(path, encoding="utf-8") as f:
                    fault = Fault.from_json(json.load(f))
            except (OSError, ValueError) as exc:
                print(f"imds_sim: ignoring control file {path}: {exc}", file=sys.stderr)
                return
            self._apply_fault(fault)

    def _fault_for(self, path: str) -> Fault | None:
        self._poll_control()
        fault = self._fault
        if fault is not None and fault.acts_per_request() and fault.matches(path):
            return fault
        return None

    # -- request accounting --------------------------------------------------

    @property
    def request_count(self) -> int:
        """How many requests (answered or faulted) the listeners have seen."""
        return self._request_count

    def count_for(self, prefix: str) -> int:
        """How many requests had a path starting with ``prefix``."""
        with self._lock:
            return sum(n for p, n in self._by_path.items() if p.startswith(prefix))

    def records(self) -> list[dict[str, object]]:
        """The most recent request records, oldest first (same shape as the log)."""
        with self._lock:
            return [dict(r) for r in self._records]

    def reset_counters(self) -> None:
        """Forget the in-memory request count and records (not the log file)."""
        with self._lock:
            self._request_count = 0
            self._by_path.clear()
            self._records.clear()

    def record_request(
        self,
        *,
        method: str,
        path: str,
        client: str,
        token_present: bool,
        status: int | None,
        fault: str | None = None,
    ) -> None:
        """Count one request and append it to the request log if configured."""
        record: dict[str, object] = {
            "ts": round(time.time(), 6),
            "method": method,
            "path": path,
            "client": client,
            "token": token_present,
            "status": status,
        }
        if fault is not None:
            record["fault"] = fault
        with self._lock:
            self._request_count += 1
            self._by_path[path] += 1
            self._records.append(record)
        line = json.dumps(record, separators=(",", ":")) + "\n"
        if self.config.verbose:
            sys.stderr.write("imds_sim: " + line)
        if self.config.request_log is not None:
            self._append_log(self.config.request_log, line.encode())

    def _append_log(self, path: str, data: bytes) -> None:
        # One O_APPEND write per line keeps lines whole even with several
        # writers, and reopening lets a harness truncate or remove the file.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._log_warned:
                self._log_warned = True
                print(f"imds_sim: cannot write request log {path}: {exc}", file=sys.stderr)

    # -- tokens and credentials ----------------------------------------------

    def _now(self) -> float:
        return self._clock()

    def _wall(self, mono: float) -> float:
        return self._wall_base + (mono - self._mono_base)

    def issue_token(self, ttl: int) -> str:
        """Issue a session token valid for ``ttl`` seconds (1..21600)."""
        if not 1 <= ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token TTL must be 1..{MAX_TOKEN_TTL}")
        # Shaped like real tokens: 56 base64 characters starting "AQAE".
        token = base64.b64encode(b"\x01\x00\x04" + secrets.token_bytes(39)).decode()
        now = self._now()
        with self._lock:
            if len(self._tokens) >= _MAX_TOKENS:
                self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl
        return token

    def token_valid(self, token: str) -> bool:
        """Whether ``token`` was issued here and has not expired or been revoked."""
        now = self._now()
        with self._lock:
            expires = self._tokens.get(token)
            if expires is None:
                return False
            if now >= expires:
                del self._tokens[token]
                return False
            return True

    @staticmethod
    def _random_id(length: int) -> str:
        return "".join(secrets.choice(_ACCESS_KEY_ALPHABET) for _ in range(length))

    def current_credentials(self, which: str = "role") -> dict[str, str]:
        """The role credentials document IMDS would serve now, rotating if due.

        A new set is issued when the current one expires within
        :data:`ROTATION_MARGIN` seconds (capped at half the lifetime, so short
        test lifetimes still give each set a useful life). ``which`` names an
        independent set: ``"role"`` (the instance profile's, under
        ``iam/security-credentials/``) or ``"ec2-instance"`` (the instance
        identity's, under ``identity-credentials/ec2/``).
        """
        lifetime = float(self.config.credential_lifetime)
        margin = min(ROTATION_MARGIN, lifetime / 2)
        now = self._now()
        with self._lock:
            creds = self._credentials.get(which)
            if creds is None or now >= creds.expires - margin:
                creds = _Credentials(
                    access_key_id="ASIA" + self._random_id(16),
                    secret_access_key=base64.b64encode(secrets.token_bytes(30)).decode(),
                    token="IQoJb3JpZ2luX2Vj" + base64.b64encode(secrets.token_bytes(288)).decode(),
                    issued=now,
                    expires=now + lifetime,
                )
                self._credentials[which] = creds
        return {
            "Code": "Success",
            "LastUpdated": _rfc3339(self._wall(creds.issued)),
            "Type": "AWS-HMAC",
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key,
            "Token": creds.token,
            "Expiration": _rfc3339(self._wall(creds.expires)),
        }

    # -- the service ---------------------------------------------------------

    def _build_tree(self) -> _Dir:
        """The tree under each version; ``since`` versions follow AWS's category table."""
        cfg = self.config
        started = _rfc3339(self._wall_base)
        meta = _Dir()
        meta.add("ami-id", _text(cfg.ami_id))
        meta.add("ami-launch-index", _text("0"))
        meta.add("ami-manifest-path", _text("(unknown)"))
        meta.add(
            "block-device-mapping",
            _Dir({"ami": _text("/dev/xvda"), "root": _text("/dev/xvda")}),
            since="2007-12-15",
        )
        maintenance = _Dir({"history": _text("[]"), "scheduled": _text("[]")})
        meta.add("events", _Dir({"maintenance": maintenance}), since="2018-08-17")
        meta.add("hostname", _text(cfg.effective_hostname))
        if cfg.role is not None:
            role = cfg.role
            info = {
                "Code": "Success",
                "LastUpdated": started,
                "InstanceProfileArn": f"arn:aws:iam::{cfg.account_id}:instance-profile/{role}",
                "InstanceProfileId": self._profile_id,
            }
            iam = _Dir({"info": _json_leaf(lambda: info)})
            iam.add("security-credentials", _Dir({role: _json_leaf(self.current_credentials)}))
            meta.add("iam", iam, since="2012-01-12")
        identity_info = {"Code": "Success", "LastUpdated": started, "AccountId": cfg.account_id}
        ec2_creds = _json_leaf(lambda: self.current_credentials("ec2-instance"))
        ec2 = _Dir({"info": _json_leaf(lambda: identity_info)})
        ec2.add("security-credentials", _Dir({"ec2-instance": ec2_creds}))
        meta.add("identity-credentials", _Dir({"ec2": ec2}), since="2018-05-23")
        meta.add("instance-action", _text("none"), since="2008-09-01")
        meta.add("instance-id", _text(cfg.instance_id))
        meta.add("instance-life-cycle", _text("on-demand"), since="2019-10-01")
        meta.add("instance-type", _text(cfg.instance_type), since="2007-08-29")
        if cfg.ipv6 is not None:
            meta.add("ipv6", _text(cfg.ipv6), since="2021-01-03")
        meta.add("local-hostname", _text(cfg.effective_hostname), since="2007-01-19")
        meta.add("local-ipv4", _text(cfg.local_ipv4))
        meta.add("mac", _text(cfg.mac), since="2011-01-01")
        meta.add(
            "metrics",
            _Dir({"vhostmd": _text('<?xml version="1.0" encoding="UTF-8"?>')}),
            since="2011-05-01",
        )
        macs = _Dir({cfg.mac: self._interface()})
        meta.add("network", _Dir({"interfaces": _Dir({"macs": macs})}), since="2011-01-01")
        placement = _Dir()
        placement.add("availability-zone", _text(cfg.effective_availability_zone))
        placement.add(
            "availability-zone-id", _text(cfg.effective_availability_zone_id), since="2019-10-01"
        )
        placement.add("region", _text(cfg.region), since="2020-08-24")
        meta.add("placement", placement, since="2008-02-01")
        meta.add("profile", _text("default-hvm"), since="2011-05-01")
        if cfg.public_ipv4 is not None and cfg.public_hostname is not None:
            meta.add("public-hostname", _text(cfg.public_hostname), since="2007-01-19")
            meta.add("public-ipv4", _text(cfg.public_ipv4), since="2007-01-19")
        if cfg.key_name is not None:
            key = _Dir({"openssh-key": _text(self._openssh_key(cfg.key_name))})
            meta.add("public-keys", _Dir().add("0", key, label=f"0={cfg.key_name}"))
        meta.add("reservation-id", _text("r-0fedcba9876543210"))
        meta.add("security-groups", _text("\n".join(name for name, _ in cfg.security_groups)))
        services = _Dir({"domain": _text("amazonaws.com")})
        services.add("partition", _text("aws"), since="2015-10-20")
        meta.add("services", services, since="2014-02-25")
        document = {
            "accountId": cfg.account_id,
            "architecture": "x86_64",
            "availabilityZone": cfg.effective_availability_zone,
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": cfg.ami_id,
            "instanceId": cfg.instance_id,
            "instanceType": cfg.instance_type,
            "kernelId": None,
            "pendingTime": started,
            "privateIp": cfg.local_ipv4,
            "ramdiskId": None,
            "region": cfg.region,
            "version": "2017-09-30",
        }
        identity = _Dir({"document": _json_leaf(lambda: document)})
        # Shaped like AWS's (base64, 64 columns) but not signed by any key.
        identity.add("pkcs7", _text(_wrapped_b64(secrets.token_bytes(1100))))
        identity.add("signature", _text(_wrapped_b64(secrets.token_bytes(128))))
        identity.add("rsa2048", _text(_wrapped_b64(secrets.token_bytes(1500))))
        tree = _Dir(slash=False)  # AWS lists the version level without trailing slashes
        tree.add("dynamic", _Dir({"instance-identity": identity}), since="2009-04-04")
        tree.add("meta-data", meta)
        if cfg.user_data is not None:
            tree.add("user-data", self._bytes(cfg.user_data))
        return tree

    def _interface(self) -> _Dir:
        """``network/interfaces/macs/<mac>/``: the primary interface, agreeing with the rest."""
        cfg = self.config
        nic = _Dir()
        nic.add("device-number", _text("0"))
        nic.add("interface-id", _text(cfg.interface_id))
        if cfg.public_ipv4 is not None and cfg.public_hostname is not None:
            nic.add("ipv4-associations", _Dir({cfg.public_ipv4: _text(cfg.local_ipv4)}))
        if cfg.ipv6 is not None:
            nic.add("ipv6s", _text(cfg.ipv6), since="2016-06-30")
        nic.add("local-hostname", _text(cfg.effective_hostname))
        nic.add("local-ipv4s", _text(cfg.local_ipv4))
        nic.add("mac", _text(cfg.mac))
        nic.add("network-card-index", _text("0"), since="2020-11-01")
        nic.add("owner-id", _text(cfg.account_id))
        if cfg.public_ipv4 is not None and cfg.public_hostname is not None:
            nic.add("public-hostname", _text(cfg.public_hostname))
            nic.add("public-ipv4s", _text(cfg.public_ipv4))
        nic.add("security-group-ids", _text("\n".join(gid for _, gid in cfg.security_groups)))
        nic.add("security-groups", _text("\n".join(name for name, _ in cfg.security_groups)))
        nic.add("subnet-id", _text(cfg.subnet_id))
        nic.add("subnet-ipv4-cidr-block", _text(cfg.subnet_ipv4_cidr))
        if cfg.ipv6 is not None:
            nic.add("subnet-ipv6-cidr-blocks", _text(cfg.subnet_ipv6_cidr), since="2016-06-30")
        nic.add("vpc-id", _text(cfg.vpc_id))
        nic.add("vpc-ipv4-cidr-block", _text(cfg.vpc_ipv4_cidr))
        nic.add("vpc-ipv4-cidr-blocks", _text(cfg.vpc_ipv4_cidr), since="2016-06-30")
        if cfg.ipv6 is not None:
            nic.add("vpc-ipv6-cidr-blocks", _text(cfg.vpc_ipv6_cidr), since="2016-06-30")
        return nic

    @staticmethod
    def _openssh_key(name: str) -> str:
        # A well-formed ssh-ed25519 public key blob around a random point.
        blob = b"".join(
            struct.pack(">I", len(part)) + part
            for part in (b"ssh-ed25519", secrets.token_bytes(32))
        )
        return f"ssh-ed25519 {base64.b64encode(blob).decode()} {name}"

    @staticmethod
    def _bytes(data: bytes) -> Callable[[], bytes]:
        return lambda: data

    def respond(self, method: str, path: str, headers: Mapping[str, str]) -> Response:
        """Answer one request; ``headers`` keys must be lower-case.

        This is the whole IMDS logic without sockets or faults, so it can be
        called directly from tests. Empty path segments and a trailing slash
        are ignored, on directories and leaves alike, as EC2 does.
        """
        if self.config.http_endpoint == "disabled":
            return _error(403)
        segments = [segment for segment in path.split("/") if segment]
        if not path.startswith("/"):
            return _error(404)
        if segments == TOKEN_SEGMENTS:
            if method != "PUT":
                return _error(405, (("Allow", "PUT"),))
            return dataclasses.replace(self._put_token(headers), hop_limit=self.config.hop_limit)
        if method not in ("GET", "HEAD"):
            return _error(405, (("Allow", "GET, HEAD"),))
        token = headers.get(TOKEN_HEADER.lower())
        if token is not None:
            if not self.token_valid(token.strip()):
                return _error(401)
        elif self.config.http_tokens == "required":
            return _error(401)
        return self._lookup(segments)

    def _put_token(self, headers: Mapping[str, str]) -> Response:
        # IMDS refuses token requests that went through a proxy.
        if "x-forwarded-for" in headers:
            return _error(403)
        raw = (headers.get(TTL_HEADER.lower()) or "").strip()
        if not _TTL_RE.fullmatch(raw):
            return _error(400)
        ttl = int(raw)
        if not 1 <= ttl <= MAX_TOKEN_TTL:
            return _error(400)
        token = self.issue_token(ttl)
        return Response(200, token.encode(), "text/plain", ((TTL_HEADER, str(ttl)),))

    def _lookup(self, segments: list[str]) -> Response:
        if not segments:
            return Response(200, "\n".join((*API_VERSIONS, "latest")).encode())
        head, rest = segments[0], segments[1:]
        if head != "latest" and head not in API_VERSIONS:
            return _error(404)
        version = None if head == "latest" else head
        node: _Node = self._tree
        for segment in rest:
            if not isinstance(node, _Dir) or not node.visible(segment, version):
                return _error(404)
            node = node.entries[segment]
        if isinstance(node, _Dir):
            return Response(200, node.listing(version))
        content_type = "application/octet-stream" if rest == ["user-data"] else "text/plain"
        return Response(200, node(), content_type)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"
    error_message_format = _ERROR_HTML
    error_content_type = "text/html"
    # Idle keep-alive connections are dropped after this many seconds.
    timeout = 60

    _fault_name: str | None = None
    _logged = False

    @property
    def _sim(self) -> ImdsSimulator:
        return cast("_SimServer", self.server).sim

    def version_string(self) -> str:
        return "EC2ws"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def parse_request(self) -> bool:
        self._fault_name = None
        self._logged = False
        return super().parse_request()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        try:
            status: int | None = int(code)
        except ValueError:
            status = None
        self._record(status)

    def _record(self, status: int | None) -> None:
        if self._logged:
            return
        self._logged = True
        headers = getattr(self, "headers", None)
        token_present = headers is not None and headers.get(TOKEN_HEADER) is not None
        self._sim.record_request(
            method=self.command or "",
            path=getattr(self, "path", ""),
            client=str(self.client_address[0]),
            token_present=token_present,
            status=status,
            fault=self._fault_name,
        )

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        sim = self._sim
        if not self._drain_body():
            return
        path = self.path
        if path.startswith(("http://", "https://")):
            path = urlsplit(path).path or "/"
        path = path.split("?", 1)[0].split("#", 1)[0]
        fault = sim._fault_for(path)
        if fault is not None:
            self._fault_name = fault.kind or "delay"
            delay = fault.effective_delay()
            if delay > 0 and sim._stop.wait(delay):
                self._reset()
                return
            if fault.kind == "500":
                self._send(_error(500))
                return
            if fault.kind == "reset":
                self._reset()
                return
        headers = {k.lower(): str(v) for k, v in self.headers.items()}
        response = sim.respond(self.command, path, headers)
        self._send(response, truncate=fault is not None and fault.kind == "truncate")

    def _drain_body(self) -> bool:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._send(_error(400), close=True)
            return False
        length = self.headers.get("Content-Length")
        if length is None:
            return True
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            self._send(_error(400), close=True)
            return False
        if n > _MAX_REQUEST_BODY:
            self._send(_error(413), close=True)
            return False
        if n:
            self.rfile.read(n)
        return True

    def _send(self, response: Response, truncate: bool = False, close: bool = False) -> None:
        if response.hop_limit is not None:
            self._set_hop_limit(response.hop_limit)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        body = b"" if self.command == "HEAD" else response.body
        if truncate:
            # Full Content-Length was promised; deliver half and hang up.
            body = body[: len(body) // 2]
            self.close_connection = True
        if body:
            self.wfile.write(body)

    def _set_hop_limit(self, hops: int) -> None:
        # Kept for the rest of the connection, so that retransmissions of the
        # reply are as short-lived as the reply.
        conn = self.connection
        with contextlib.suppress(OSError):
            if conn.family == socket.AF_INET6:
                conn.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
            else:
                conn.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)

    def _reset(self) -> None:
        self._record(None)
        self.close_connection = True
        with contextlib.suppress(OSError):
            # Linger 0 makes close() send a RST instead of a FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # rfile holds a reference to the socket; both must go for the fd to close.
        self.rfile.close()
        self.connection.close()


class _SimServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sim: ImdsSimulator, family: int) -> None:
        self.address_family = family
        self.sim = sim
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # HTTPServer.server_bind would call getfqdn(), a DNS lookup that can
        # stall in a network namespace without a resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open client connection so handler threads end."""
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, resets) are routine here; stay quiet.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


# -- command line --------------------------------------------------------------


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT`` into ``(host, port)``."""
    match = _LISTEN_V6_RE.fullmatch(value) or _LISTEN_V4_RE.fullmatch(value)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid listen address {value!r}; use HOST:PORT or [IPV6]:PORT"
        )
    port = int(match.group(2))
    if port > 65535:
        raise argparse.ArgumentTypeError(f"invalid port in {value!r}")
    return match.group(1), port


def format_listen(host: str, port: int) -> str:
    """Format ``(host, port)`` as ``HOST:PORT``, bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {value!r}")
    return number


def _hop_limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_HOP_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a hop limit 1..{MAX_HOP_LIMIT}, not {value!r}")
    return int(value)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imdsguard_testing.imds_sim",
        description="Simulated EC2 instance metadata service for tests and demos.",
    )
    parser.add_argument(
        "--listen",
        action="append",
        type=parse_listen,
        required=True,
        metavar="HOST:PORT",
        help="address to serve on, e.g. 169.254.169.254:80 or '[fd00:ec2::254]:80' (repeatable)",
    )
    parser.add_argument("--http-tokens", choices=("optional", "required"), default="optional")
    parser.add_argument(
        "--http-endpoint",
        choices=("enabled", "disabled"),
        default="enabled",
        help="disabled: every request is refused with 403",
    )
    parser.add_argument(
        "--http-put-response-hop-limit",
        dest="hop_limit",
        type=_hop_limit,
        default=DEFAULT_HOP_LIMIT,
        metavar="N",
        help=f"IP TTL of token responses, 1..{MAX_HOP_LIMIT} (default {DEFAULT_HOP_LIMIT}, as EC2)",
    )
    roles = parser.add_mutually_exclusive_group()
    roles.add_argument("--role", default=DEFAULT_ROLE, help="instance profile role name")
    roles.add_argument("--no-role", action="store_true", help="no instance profile attached")
    parser.add_argument("--instance-id", default=DEFAULT_INSTANCE_ID)
    parser.add_argument("--region", default=SimConfig.region)
    parser.add_argument("--user-data-file", metavar="PATH", help="served as /latest/user-data")
    parser.add_argument(
        "--credential-lifetime",
        type=_positive_float,
        default=3600.0,
        metavar="SECONDS",
        help="lifetime of each set of role credentials (default 3600)",
    )
    parser.add_argument("--request-log", metavar="PATH", help="append one JSON line per request")
    parser.add_argument("--control-file", metavar="PATH", help="JSON fault-injection file")
    parser.add_argument("--ready-file", metavar="PATH", help="written once every listener is bound")
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests to stderr")
    return parser


def _write_ready(path: str, bound: Sequence[tuple[str, int]]) -> None:
    data = {"pid": os.getpid(), "listen": [format_listen(h, p) for h, p in bound]}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.write("\n")
    Path(tmp).replace(path)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until SIGTERM or SIGINT; return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    user_data: bytes | None = None
    if args.user_data_file:
        try:
            with open(args.user_data_file, "rb") as f:
                user_data = f.read()
        except OSError as exc:
            print(f"imds_sim: cannot read user data: {exc}", file=sys.stderr)
            return 2
    try:
        config = SimConfig(
            instance_id=args.instance_id,
            region=args.region,
            role=None if args.no_role else args.role,
            http_tokens=args.http_tokens,
            http_endpoint=args.http_endpoint,
            hop_limit=args.hop_limit,
            user_data=user_data,
            credential_lifetime=args.credential_lifetime,
            request_log=args.request_log,
            control_file=args.control_file,
            verbose=args.verbose,
        )
    except ValueError as exc:
        print(f"imds_sim: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)

    sim = ImdsSimulator(config)
    try:
        try:
            bound = sim.serve(args.listen)
        except OSError as exc:
            listen = ", ".join(format_listen(h, p) for h, p in args.listen)
            print(f"imds_sim: cannot listen on {listen}: {exc}", file=sys.stderr)
            return 1
        if args.ready_file:
            _write_ready(args.ready_file, bound)
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        sim.shutdown()
        if args.ready_file:
            with contextlib.suppress(OSError):
                Path(args.ready_file).unlink()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
