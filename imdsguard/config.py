"""Load and validate ``/etc/imdsguard/config.yaml`` into frozen dataclasses.

Every key is optional. Every error is a :class:`~imdsguard.errors.ConfigError`
naming the file, the dotted key and, where known, the line, so that a broken
file is reported in one line and never half-applied.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Union
from urllib.parse import urlsplit

import yaml

from imdsguard import cgroups
from imdsguard.errors import ConfigError
from imdsguard.imds import DEFAULT_IMDS_URL

DEFAULT_PATH = "/etc/imdsguard/config.yaml"
DEFAULT_ENDPOINTS = ("169.254.169.254", "fd00:ec2::254")
DEFAULT_SOCKET = "/run/imdsguard/broker.sock"

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True)
class Principal:
    """A user or group resolved to its numeric id (``name`` as configured or looked up)."""

    name: str
    id: int

    def __str__(self) -> str:
        return f"{self.name} ({self.id})" if self.name != str(self.id) else str(self.id)


@dataclass(frozen=True)
class AllowConfig:
    """Who may reach IMDS directly."""

    users: tuple[Principal, ...] = ()
    groups: tuple[Principal, ...] = ()
    units: tuple[str, ...] = ()  # systemd units (cgroup v2), e.g. amazon-ssm-agent.service


@dataclass(frozen=True)
class BrokerClients:
    """Who may ask the broker for credentials."""

    users: tuple[Principal, ...] = ()
    groups: tuple[Principal, ...] = ()
    exes: tuple[str, ...] = ()
    units: tuple[str, ...] = ()


@dataclass(frozen=True)
class BrokerLimits:
    """What clients may cost the broker (``broker.limits``).

    ``workers`` (threads that hold a request while credentials are fetched)
    is not a configuration key.
    """

    max_connections: int = 512
    max_per_uid: int = 64
    read_timeout: float = 3.0  # for the whole request head, however it trickles in
    write_timeout: float = 5.0
    max_waiting: int = 256  # requests held while no credentials are servable
    max_header_bytes: int = 8192  # request line included
    workers: int = 4


#: ``broker.limits`` keys: (lowest, highest, integer).
LIMIT_RANGES: dict[str, tuple[float, float, bool]] = {
    "max_connections": (1, 65536, True),
    "max_per_uid": (1, 65536, True),
    "read_timeout": (0.05, 300, False),
    "write_timeout": (0.05, 300, False),
    "max_waiting": (1, 65536, True),
    "max_header_bytes": (256, 65536, True),
}


@dataclass(frozen=True)
class BrokerConfig:
    """The credential broker (``broker:``)."""

    enabled: bool = False
    socket: str = DEFAULT_SOCKET
    clients: BrokerClients = field(default_factory=BrokerClients)
    limits: BrokerLimits = field(default_factory=BrokerLimits)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics output (``metrics:``)."""

    textfile: str | None = None
    listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class Config:
    """The validated configuration. ``path`` is where it came from."""

    path: str = DEFAULT_PATH
    mode: str = "enforce"
    action: str = "reject"
    endpoints: tuple[IPAddress, ...] = tuple(ipaddress.ip_address(e) for e in DEFAULT_ENDPOINTS)
    #: The admin said that ``endpoints`` leaving out EC2's IMDS addresses is intended.
    endpoints_acknowledged: bool = False
    backend: str = "auto"
    allow: AllowConfig = field(default_factory=lambda: AllowConfig(users=(Principal("root", 0),)))
    containers: str = "deny"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    imds_url: str = DEFAULT_IMDS_URL
    log_format: str = "json"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration in the file's own shape, ids resolved."""

        def principals(items: tuple[Principal, ...]) -> list[str]:
            return [str(p) for p in items]

        return {
            "mode": self.mode,
            "action": self.action,
            "endpoints": [str(e) for e in self.endpoints],
            **({"endpoints_acknowledged": True} if self.endpoints_acknowledged else {}),
            "firewall": {"backend": self.backend},
            "allow": {
                "users": principals(self.allow.users),
                "groups": principals(self.allow.groups),
                "units": list(self.allow.units),
            },
            "containers": self.containers,
            "broker": {
                "enabled": self.broker.enabled,
                "socket": self.broker.socket,
                "clients": {
                    "users": principals(self.broker.clients.users),
                    "groups": principals(self.broker.clients.groups),
                    "exes": list(self.broker.clients.exes),
                    "units": list(self.broker.clients.units),
                },
                "limits": {k: getattr(self.broker.limits, k) for k in LIMIT_RANGES},
            },
            "imds": {"url": self.imds_url},
            "logging": {"format": self.log_format},
            "metrics": {
                "textfile": self.metrics.textfile,
                "listen": None
                if self.metrics.listen is None
                else _join_hostport(*self.metrics.listen),
            },
        }


