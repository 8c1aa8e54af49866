"""The small interface every firewall backend implements.

A backend owns a private object in the kernel (an iptables chain, an nftables
table) and a hook that sends IMDS-bound traffic into it. It can put that in
place atomically (:meth:`Backend.apply`), say how the kernel's state compares
with what it should be (:meth:`Backend.inspect`) and take it out again
(:meth:`Backend.remove`), touching nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from imdsguard.policy import RuleSet


class FamilyState:
    """Values of ``rules.ipv4`` / ``rules.ipv6`` in ``status``."""

    OK = "ok"
    MISSING = "missing"  # some IMDS traffic of this family is not under our rules
    DRIFTED = "drifted"  # our rules are in effect but differ from the policy
    DISABLED = "disabled"  # no endpoint of this family, or the family is off in the kernel


@dataclass(frozen=True)
class Inspection:
    """How one family's kernel rules compare with a rule set."""

    family: str
    state: str
    problems: tuple[str, ...] = ()

    @property
    def effective(self) -> bool:
        """True when IMDS traffic of this family is governed by our rules."""
        return self.state in (FamilyState.OK, FamilyState.DRIFTED, FamilyState.DISABLED)


class Backend(Protocol):
    """A firewall implementation (see module docstring)."""

    name: str

    def apply(self, ruleset: RuleSet) -> bool:
        """Make the kernel match ``ruleset`` in one atomic step; False when it already did."""

    def inspect(self, ruleset: RuleSet) -> dict[str, Inspection]:
        """Compare the kernel with ``ruleset`` for each family (``ipv4``, ``ipv6``)."""

    def remove(self) -> bool:
        """Take out every rule and chain of ours; False when there was nothing."""

    def present(self) -> tuple[str, ...]:
        """The families with any rule or chain of ours, found without creating anything."""

    def close(self) -> None:
        """Release what the backend holds open (it may be used again afterwards)."""
