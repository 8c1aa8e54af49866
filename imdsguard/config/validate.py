"""Validation: plain values from :mod:`imdsguard.config.reader` into a :class:`Config`.

Every error names the file, the dotted key and, where known, the line.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import pwd
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from imdsguard import cgroups
from imdsguard.config.model import (
    DEFAULT_SOCKET,
    LIMIT_RANGES,
    AllowConfig,
    BrokerClients,
    BrokerConfig,
    BrokerLimits,
    Config,
    IPAddress,
    MetricsConfig,
    Principal,
    section_keys,
)
from imdsguard.config.reader import Doc, parse_yaml, printable
from imdsguard.domain import Action, BackendName, Containers, LogFormat, Mode, StrEnum
from imdsguard.imds import DEFAULT_IMDS_URL

_E = TypeVar("_E", bound=StrEnum)

#: The keys each section allows, from the model (:func:`~imdsguard.config.model.section_keys`).
_SECTIONS = section_keys()


def _check_keys(doc: Doc, key: str, value: Any) -> dict[str, Any]:
    allowed = _SECTIONS[key]
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.error(key, f"must be a mapping with keys {', '.join(allowed)}")
    for name in value:
        if name not in allowed:
            child = f"{key}.{name}" if key else name
            raise doc.error(child, f"unknown key (expected one of: {', '.join(allowed)})")
    return value


def _choice(doc: Doc, key: str, value: Any, default: _E) -> _E:
    """One of ``default``'s enum's values, as its member (checked here, once)."""
    kind = type(default)
    if value is None:
        return default
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return kind.parse(value)
    raise doc.error(key, f"must be one of {' | '.join(kind.values())}, got {value!r}")


def _bool(doc: Doc, key: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise doc.error(key, f"must be true or false, got {value!r}")
    return value


def _abs_path(doc: Doc, key: str, value: Any, default: str | None) -> str | None:
    if value is None:
        return default
    if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
        raise doc.error(key, f"must be an absolute path, got {value!r}")
    return os.path.normpath(value)


def _limits(doc: Doc, raw: dict[str, Any]) -> BrokerLimits:
    values: dict[str, Any] = {}
    for name, (low, high, integer) in LIMIT_RANGES.items():
        value = raw.get(name)
        if value is None:
            continue
        key = f"broker.limits.{name}"
        kind = "a whole number" if integer else "a number of seconds"
        ok_type = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type) or not low <= value <= high:
            raise doc.error(key, f"must be {kind} from {low:g} to {high:g}, got {value!r}")
        values[name] = value if integer else float(value)
    limits = BrokerLimits(**values)
    if limits.max_per_uid > limits.max_connections:
        raise doc.error(
            "broker.limits.max_per_uid",
            f"must not exceed broker.limits.max_connections ({limits.max_connections}), "
            f"got {limits.max_per_uid}",
        )
    return limits


def _list(doc: Doc, key: str, value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise doc.error(key, f"must be a list of {what}, got {type(value).__name__} {value!r}")
    return value


def _resolve(
    doc: Doc,
    key: str,
    value: Any,
    kind: str,
    by_name: Callable[[str], int],
    by_id: Callable[[int], str],
) -> tuple[Principal, ...]:
    result: list[Principal] = []
    for i, item in enumerate(_list(doc, key, value, f"{kind} names or numeric ids")):
        ikey = f"{key}[{i}]"
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise doc.error(ikey, f"must be a {kind} name or numeric id, got {item!r}")
        text = str(item).strip()
        if text.isascii() and text.isdigit():  # str.isdigit alone accepts "²", which int() rejects
            # More digits than int() converts (4300 on 3.11) is out of range too.
            num = int(text) if len(text) <= 64 else 1 << 32
            if num > 0xFFFFFFFE:
                raise doc.error(ikey, f"{kind} id {num} is out of range")
            try:
                name = by_id(num)
            except KeyError:
                name = text  # numeric ids need not exist in the local database (containers)
            principal = Principal(name, num)
        else:
            try:
                principal = Principal(text, by_name(text))
            except (KeyError, ValueError):  # ValueError: a NUL byte in the name
                raise doc.error(
                    ikey, f"unknown {kind} {text!r}: create it first or use a numeric id"
                ) from None
        if principal.id not in {p.id for p in result}:
            result.append(principal)
    return tuple(result)


def _users(doc: Doc, key: str, value: Any) -> tuple[Principal, ...]:
    return _resolve(
        doc, key, value, "user", lambda n: pwd.getpwnam(n).pw_uid, lambda i: pwd.getpwuid(i).pw_name
    )


def _groups(doc: Doc, key: str, value: Any) -> tuple[Principal, ...]:
    return _resolve(
        doc,
        key,
        value,
        "group",
        lambda n: grp.getgrnam(n).gr_gid,
        lambda i: grp.getgrgid(i).gr_name,
    )


def _units(doc: Doc, key: str, value: Any, slices: bool = True) -> tuple[str, ...]:
    """systemd unit names (``foo.service``), checked for syntax; the host must be cgroup v2.

    ``slices``: whether a slice may be named (the firewall matches a cgroup
    and all below it; the broker knows a client by its unit only, which is
    never a slice, so a slice there would silently match nobody).
    """
    result: list[str] = []
    for i, item in enumerate(_list(doc, key, value, "systemd unit names")):
        ikey = f"{key}[{i}]"
        if not isinstance(item, str):
            raise doc.error(ikey, f"must be a systemd unit name like foo.service, got {item!r}")
        problem = cgroups.unit_name_problem(item)
        if problem:
            raise doc.error(ikey, f"{printable(item)!r} {problem}")
        if not slices and item.endswith(".slice"):
            raise doc.error(
                ikey,
                f"{item!r} is a slice: a broker client is known by its unit (the first "
                "cgroup below the slices), never a slice; list the units in it",
            )
        if item not in result:
            result.append(item)
    if result:
        problem = cgroups.unified_problem()
        if problem:
            raise doc.error(key, problem)
    return tuple(result)


def _endpoints(doc: Doc, value: Any, acknowledged: Any) -> tuple[IPAddress, ...]:
    if value is None:
        return Config.endpoints
    items = _list(doc, "endpoints", value, "IP addresses")
    if not items:
        raise doc.error("endpoints", "must name at least one IMDS address")
    result: list[IPAddress] = []
    for i, item in enumerate(items):
        try:
            addr = ipaddress.ip_address(str(item).strip())
        except ValueError:
            raise doc.error(f"endpoints[{i}]", f"{item!r} is not an IPv4 or IPv6 address") from None
        if getattr(addr, "scope_id", None):  # fe80::1%eth0: no firewall rule can say that
            raise doc.error(f"endpoints[{i}]", f"{addr} has a scope (%zone): not supported")
        if addr.is_unspecified or addr.is_multicast:
            raise doc.error(f"endpoints[{i}]", f"{addr} cannot be an IMDS endpoint")
        if addr not in result:
            result.append(addr)
    # A typo (169.254.169.253) must not leave IMDS unguarded in silence.
    left_out = [a for a in Config.endpoints if a not in result]
    if left_out and acknowledged is not True:
        names = " and ".join(str(a) for a in left_out)
        raise doc.error(
            "endpoints",
            f"leaves out {names}, EC2's IMDS address{'es' if len(left_out) > 1 else ''}: "
            "that IMDS traffic would not be guarded; add it, or set "
            "endpoints_acknowledged: true if leaving it out is intended",
        )
    return tuple(result)


def _imds_url(doc: Doc, value: Any) -> str:
    if value is None:
        return DEFAULT_IMDS_URL
    if not isinstance(value, str):
        raise doc.error("imds.url", f"must be a URL like {DEFAULT_IMDS_URL}, got {value!r}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # "http://[abc", a netloc that NFKC changes, a bad port
        parts, port = urlsplit(""), -1
    if not value.isprintable() or " " in value:  # urlsplit drops tabs and newlines silently
        port = -1
    if parts.scheme != "http" or not parts.hostname or port == -1 or parts.path not in ("", "/"):
        raise doc.error(
            "imds.url", f"must be http://HOST[:PORT] like {DEFAULT_IMDS_URL}, got {value!r}"
        )
    return value.rstrip("/")


def _listen(doc: Doc, value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    text = str(value)
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not 0 < port < 65536:
        raise doc.error(
            "metrics.listen", f"must be ADDRESS:PORT like 127.0.0.1:9721, got {value!r}"
        )
    if not ipaddress.ip_address(host).is_loopback:
        # The endpoint is for a scraper on this host (Prometheus, an agent that
        # forwards); the unit's IPAddressDeny= drops any other peer anyway, and
        # every local user can reach it, so it must not face the network too.
        raise doc.error(
            "metrics.listen",
            f"must be a loopback address (127.0.0.0/8 or ::1), got {value!r}; "
            "scrape remotely through node_exporter's textfile (metrics.textfile) instead",
        )
    return host, port


def _validate(data: dict[str, Any], doc: Doc) -> Config:
    top = _check_keys(doc, "", data)
    firewall = _check_keys(doc, "firewall", top.get("firewall"))
    allow_raw = _check_keys(doc, "allow", top.get("allow"))
    broker_raw = _check_keys(doc, "broker", top.get("broker"))
    limits_raw = _check_keys(doc, "broker.limits", broker_raw.get("limits"))
    clients_raw = _check_keys(doc, "broker.clients", broker_raw.get("clients"))
    imds = _check_keys(doc, "imds", top.get("imds"))
    logging_raw = _check_keys(doc, "logging", top.get("logging"))
    metrics_raw = _check_keys(doc, "metrics", top.get("metrics"))

    if "allow" in top and "users" in allow_raw:
        allow_users = _users(doc, "allow.users", allow_raw["users"])
    else:
        allow_users = Config().allow.users
    exes: list[str] = []
    for i, exe in enumerate(_list(doc, "broker.clients.exes", clients_raw.get("exes"), "paths")):
        key = f"broker.clients.exes[{i}]"
        path = _abs_path(doc, key, exe, None)
        if path is None:  # a null item: None means "the default" to _abs_path
            raise doc.error(key, "must be an absolute path, got None")
        exes.append(path)

    return Config(
        path=doc.path,
        mode=_choice(doc, "mode", top.get("mode"), Mode.ENFORCE),
        action=_choice(doc, "action", top.get("action"), Action.REJECT),
        endpoints=_endpoints(doc, top.get("endpoints"), top.get("endpoints_acknowledged")),
        endpoints_acknowledged=_bool(
            doc, "endpoints_acknowledged", top.get("endpoints_acknowledged"), False
        ),
        backend=_choice(doc, "firewall.backend", firewall.get("backend"), BackendName.AUTO),
        allow=AllowConfig(
            users=allow_users,
            groups=_groups(doc, "allow.groups", allow_raw.get("groups")),
            units=_units(doc, "allow.units", allow_raw.get("units")),
        ),
        containers=_choice(doc, "containers", top.get("containers"), Containers.DENY),
        broker=BrokerConfig(
            enabled=_bool(doc, "broker.enabled", broker_raw.get("enabled"), False),
            socket=_abs_path(doc, "broker.socket", broker_raw.get("socket"), DEFAULT_SOCKET)
            or DEFAULT_SOCKET,
            clients=BrokerClients(
                users=_users(doc, "broker.clients.users", clients_raw.get("users")),
                groups=_groups(doc, "broker.clients.groups", clients_raw.get("groups")),
                exes=tuple(exes),
                units=_units(doc, "broker.clients.units", clients_raw.get("units"), slices=False),
            ),
            limits=_limits(doc, limits_raw),
        ),
        imds_url=_imds_url(doc, imds.get("url")),
        log_format=_choice(doc, "logging.format", logging_raw.get("format"), LogFormat.JSON),
        metrics=MetricsConfig(
            textfile=_abs_path(doc, "metrics.textfile", metrics_raw.get("textfile"), None),
            listen=_listen(doc, metrics_raw.get("listen")),
        ),
    )


def parse_config(text: str, path: str = "<string>") -> Config:
    """Validate configuration text; ``path`` is only used in messages."""
    data, doc = parse_yaml(text, path)
    return _validate(data, doc)
