"""The system accounts imdsguard itself runs as.

The broker runs as its own unprivileged system user, ``imdsguard-broker``
(created by the packages' sysusers.d entry; by the test harness and the demo
with ``useradd --system``). The firewall allowlists that uid like any other
user: no packet mark grants access to IMDS, so no process can forge the
broker's allowance (a mark can be set by anything holding CAP_NET_RAW, which
Docker grants by default).
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from imdsguard.config import Config
from imdsguard.errors import ImdsGuardError

#: The broker's account name (sysusers.d: ``u imdsguard-broker - ...``).
BROKER_USER = "imdsguard-broker"


@dataclass(frozen=True)
class Account:
    """A resolved system account."""

    name: str
    uid: int
    gid: int


def broker_user_name() -> str:
    """The broker's account name (``IMDSGUARD_BROKER_USER`` overrides it, for tests)."""
    return os.environ.get("IMDSGUARD_BROKER_USER", BROKER_USER)


def broker_account() -> Account:
    """The broker's account; :class:`ImdsGuardError` with what to do when it does not exist."""
    name = broker_user_name()
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ImdsGuardError(
            f"the broker's system user {name!r} does not exist: install imdsguard's package "
            f"(its sysusers.d entry creates it) or run "
            f"'useradd --system --no-create-home --shell /usr/sbin/nologin {name}'"
        ) from None
    if entry.pw_uid == 0:
        raise ImdsGuardError(f"the broker's system user {name!r} has uid 0: it must not be root")
    return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def service_uids(config: Config) -> tuple[int, ...]:
    """The uids of imdsguard's own processes that ``config`` needs to reach IMDS.

    The broker's, when it is enabled; raises :class:`ImdsGuardError` naming
    the fix when its account is missing (the rules would shut the broker out).
    """
    return (broker_account().uid,) if config.broker.enabled else ()
