"""Load and validate ``/etc/imdsguard/config.yaml`` into frozen dataclasses.

Every key is optional. Every error is a :class:`~imdsguard.errors.ConfigError`
naming the file, the dotted key and, where known, the line, so that a broken
file is reported in one line and never half-applied.

The package: :mod:`~imdsguard.config.model` (the dataclasses and defaults),
:mod:`~imdsguard.config.reader` (YAML with line numbers),
:mod:`~imdsguard.config.validate` (keys and values); here, reading the file
(and refusing one that others could change, :mod:`imdsguard.trust`). The
public names are re-exported, so ``from imdsguard.config import Config``.
"""

from __future__ import annotations

import os
import stat

from imdsguard.config.model import (
    DEFAULT_ENDPOINTS,
    DEFAULT_PATH,
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
)
from imdsguard.config.validate import parse_config
from imdsguard.errors import ConfigError
from imdsguard.imds import DEFAULT_IMDS_URL
from imdsguard.trust import GO_WRITE, owner_problem, root_only_problem

__all__ = [
    "DEFAULT_ENDPOINTS",
    "DEFAULT_IMDS_URL",
    "DEFAULT_PATH",
    "DEFAULT_SOCKET",
    "LIMIT_RANGES",
    "AllowConfig",
    "BrokerClients",
    "BrokerConfig",
    "BrokerLimits",
    "Config",
    "IPAddress",
    "MetricsConfig",
    "Principal",
    "check_trust",
    "load_config",
    "parse_config",
    "root_only_problem",
]


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
    if opened is not None and (opened.st_uid != 0 or opened.st_mode & GO_WRITE):
        problem: str | None = owner_problem(path, path, opened)
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
