"""The small interface every firewall backend implements.

A backend owns a private object in the kernel (an iptables chain, an nftables
table) and a hook that sends IMDS-bound traffic into it. It can put that in
place atomically (:meth:`Backend.apply`), say how the kernel's state compares
with what it should be (:meth:`Backend.inspect`) and take it out again
(:meth:`Backend.remove`), touching nothing else.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from imdsguard.domain import BackendName, Capture, FamilyState
from imdsguard.policy import RuleSet

__all__ = ["Backend", "Capabilities", "FamilyState", "Inspection"]


@dataclass(frozen=True)
class Inspection:
    """How one family's kernel rules compare with a rule set."""

    family: str
    state: FamilyState
    problems: tuple[str, ...] = ()

    @property
    def effective(self) -> bool:
        """True when IMDS traffic of this family is governed by our rules."""
        return self.state in (FamilyState.OK, FamilyState.DRIFTED, FamilyState.DISABLED)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do on this host (probed without changing anything).

    ``capture`` is how denied packets reach a running daemon: ``queue``
    (NFQUEUE, held until attributed) where the kernel can queue from this
    firewall, else ``log`` (NFLOG, decided at once). ``notifications``: the
    kernel announces changes (:meth:`Backend.watch` returns a socket);
    without them the daemon polls (:meth:`Backend.quick_check`).
    """

    capture: Capture
    notifications: bool


class Backend(ABC):
    """A firewall implementation (see module docstring).

    The abstract methods are what every backend must do; the others have
    defaults that say "cannot": callers use them all directly, never probe.
    """

    #: The ``firewall.backend`` value that selects this backend.
    name: ClassVar[BackendName]

    @abstractmethod
    def apply(self, ruleset: RuleSet) -> bool:
        """Make the kernel match ``ruleset`` in one atomic step; False when it already did."""

    @abstractmethod
    def inspect(self, ruleset: RuleSet) -> dict[str, Inspection]:
        """Compare the kernel with ``ruleset`` for each family (``ipv4``, ``ipv6``)."""

    @abstractmethod
    def remove(self) -> bool:
        """Take out every rule and chain of ours; False when there was nothing."""

    @abstractmethod
    def present(self) -> tuple[str, ...]:
        """The families with any rule or chain of ours, found without creating anything."""

    @abstractmethod
    def preview(self, ruleset: RuleSet) -> list[str]:
        """The rules ``apply(ruleset)`` would put in place, one per line, in the backend's
        own syntax (``iptables-save`` lines, ``nft`` statements); changes nothing."""

    def capabilities(self) -> Capabilities:
        """See :class:`Capabilities`; the default is the least a backend can do."""
        return Capabilities(capture=Capture.LOG, notifications=False)

    def watch(self) -> socket.socket | None:
        """A non-blocking socket that becomes readable when the firewall may have
        changed, or None when the kernel announces nothing (then poll)."""
        return None

    def quick_check(self) -> bool:
        """True when the rules may have changed since they were last found in order.

        Cheap enough to call every few milliseconds; a backend that cannot
        tell says True (then the caller runs the full :meth:`inspect`).
        """
        return True

    def quick_check_problem(self) -> str | None:
        """Why :meth:`quick_check` cannot be cheap here (every poll parses), or None."""
        return None

    def limits(self) -> tuple[str, ...]:
        """What this backend cannot guard against on this host (``status`` shows them)."""
        return ()

    def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing to release
        """Release what the backend holds open (it may be used again afterwards)."""
