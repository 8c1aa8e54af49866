"""The configuration model: frozen dataclasses, their defaults and limits.

What :mod:`imdsguard.config.validate` builds from a file and the rest of
imdsguard reads. Every field has a default, so ``Config()`` is the
configuration of a host without a file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Union

from imdsguard.domain import Action, BackendName, Containers, LogFormat, Mode
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


def _limit(default: float, low: float, high: float) -> Any:
    """A ``broker.limits`` field: its default and the range a file may set."""
    return field(default=default, metadata={"range": (low, high)})


@dataclass(frozen=True)
class BrokerLimits:
    """What clients may cost the broker (``broker.limits``).

    Each field with a ``range`` is a key: a whole number if its default is
    one, else seconds. ``workers`` (threads that hold a request while
    credentials are fetched) is not a configuration key.
    """

    max_connections: int = _limit(512, 1, 65536)
    max_per_uid: int = _limit(64, 1, 65536)
    # for the whole request head, however it trickles in:
    read_timeout: float = _limit(3.0, 0.05, 300)
    write_timeout: float = _limit(5.0, 0.05, 300)
    max_waiting: int = _limit(256, 1, 65536)  # requests held while no credentials are servable
    max_header_bytes: int = _limit(8192, 256, 65536)  # request line included
    workers: int = 4


#: ``broker.limits`` keys: (lowest, highest, integer), from :class:`BrokerLimits`.
LIMIT_RANGES: dict[str, tuple[float, float, bool]] = {
    f.name: (*f.metadata["range"], isinstance(f.default, int))
    for f in fields(BrokerLimits)
    if "range" in f.metadata
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
    mode: Mode = Mode.ENFORCE
    action: Action = Action.REJECT
    endpoints: tuple[IPAddress, ...] = tuple(ipaddress.ip_address(e) for e in DEFAULT_ENDPOINTS)
    #: The admin said that ``endpoints`` leaving out EC2's IMDS addresses is intended.
    endpoints_acknowledged: bool = False
    backend: BackendName = BackendName.AUTO
    allow: AllowConfig = field(default_factory=lambda: AllowConfig(users=(Principal("root", 0),)))
    containers: Containers = Containers.DENY
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    imds_url: str = DEFAULT_IMDS_URL
    log_format: LogFormat = LogFormat.JSON
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration in the file's own shape, ids resolved.

        Every file key (:func:`file_keys`), in the model's order, as plain
        YAML-safe values (str, int, float, bool, None, lists, mappings).
        """
        result: dict[str, Any] = {}
        for key, path in file_keys().items():
            value: Any = self
            for name in path.split("."):
                value = getattr(value, name)
            if key == "endpoints_acknowledged" and not value:
                continue  # shown only when set
            if key == "metrics.listen":
                value = None if value is None else _join_hostport(*value)
            section = result
            *parents, last = key.split(".")
            for parent in parents:
                section = section.setdefault(parent, {})
            section[last] = _plain(value)
        return result


#: Where the file's key and the model's field differ (dotted file key: dotted field).
#: Every other field of :class:`Config`, nested dataclasses as sections, is a key of
#: the same name.
RENAMED: dict[str, str] = {
    "firewall.backend": "backend",
    "imds.url": "imds_url",
    "logging.format": "log_format",
}
#: Fields that no file key sets (dotted field).
NOT_IN_FILE: frozenset[str] = frozenset({"path", "broker.limits.workers"})


def file_keys() -> dict[str, str]:
    """Every leaf key a file may set (dotted) and the field it sets, in the model's order.

    Derived from the dataclasses: a field whose default is a dataclass is a
    section, any other a key; :data:`RENAMED` and :data:`NOT_IN_FILE` say
    where the file differs.
    """
    renamed = {f: k for k, f in RENAMED.items()}
    result: dict[str, str] = {}

    def walk(instance: object, prefix: str) -> None:
        for f in fields(instance):  # type: ignore[arg-type]
            path = prefix + f.name
            if path in NOT_IN_FILE:
                continue
            value = getattr(instance, f.name)
            if is_dataclass(value):
                walk(value, path + ".")
            else:
                result[renamed.get(path, path)] = path

    walk(Config(), "")
    return result


def section_keys() -> dict[str, tuple[str, ...]]:
    """The keys each section allows (``""`` is the top level), from :func:`file_keys`."""
    result: dict[str, dict[str, None]] = {"": {}}
    for key in file_keys():
        parts = key.split(".")
        for depth in range(len(parts)):
            section = ".".join(parts[:depth])
            result.setdefault(section, {})[parts[depth]] = None
    return {section: tuple(names) for section, names in result.items()}


def _plain(value: Any) -> Any:
    """``value`` as YAML-safe data: enum members and addresses as str, tuples as lists."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return str(value.value)  # yaml.safe_dump cannot represent an Enum, even a str one
    if isinstance(value, (Principal, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    return value


def _join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