def _join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- reading YAML with line numbers -------------------------------------------------


#: A real config has a few hundred values (a few thousand with a long allowlist). The
#: limits stop alias bombs ("billion laughs") and nesting that would exhaust the stack.
_MAX_NODES = 100_000
_MAX_DEPTH = 32


def _one_line(text: object) -> str:
    """``text`` with every run of whitespace, line breaks included, as one space."""
    return " ".join(str(text).split())


def _printable(text: str) -> str:
    """``text`` for a one-line message: non-printable characters escaped as in repr."""
    return text if text.isprintable() else repr(text)[1:-1]


class _Doc:
    """A parsed document: plain Python values plus the line of every dotted key."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: dict[str, int] = {}
        self.nodes = 0
        self.active: set[int] = set()  # nodes being converted: an alias back to one loops

    def error(self, key: str, message: str) -> ConfigError:
        line = self.lines.get(key)
        while line is None and "." in key:
            key_parent = key.rsplit(".", 1)[0]
            line = self.lines.get(key_parent)
            key = key_parent
        return ConfigError(self.path, message, key=key or None, line=line)


def _convert(node: yaml.Node, key: str, doc: _Doc, depth: int = 0) -> Any:
    line = node.start_mark.line + 1
    doc.lines.setdefault(key, line)
    doc.nodes += 1
    if doc.nodes > _MAX_NODES:
        raise ConfigError(
            doc.path, f"too many values (over {_MAX_NODES}): are aliases expanding?", line=line
        )
    if depth > _MAX_DEPTH:
        raise ConfigError(doc.path, f"nested more than {_MAX_DEPTH} levels deep", line=line)
    if id(node) in doc.active:
        raise ConfigError(doc.path, "an alias refers to itself", key=key or None, line=line)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        doc.active.add(id(node))
        try:
            return _convert_collection(node, key, doc, depth)
        finally:
            doc.active.discard(id(node))
    constructor = yaml.SafeLoader("")
    try:
        return constructor.construct_object(node, deep=True)
    except yaml.MarkedYAMLError as exc:  # e.g. an unknown or unsupported !tag
        problem = exc.problem or exc.context or "unsupported value"
        raise ConfigError(doc.path, _one_line(problem), key=key or None, line=line) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. !!int abc, a 5000-digit int
        raise ConfigError(
            doc.path, f"cannot read this value: {_one_line(exc)}", key=key or None, line=line
        ) from None
    finally:
        constructor.dispose()


def _convert_collection(
    node: yaml.MappingNode | yaml.SequenceNode, key: str, doc: _Doc, depth: int
) -> Any:
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise ConfigError(
                    doc.path, "keys must be plain strings", line=knode.start_mark.line + 1
                )
            name = _printable(str(knode.value))  # keys appear in one-line messages
            child = f"{key}.{name}" if key else name
            if name in result:
                raise ConfigError(
                    doc.path, "duplicate key", key=child, line=knode.start_mark.line + 1
                )
            doc.lines[child] = knode.start_mark.line + 1
            result[name] = _convert(vnode, child, doc, depth + 1)
        return result
    return [_convert(item, f"{key}[{i}]", doc, depth + 1) for i, item in enumerate(node.value)]


def _parse(text: str, path: str) -> tuple[dict[str, Any], _Doc]:
    doc = _Doc(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        problem = _one_line(exc.problem or exc)
        raise ConfigError(path, f"not valid YAML: {problem}", line=line) from None
    except yaml.YAMLError as exc:  # e.g. a control character (ReaderError, over two lines)
        raise ConfigError(path, f"not valid YAML: {_one_line(exc)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(path, f"nested more than {_MAX_DEPTH} levels deep") from None
    if root is None or root.tag == "tag:yaml.org,2002:null":  # e.g. "---" then only comments
        return {}, doc
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(
            path,
            "the top level must be a mapping of keys (e.g. 'mode: enforce')",
            line=root.start_mark.line + 1,
        )
    data = _convert(root, "", doc)
    return data, doc


# --- validation ---------------------------------------------------------------------


def _check_keys(doc: _Doc, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.error(key, f"must be a mapping with keys {', '.join(allowed)}")
    for name in value:
        if name not in allowed:
            child = f"{key}.{name}" if key else name
            raise doc.error(child, f"unknown key (expected one of: {', '.join(allowed)})")
    return value


def _choice(doc: _Doc, key: str, value: Any, choices: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise doc.error(key, f"must be one of {' | '.join(choices)}, got {value!r}")
    return value


def _bool(doc: _Doc, key: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise doc.error(key, f"must be true or false, got {value!r}")
    return value


def _abs_path(doc: _Doc, key: str, value: Any, default: str | None) -> str | None:
    if value is None:
        return default
    if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
        raise doc.error(key, f"must be an absolute path, got {value!r}")
    return os.path.normpath(value)


def _limits(doc: _Doc, raw: dict[str, Any]) -> BrokerLimits:
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


def _list(doc: _Doc, key: str, value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise doc.error(key, f"must be a list of {what}, got {type(value).__name__} {value!r}")
    return value


def _resolve(
    doc: _Doc,
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


def _users(doc: _Doc, key: str, value: Any) -> tuple[Principal, ...]:
    return _resolve(
        doc, key, value, "user", lambda n: pwd.getpwnam(n).pw_uid, lambda i: pwd.getpwuid(i).pw_name
    )


def _groups(doc: _Doc, key: str, value: Any) -> tuple[Principal, ...]:
    return _resolve(
        doc,
        key,
        value,
        "group",
        lambda n: grp.getgrnam(n).gr_gid,
        lambda i: grp.getgrgid(i).gr_name,
    )


def _units(doc: _Doc, key: str, value: Any) -> tuple[str, ...]:
    """systemd unit names (``foo.service``), checked for syntax; the host must be cgroup v2."""
    result: list[str] = []
    for i, item in enumerate(_list(doc, key, value, "systemd unit names")):
        ikey = f"{key}[{i}]"
        if not isinstance(item, str):
            raise doc.error(ikey, f"must be a systemd unit name like foo.service, got {item!r}")
        problem = cgroups.unit_name_problem(item)
        if problem:
            raise doc.error(ikey, f"{_printable(item)!r} {problem}")
        if item not in result:
            result.append(item)
    if result:
        problem = cgroups.unified_problem()
        if problem:
            raise doc.error(key, problem)
    return tuple(result)


def _endpoints(doc: _Doc, value: Any, acknowledged: Any) -> tuple[IPAddress, ...]:
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


def _imds_url(doc: _Doc, value: Any) -> str:
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


def _listen(doc: _Doc, value: Any) -> tuple[str, int] | None:
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


def _validate(data: dict[str, Any], doc: _Doc) -> Config:
    top = _check_keys(
        doc,
        "",
        data,
        (
            "mode",
            "action",
            "endpoints",
            "endpoints_acknowledged",
            "firewall",
            "allow",
            "containers",
            "broker",
            "imds",
            "logging",
            "metrics",
        ),
    )
    firewall = _check_keys(doc, "firewall", top.get("firewall"), ("backend",))
    allow_raw = _check_keys(doc, "allow", top.get("allow"), ("users", "groups", "units"))
    broker_raw = _check_keys(
        doc, "broker", top.get("broker"), ("enabled", "socket", "clients", "limits")
    )
    limits_raw = _check_keys(doc, "broker.limits", broker_raw.get("limits"), tuple(LIMIT_RANGES))
    clients_raw = _check_keys(
        doc, "broker.clients", broker_raw.get("clients"), ("users", "groups", "exes", "units")
    )
    imds = _check_keys(doc, "imds", top.get("imds"), ("url",))
    logging_raw = _check_keys(doc, "logging", top.get("logging"), ("format",))
    metrics_raw = _check_keys(doc, "metrics", top.get("metrics"), ("textfile", "listen"))

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
        mode=_choice(doc, "mode", top.get("mode"), ("enforce", "audit"), "enforce"),
        action=_choice(doc, "action", top.get("action"), ("reject", "drop"), "reject"),
        endpoints=_endpoints(doc, top.get("endpoints"), top.get("endpoints_acknowledged")),
        endpoints_acknowledged=_bool(
            doc, "endpoints_acknowledged", top.get("endpoints_acknowledged"), False
        ),
        backend=_choice(
            doc,
            "firewall.backend",
            firewall.get("backend"),
            ("auto", "iptables", "nftables"),
            "auto",
        ),
        allow=AllowConfig(
            users=allow_users,
            groups=_groups(doc, "allow.groups", allow_raw.get("groups")),
            units=_units(doc, "allow.units", allow_raw.get("units")),
        ),
        containers=_choice(doc, "containers", top.get("containers"), ("deny", "allow"), "deny"),
        broker=BrokerConfig(
            enabled=_bool(doc, "broker.enabled", broker_raw.get("enabled"), False),
            socket=_abs_path(doc, "broker.socket", broker_raw.get("socket"), DEFAULT_SOCKET)
            or DEFAULT_SOCKET,
            clients=BrokerClients(
                users=_users(doc, "broker.clients.users", clients_raw.get("users")),
                groups=_groups(doc, "broker.clients.groups", clients_raw.get("groups")),
                exes=tuple(exes),
                units=_units(doc, "broker.clients.units", clients_raw.get("units")),
            ),
            limits=_limits(doc, limits_raw),
        ),
        imds_url=_imds_url(doc, imds.get("url")),
        log_format=_choice(
            doc, "logging.format", logging_raw.get("format"), ("json", "console"), "json"
        ),
        metrics=MetricsConfig(
            textfile=_abs_path(doc, "metrics.textfile", metrics_raw.get("textfile"), None),
            listen=_listen(doc, metrics_raw.get("listen")),
        ),
    )


def parse_config(text: str, path: str = "<string>") -> Config:
    """Validate configuration text; ``path`` is only used in messages."""
    data, doc = _parse(text, path)
    return _validate(data, doc)


_GO_WRITE = stat.S_IWGRP | stat.S_IWOTH
_MAX_HOPS = 40  # the kernel's own limit on symlinks followed in one lookup


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def root_only_problem(path: str) -> tuple[str | None, os.stat_result | None]:
    """Why someone other than root could change what ``path`` names, or None.

    Resolves ``path`` the way the kernel does, one component and one symlink
    hop at a time (no lexical ``..``), and checks everything the lookup
    passes: every directory looked in is root's and not writable by group or
    others unless sticky; every symlink followed, every directory and the
    final file are root's; the file is a regular file that group and others
    cannot write. Then nobody but root can swap any link or entry on the way,
    so the path names the same file until root changes it. Also returns the
    file's stat (None with a problem), for comparing with an open descriptor.
    """
    if not path.startswith("/"):
        path = os.path.join(os.getcwd(), path)  # getcwd() has no symlinks in it
    todo = _components(path)[::-1]  # a stack: the next component last
    current, hops = "/", 0
    try:
        st = os.lstat("/")
        if st.st_uid != 0 or (st.st_mode & _GO_WRITE and not st.st_mode & stat.S_ISVTX):
            return _owner_problem("directory /", "/", st), None
        while todo:
            name = todo.pop()
            if name == "..":
                current = os.path.dirname(current)  # already checked on the way down
                continue
            entry = os.path.join(current, name)
            st = os.lstat(entry)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_HOPS:
                    return f"too many symlinks on the way to {path}", None
                if st.st_uid != 0:
                    return (
                        f"symlink {entry} (on the way to {path}) is owned by uid {st.st_uid}: "
                        f"run 'chown -h root: {entry}'"
                    ), None
                target = os.readlink(entry)
                if target.startswith("/"):
                    current = "/"
                todo.extend(_components(target)[::-1])
                continue
            if todo:  # a directory to look further in
                if not stat.S_ISDIR(st.st_mode):
                    return f"{entry} (on the way to {path}) is not a directory", None
                sticky = st.st_mode & stat.S_ISVTX  # then only root may swap root's entries
                if st.st_uid != 0 or (st.st_mode & _GO_WRITE and not sticky):
                    what = f"directory {entry} (on the way to {path})"
                    return _owner_problem(what, entry, st), None
                current = entry
                continue
            if not stat.S_ISREG(st.st_mode):
                return f"{entry} is not a regular file", None
            if st.st_uid != 0 or st.st_mode & _GO_WRITE:
                return _owner_problem(entry, entry, st), None
            return None, st
    except OSError as exc:
        return f"cannot check {exc.filename or path}: {exc.strerror}", None
    return f"{current} is not a regular file", None


def _owner_problem(what: str, entry: str, st: os.stat_result) -> str:
    return (
        f"{what} is not owned by root or is writable by others "
        f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): "
        f"run 'chown root: {entry} && chmod go-w {entry}'"
    )


def check_trust(path: str, fd: int | None = None) -> None:
    """Refuse a config that anyone but root could have written or could swap.

    The config decides who may reach credentials, so the file and
    everything on its path, as given and through every symlink hop, must be
    root's alone (:func:`root_only_problem`; a sticky directory such as /tmp
    is fine on the way). ``fd``, when given, is the open file about to be
    read: it must be that same file, so what was checked is what is read.
    Only enforced when we run as root: an unprivileged ``check-config`` of
    a draft is allowed.
    """
    if os.geteuid() != 0:
        return
    opened = os.fstat(fd) if fd is not None else None
    if opened is not None and (opened.st_uid != 0 or opened.st_mode & _GO_WRITE):
        problem: str | None = _owner_problem(path, path, opened)
    else:
        problem, st = root_only_problem(path)
        if opened is not None and st is not None and not os.path.samestat(st, opened):
            problem = f"{path} was replaced while it was being checked: try again"
    if problem is not None:
        raise ConfigError(path, f"refusing a config that others could change: {problem}")


def _read(path: str, *, trust: bool) -> str:
    """The file's text, checked (``trust``) and read through one descriptor."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not hang us
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(path, "cannot read: not a regular file")
        if trust:
            check_trust(path, fd)
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "not UTF-8 text") from None


def load_config(path: str | None = None, *, trust: bool = True) -> Config:
    """Read and validate the configuration file.

    With no ``path`` the default file is used, and its absence means "all
    defaults". A path given explicitly must exist. With ``trust`` (the
    default) the file must be root's alone (:func:`check_trust`).
    """
    explicit = path is not None
    path = path or DEFAULT_PATH
    try:
        text = _read(path, trust=trust)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(
                path, "file not found: pass an existing file with -c/--config"
            ) from None
        return Config(path=path)
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None
    return parse_config(text, path)
