"""The daemon's components: parts with threads of their own (capture, broker, metrics).

The daemon's loop owns the firewall; everything else that runs beside it is
a :class:`Component`, built by :func:`make_components` from the config and
the backend's capabilities, started in two phases around the rules
(:func:`in_phase`) and reconfigured in place on reload.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from imdsguard import _state
from imdsguard._log import Logger
from imdsguard.config import Config
from imdsguard.domain import Capture
from imdsguard.firewall.base import Backend
from imdsguard.policy import capture_for

#: Components that must run before the rules go in (the capture listens before
#: the rules that queue packets to it); the others (the broker above all: its
#: IMDS requests need the rules that allow its uid) start once they are in.
BEFORE_RULES = frozenset({"capture"})


def in_phase(name: str, before: bool | None) -> bool:
    """``before``: True, the components that precede the rules; False, the rest; None, all."""
    return before is None or (name in BEFORE_RULES) == before


class Component(Protocol):
    """A part of the daemon with threads of its own (capture, broker)."""

    def start(self) -> None:
        """Start serving; raise ImdsGuardError when impossible."""

    def stop(self) -> None:
        """Stop and release everything."""

    def reconfigure(self, config: Config) -> None:
        """Adopt a new valid configuration."""

    def health(self) -> _state.ComponentHealth:
        """A JSON-able summary for ``status`` (never secrets, see ``_state.ComponentHealth``)."""


def component_problems(health: dict[str, _state.ComponentHealth]) -> list[str]:
    """What components say is wrong (their health's ``degraded`` line), for ``status``."""
    return [f"{name}: {h['degraded']}" for name, h in sorted(health.items()) if h.get("degraded")]


def make_components(
    config: Config,
    logger: Logger,
    backend: Backend,
    collect: Callable[[], dict[str, Any]],
    existing: dict[str, Component] | None = None,
) -> dict[str, Component]:
    """The components ``config`` asks for on ``backend``, reusing running ones."""
    existing = existing or {}
    wanted: dict[str, Component] = {}
    from imdsguard.events.capture import CaptureComponent  # noqa: PLC0415

    # Where the kernel cannot queue from nftables, the capture reads a log group instead
    # (the rule set it runs with is built the same way: see policy.capture_for).
    hold = capture_for(backend.capabilities(), capturing=True) == Capture.QUEUE
    capture = existing.get("capture")
    if not isinstance(capture, CaptureComponent) or capture.hold != hold:
        capture = CaptureComponent(config, logger, hold=hold)
    wanted["capture"] = capture
    if config.broker.enabled:
        from imdsguard.broker.supervisor import BrokerSupervisor  # noqa: PLC0415

        wanted["broker"] = existing.get("broker") or BrokerSupervisor(config, logger)
    if config.metrics.textfile or config.metrics.listen:
        from imdsguard.metrics import MetricsExporter  # noqa: PLC0415

        wanted["metrics"] = existing.get("metrics") or MetricsExporter(
            config.metrics, collect, logger
        )
    return wanted
