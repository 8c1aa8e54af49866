"""In-memory stand-ins for the parts of imdsguard that need root and a kernel.

:class:`FakeBackend` keeps "the kernel's rules" in a Python attribute, so the
daemon's start, repair, reload and rollback can be unit-tested without root,
network namespaces or netfilter (``tests/unit/test_daemon.py``). It honours
the contract of :class:`imdsguard.firewall.base.Backend`: ``apply`` says
whether it changed anything, ``inspect`` tells ``ok`` from ``missing`` and
``drifted``, ``remove`` says whether there was anything.

Tell it to fail::

    backend = FakeBackend()
    backend.fail("apply", on_call=2)   # the second apply raises FirewallError
    backend.flush()                    # someone ran "nft flush ruleset"
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import ClassVar

from imdsguard.domain import BackendName, Capture, FamilyState
from imdsguard.errors import FirewallError
from imdsguard.firewall.base import Backend, Capabilities, Inspection
from imdsguard.policy import RuleSet

__all__ = ["FakeBackend", "FakeIptablesBackend"]

FAMILIES = ("ipv4", "ipv6")


class FakeBackend(Backend):
    """A backend whose kernel is this object (see module docstring).

    ``installed`` is the rule set in force (None: nothing of ours); ``applied``
    every rule set :meth:`apply` put in place, in order; ``calls`` counts each
    method called (``calls["apply"]``), failed calls included.
    """

    name: ClassVar[BackendName] = BackendName.NFTABLES

    def __init__(
        self,
        capture: Capture = Capture.QUEUE,
        notifications: bool = False,
        limits: tuple[str, ...] = (),
    ) -> None:
        self.installed: RuleSet | None = None
        self.applied: list[RuleSet] = []
        self.removed = 0  # how many remove() calls found something to take out
        self.closed = 0
        self.calls: Counter[str] = Counter()
        self._capabilities = Capabilities(capture=capture, notifications=notifications)
        self._limits = limits
        self._flushed = False
        self._drift: dict[str, str] = {}
        self._failures: dict[str, set[int]] = {}
        self._always: set[str] = set()

    # -- what the test controls

    def fail(self, method: str, on_call: int | None = None, *, always: bool = False) -> None:
        """Make ``method`` (``apply``, ``inspect``, ``remove``, ``present``) raise FirewallError.

        ``on_call``: only its Nth call from now on counting from 1 over the
        object's life (``calls[method] + 1`` is the next one); ``always``:
        every call until :meth:`heal`. With neither: the next call only.
        """
        if always:
            self._always.add(method)
            return
        self._failures.setdefault(method, set()).add(
            self.calls[method] + 1 if on_call is None else on_call
        )

    def heal(self, method: str | None = None) -> None:
        """Stop failing ``method`` (every method with None)."""
        if method is None:
            self._always.clear()
            self._failures.clear()
        else:
            self._always.discard(method)
            self._failures.pop(method, None)

    def flush(self) -> None:
        """Simulate an outside flush: our rules are gone (inspect says ``missing``)."""
        self._flushed = True

    def drift(self, family: str, problem: str = "our rule is no longer first") -> None:
        """Simulate a change to our rules in ``family`` (inspect says ``drifted``)."""
        self._drift[family] = problem

    # -- the contract

    def _call(self, method: str) -> None:
        self.calls[method] += 1
        if method in self._always or self.calls[method] in self._failures.get(method, ()):
            raise FirewallError(f"fake {self.name}: {method} failed (call {self.calls[method]})")

    def apply(self, ruleset: RuleSet) -> bool:
        self._call("apply")
        changed = self._flushed or bool(self._drift) or self.installed != ruleset
        self.installed, self._flushed = ruleset, False
        self._drift.clear()
        if changed:
            self.applied.append(ruleset)
        return changed

    def inspect(self, ruleset: RuleSet) -> dict[str, Inspection]:
        self._call("inspect")
        out: dict[str, Inspection] = {}
        for family in FAMILIES:
            if not ruleset.endpoints(family):
                out[family] = Inspection(family, FamilyState.DISABLED)
            elif self.installed is None or self._flushed:
                out[family] = Inspection(family, FamilyState.MISSING, ("our rules are missing",))
            elif family in self._drift:
                out[family] = Inspection(family, FamilyState.DRIFTED, (self._drift[family],))
            elif self.installed != ruleset:
                out[family] = Inspection(family, FamilyState.DRIFTED, ("another rule set",))
            else:
                out[family] = Inspection(family, FamilyState.OK)
        return out

    def remove(self) -> bool:
        self._call("remove")
        had = self.installed is not None and not self._flushed
        self.installed, self._flushed = None, False
        self._drift.clear()
        self.removed += had
        return had

    def present(self) -> tuple[str, ...]:
        self._call("present")
        if self.installed is None or self._flushed:
            return ()
        return tuple(f for f in FAMILIES if self.installed.endpoints(f))

    def preview(self, ruleset: RuleSet) -> list[str]:
        self.calls["preview"] += 1
        return [f"fake {f} {ruleset.mode} {ruleset.endpoints(f)}" for f in FAMILIES]

    def capabilities(self) -> Capabilities:
        return self._capabilities

    def watch(self) -> socket.socket | None:
        self.calls["watch"] += 1
        return None

    def limits(self) -> tuple[str, ...]:
        return self._limits

    def close(self) -> None:
        self.closed += 1


class FakeIptablesBackend(FakeBackend):
    """:class:`FakeBackend` under the other backend's name (for backend switches)."""

    name: ClassVar[BackendName] = BackendName.IPTABLES
