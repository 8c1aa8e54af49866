"""The daemon's published state: a small JSON file that ``status`` reads.

:class:`StateDocument` is its shape (the daemon writes it); a reader gets a
plain ``dict`` back from :func:`read_state` and must check what it uses:
the file may come from another version of the daemon.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, TypedDict

from imdsguard import paths

#: One component's ``health()`` (capture, broker, metrics): JSON-able, never
#: secrets. Keys every component may have: ``running`` (bool), ``degraded``
#: (str: what is wrong, shown by ``status``), ``error`` (str). The capture adds its
#: counters (``events``, ``suppressed``, ``dropped``, ``by_process``: a list of
#: ``{"user", "exe", "count"}``), the broker ``healthy`` and ``requests_by_status``.
ComponentHealth = dict[str, Any]


class Attribution(TypedDict):
    """Whether denied packets are attributed to processes, and why not."""

    available: bool  # the capture runs
    held: bool  # packets wait in a queue until attributed (else logged and denied at once)
    reason: str | None  # why attribution is limited or unavailable


class StateDocument(TypedDict):
    """``state.json``, as the daemon publishes it (on change and every heartbeat)."""

    version: str
    pid: int
    started: float  # Unix time
    updated: float
    config: str  # the config file's path
    mode: str  # Mode
    backend: str  # BackendName (never auto)
    ruleset: str  # RuleSet.to_json() of the rules in force
    capture: str  # Capture: how denied packets reach the daemon (also in ruleset)
    rules_restored_total: int
    last_problems: list[str]  # what the last repair found
    reloads: int
    reload_failures: int
    components: dict[str, ComponentHealth]
    degraded: list[str]  # why protection is in place but something is off
    units: dict[str, str | None]  # allow.units -> cgroup path (None: not running)
    attribution: Attribution
    limits: list[str]  # what the backend cannot guard against here


def write_state(state: StateDocument) -> None:
    """Atomically replace the state file (readable by everyone: it holds no secrets)."""
    target = paths.state_file()
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def read_state() -> dict[str, Any] | None:
    """The last state the daemon published, or None."""
    try:
        with open(paths.state_file(), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
