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

import logging
import socket
from collections import Counter
from typing import Any, Callable, ClassVar

import structlog

from imdsguard._log import Logger
from imdsguard.components import Component
from imdsguard.config import Config
from imdsguard.daemon import Daemon, Wiring
from imdsguard.domain import BackendName, Capture, FamilyState
from imdsguard.errors import FirewallError, ImdsGuardError
from imdsguard.firewall.base import Backend, Capabilities, Inspection
from imdsguard.policy import RuleSet

__all__ = [
    "FakeBackend",
    "FakeComponent",
    "FakeComponents",
    "FakeIptablesBackend",
    "RecordingLogger",
    "fake_daemon",
    "logged",
]

FAMILIES = ("ipv4", "ipv6")


class _Failing:
    """Counts calls per method and raises at the ones :meth:`fail` chose."""

    error: type[ImdsGuardError] = ImdsGuardError

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._failures: dict[str, set[int]] = {}
        self._always: set[str] = set()

    def fail(self, method: str, on_call: int | None = None, *, always: bool = False) -> None:
        """Make ``method`` raise (the class's ``error``).

        ``on_call``: only its Nth call, counting from 1 over the object's
        life (``calls[method] + 1`` is the next one); ``always``: every call
        until :meth:`heal`. With neither: the next call only.
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

    def _call(self, method: str) -> None:
        self.calls[method] += 1
        if method in self._always or self.calls[method] in self._failures.get(method, ()):
            raise self.error(f"{self}: {method} failed (call {self.calls[method]})")


class FakeBackend(_Failing, Backend):
    """A backend whose kernel is this object (see module docstring).

    ``installed`` is the rule set in force (None: nothing of ours); ``applied``
    every rule set :meth:`apply` put in place, in order; ``calls`` counts each
    method called (``calls["apply"]``), failed calls included.
    """

    name: ClassVar[BackendName] = BackendName.NFTABLES
    error = FirewallError

    def __init__(
        self,
        capture: Capture = Capture.QUEUE,
        notifications: bool = False,
        limits: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.installed: RuleSet | None = None
        self.applied: list[RuleSet] = []
        self.removed = 0  # how many remove() calls found something to take out
        self.closed = 0
        self._capabilities = Capabilities(capture=capture, notifications=notifications)
        self._limits = limits
        self._flushed = False
        self._drift: dict[str, str] = {}

    def __str__(self) -> str:
        return f"fake {self.name}"

    # -- what the test controls (and fail/heal: ``apply``, ``inspect``, ``remove``, ``present``)

    def flush(self) -> None:
        """Simulate an outside flush: our rules are gone (inspect says ``missing``)."""
        self._flushed = True

    def drift(self, family: str, problem: str = "our rule is no longer first") -> None:
        """Simulate a change to our rules in ``family`` (inspect says ``drifted``)."""
        self._drift[family] = problem

    # -- the contract

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


class FakeComponent(_Failing):
    """A daemon component (``imdsguard.components.Component``) that only records.

    ``configs`` is every config it was started with or reconfigured to, in
    order; ``running`` whether it is started. :meth:`fail` ``start``,
    ``reconfigure`` or ``stop`` to see the daemon cope.
    """

    def __init__(self, name: str, config: Config) -> None:
        super().__init__()
        self.name = name
        self.configs = [config]
        self.running = False

    def __str__(self) -> str:
        return f"fake component {self.name}"

    def start(self) -> None:
        self._call("start")
        self.running = True

    def stop(self) -> None:
        self._call("stop")
        self.running = False

    def reconfigure(self, config: Config) -> None:
        self._call("reconfigure")
        self.configs.append(config)

    def health(self) -> dict[str, Any]:
        return {"running": self.running, "mode": str(self.configs[-1].mode)}

    def write_now(self) -> None:
        """What the daemon calls on its ``metrics`` component after each publish."""
        self.calls["write_now"] += 1


class FakeComponents:
    """A component factory for :class:`imdsguard.daemon.Wiring`: always ``names``.

    As the real factory: a new :class:`FakeComponent` per name unless the
    daemon passes a running one in ``existing`` (the daemon keeps the ones
    it started in ``daemon._components``; ``made`` lists every one made).
    ``capture`` is among the components the daemon starts before the rules.
    """

    def __init__(self, *names: str) -> None:
        self.names = names or ("capture", "broker")
        self.made: list[FakeComponent] = []
        self._fail: dict[str, list[tuple[str, bool]]] = {}

    def fail(self, name: str, method: str, *, always: bool = False) -> None:
        """Every ``name`` component made from now on fails its first ``method`` call
        (every one: ``always``). For a running one, call its own :meth:`FakeComponent.fail`."""
        self._fail.setdefault(name, []).append((method, always))

    def __call__(
        self,
        config: Config,
        _logger: Logger,
        _backend: Backend,
        _collect: Callable[[], dict[str, Any]],
        existing: dict[str, Component] | None,
    ) -> dict[str, Component]:
        out: dict[str, Component] = {}
        for name in self.names:
            current = (existing or {}).get(name)
            if current is None:
                made = FakeComponent(name, config)
                for method, always in self._fail.get(name, []):
                    made.fail(method, always=always)
                self.made.append(made)
                current = made
            out[name] = current
        return out


def fake_daemon(
    config: Config | None = None,
    logger: Logger | None = None,
    *,
    backend: Backend | None = None,
    others: tuple[Backend, ...] = (),
    components: FakeComponents | None = None,
    load: Callable[[str | None], Config] | None = None,
    interval: float = 0.01,
) -> Daemon:
    """A :class:`Daemon` wired to fakes: no root, kernel or host files needed.

    ``backend`` (a :class:`FakeBackend` by default) is the backend of every
    config unless a config names the other one, which gets a
    :class:`FakeIptablesBackend` (``daemon.backend`` says which; pass it in
    ``others`` to hold it beforehand). ``load``
    is what a reload reads (default: the first config again). Point
    ``$IMDSGUARD_RUN_DIR``/``STATE_DIR`` at a temporary directory first: the
    daemon takes its firewall lock and writes ``state.json`` there.
    """
    config = config or Config()
    first = backend or FakeBackend()
    by_name: dict[str, Backend] = {b.name: b for b in others}
    by_name[first.name] = first

    def backend_for(wanted: Config, current: Backend | None) -> Backend:
        name = first.name if wanted.backend == BackendName.AUTO else BackendName(wanted.backend)
        if current is not None and current.name == name:
            return current
        if name not in by_name:
            by_name[name] = FakeIptablesBackend() if name == BackendName.IPTABLES else FakeBackend()
        return by_name[name]

    wiring = Wiring(
        load_config=load or (lambda _path: config),
        backend_for=backend_for,
        components=components or FakeComponents(),
        leftovers=lambda _name: [],
    )
    return Daemon(config, logger or structlog.get_logger(), interval, wiring=wiring)


def logged(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    """The lines of ``event`` in ``structlog.testing.capture_logs()``'s list."""
    return [line for line in logs if line.get("event") == event]


class RecordingLogger:
    """A structlog logger (debug included) that keeps its lines in memory.

    For a logger handed to objects whose threads outlive a
    ``structlog.testing.capture_logs()`` block (a module-scoped server), or
    when a test runs beside others' logging: ``lines`` is (level, event,
    fields) per call, in order, from a real filtering bound logger.
    """

    def __init__(self, level: int = logging.DEBUG) -> None:
        self._capture = structlog.testing.LogCapture()
        bound: Any = structlog.wrap_logger(
            structlog.ReturnLogger(),
            processors=[self._capture],
            wrapper_class=structlog.make_filtering_bound_logger(level),
        )
        self.debug = bound.debug
        self.info = bound.info
        self.warning = bound.warning
        self.error = bound.error

    @property
    def lines(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Every line so far: (level, event, the other fields)."""
        return [
            (
                str(e["log_level"]),
                str(e["event"]),
                {k: v for k, v in e.items() if k not in ("event", "log_level")},
            )
            for e in list(self._capture.entries)
        ]
