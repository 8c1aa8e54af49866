"""The configuration model: frozen dataclasses, their defaults and limits.

What :mod:`imdsguard.config.validate` builds from a file and the rest of
imdsguard reads. Every field has a default, so ``Config()`` is the
configuration of a host without a file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Union

DEFAULT_PATH = "/etc/imdsguard/config.yaml"
DEFAULT_ENDPOINTS = ("169.254.169.254", "fd00:ec2::254")
DEFAULT_SOCKET = "/run/imdsguard/broker.sock"
DEFAULT_IMDS_URL = "http://169.254.169.254"

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
