"""``imdsguard status``: is this host protected, and if not, why.

The answer comes from the kernel, not from what the daemon believes: the
rules the daemon last applied (or, with no daemon, the configured policy)
are compared with what the firewall holds right now.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from imdsguard import _locks, _state, cgroups, paths
from imdsguard.config import Config, load_config
from imdsguard.domain import Capture, Mode
from imdsguard.errors import ImdsGuardError, PermissionDeniedError
from imdsguard.firewall.base import FamilyState
from imdsguard.firewall.detect import leftovers, make_backend
from imdsguard.identity import service_uids
from imdsguard.policy import RuleSet, build_ruleset

_FINE = (FamilyState.OK, FamilyState.DISABLED)
EXIT = {"protected": 0, "degraded": 1, "unprotected": 2, "unknown": 3}
RECENT = 5  # blocked attempts shown by ``status``


def _blocked(limit: int = RECENT) -> dict[str, Any]:
    from imdsguard.events.log import count_events, read_events  # noqa: PLC0415 - status only

    path = paths.events_file()
    try:
        return {"total": count_events(path), "recent": read_events(path, limit)}
    except FileNotFoundError:
        return {"total": 0, "recent": []}  # nothing was ever logged
    except OSError as exc:
        # Not "0 attempts": we could not look (the log is root's alone).
        why = "readable by root only" if isinstance(exc, PermissionError) else exc.strerror
        return {"total": None, "recent": [], "error": f"cannot read {path}: {why}"}


def _units(ruleset: RuleSet) -> dict[str, str]:
    """Each of ``allow.units``: ``running`` (its rule is in the rule set) or ``not running``.

    A unit that is not running has no processes, so nobody is denied who
    should not be: this is reported, and does not make the host degraded.
    Its rule goes in as soon as its cgroup appears.
    """
    running = {unit for unit, _, _ in ruleset.allow_cgroups}
    return {u: "running" if u in running else "not running" for u in ruleset.allow_units}


def expected_rulesets(
    state: dict[str, Any] | None,
    daemon_running: bool,
    config: Config | None,
    extra_uids: tuple[int, ...] = (),
    unit_cgroups: Mapping[str, cgroups.UnitCgroup | None] | None = None,
) -> list[RuleSet]:
    """What should be in the kernel, most likely first.

    With a daemon running: the rule set it applied, as ``state.json`` records
    it (capture included), and nothing else; a record from before
    ``capture`` may mean queue or log rules, and a daemon with no record yet
    (or none readable) may hold the config's policy with any capture.
    Without one: the config's policy as ``apply`` leaves it (capture
    ``none``) and, when the last daemon's record says it captured (it was
    killed before handing over), with that capture too. A record this
    version cannot read counts as none. No record and no config: nothing.
    """
    recorded = _recorded(state)
    if daemon_running and recorded is not None and _has_capture(state):
        return [recorded]
    if daemon_running and recorded is not None:
        # A record from before ``capture``: its queue number meant "queue" where the
        # kernel could, "log" where it could not; either may be in force.
        return [recorded, *([dataclasses.replace(recorded, capture=Capture.LOG)]
                            if recorded.capture == Capture.QUEUE else [])]  # fmt: skip
    if config is None:
        return []
    plain = build_ruleset(config, extra_uids=extra_uids, unit_cgroups=unit_cgroups)
    out = [plain]
    if daemon_running:
        # Running but no record yet (its first publish comes after the rules) or
        # none readable: it captures one way or the other.
        captures: tuple[Capture, ...] = (Capture.QUEUE, Capture.LOG)
    elif recorded is not None and recorded.capture != Capture.NONE:
        captures = (recorded.capture,)
        if not _has_capture(state) and recorded.capture == Capture.QUEUE:
            captures += (Capture.LOG,)
    else:
        captures = ()
    out += [dataclasses.replace(plain, capture=c) for c in captures]
    return out


def _recorded(state: dict[str, Any] | None) -> RuleSet | None:
    """The rule set ``state.json`` records, or None when there is none it can read.

    A record written by another version (a downgrade, a value this one does
    not know) is no record: status then checks against the config instead of
    failing.
    """
    if not state or not state.get("ruleset"):
        return None
    try:
        return RuleSet.from_json(state["ruleset"])
    except (ValueError, KeyError, TypeError):
        return None


def _has_capture(state: dict[str, Any] | None) -> bool:
    """True when the record names its capture (written since ``RuleSet.capture``)."""
    try:
        return bool(state) and "capture" in json.loads(state["ruleset"])  # type: ignore[index]
    except (ValueError, KeyError, TypeError):
        return False


def gather(config_path: str | None) -> dict[str, Any]:
    """The status document (docs/contract.md lists its keys)."""
    reasons: list[str] = []
    daemon_running = _locks.is_held(paths.daemon_lock())
    record = _state.read_state()  # a stopped daemon's too: what it last captured with
    state = record if daemon_running else None
    config = None
    try:
        config = load_config(config_path, trust=False)
    except ImdsGuardError as exc:
        reasons.append(f"config: {exc}")

    extra: tuple[int, ...] = ()
    units = None
    if config is not None and not (daemon_running and record and record.get("ruleset")):
        try:
            extra = service_uids(config)
        except ImdsGuardError as exc:
            reasons.append(str(exc))
        units = cgroups.resolve(config.allow.units)
    candidates = expected_rulesets(record, daemon_running, config, extra, units)
    ruleset = candidates[0] if candidates else None
    mode = (state or {}).get("mode") or (config.mode if config else None)
    backend_name = (state or {}).get("backend") or (config.backend if config else "auto")
    broker_enabled = bool(config and config.broker.enabled)
    if state is not None:
        broker_enabled = "broker" in state.get("components", {})

    doc: dict[str, Any] = {
        "protected": False,
        "state": "unknown",
        "reasons": reasons,
        "mode": mode,
        "backend": backend_name,
        "daemon": {
            "running": daemon_running,
            "pid": (state or {}).get("pid"),
            "version": (state or {}).get("version"),
            "rules_restored_total": (state or {}).get("rules_restored_total", 0),
        },
        "rules": {"ipv4": "unknown", "ipv6": "unknown"},
        "units": {},
        "problems": [],
        "leftovers": [],  # {backend, families}: rules of ours in the backend not in use
        "broker": {"enabled": broker_enabled, "healthy": None},
        # Who was blocked: informational, protection does not depend on it.
        "attribution": (state or {}).get("attribution", {"available": None, "reason": None}),
        "blocked": _blocked(),
        # What the running daemon's backend cannot guard against on this host.
        "limits": list((state or {}).get("limits", [])),
    }
    if doc["blocked"]["total"] is None:
        reasons.append(f"blocked attempts not counted: {doc['blocked']['error']} (run as root)")
    if ruleset is None:
        reasons.append("no valid configuration and no running daemon: cannot tell what to check")
        return doc

    try:
        backend = make_backend(backend_name, daemon_running=daemon_running)
        doc["backend"] = backend.name
        results = [backend.inspect(c) for c in candidates]
        found = next((r for r in results if all(i.state in _FINE for i in r.values())), results[0])
    except PermissionDeniedError as exc:
        reasons.append(f"cannot read the firewall: {exc} (run as root)")
        return doc
    except ImdsGuardError as exc:
        reasons.append(f"cannot read the firewall: {exc}")
        return doc

    doc["units"] = _units(ruleset)
    doc["rules"] = {family: found[family].state for family in ("ipv4", "ipv6")}
    doc["problems"] = [f"{f}: {p}" for f, i in found.items() for p in i.problems]
    _check_leftovers(doc, backend.name)
    missing = [f for f, i in found.items() if i.state == FamilyState.MISSING]
    drifted = [f for f, i in found.items() if i.state == FamilyState.DRIFTED]
    if all(i.state == FamilyState.DISABLED for i in found.values()):
        missing.append("all")
        reasons.append("no address family is enabled: nothing is protected")
    for family in missing:
        if family != "all":
            reasons.append(f"{family} rules are missing: IMDS over {family} is not guarded")
    for family in drifted:
        reasons.append(f"{family} rules differ from the policy (the daemon repairs this)")
    if not daemon_running:
        reasons.append("daemon is not running: rules are not watched or repaired")
    reasons.extend((state or {}).get("degraded", []))
    if mode == Mode.AUDIT:
        reasons.append("audit mode: access is logged, not blocked")

    if broker_enabled:
        health = (state or {}).get("components", {}).get("broker", {})
        doc["broker"]["healthy"] = bool(health.get("healthy")) if daemon_running else False
        doc["broker"].update({k: v for k, v in health.items() if k != "healthy"})
        if not doc["broker"]["healthy"]:
            reasons.append("broker is not healthy: " + str(health.get("last_error") or "down"))

    if missing:
        doc["state"] = "unprotected"
    elif reasons:
        doc["state"] = "degraded"
    else:
        doc["state"] = "protected"
    doc["protected"] = doc["state"] == "protected"
    return doc


def _check_leftovers(doc: dict[str, Any], current: str) -> None:
    """Rules of ours in the other backend: they still deny, by a policy nobody keeps.

    Such a family is at best ``drifted`` (never ``ok``): what governs its
    IMDS traffic is not only the policy we show.
    """
    doc["leftovers"] = []
    try:
        found = leftovers(current)
    except ImdsGuardError as exc:
        doc["reasons"].append(f"cannot check the other firewall backend for rules of ours: {exc}")
        return
    for other, families in found:
        other.close()
        doc["leftovers"].append({"backend": other.name, "families": list(families)})
        doc["reasons"].append(
            f"rules of ours are also in the {other.name} backend ({', '.join(families)}), left "
            f"from an earlier backend: they still deny IMDS traffic by their own, stale policy "
            f"(the daemon removes them when it starts; or run `imdsguard remove` and re-apply)"
        )
        for family in families:
            doc["problems"].append(f"{family}: {other.name} rules of ours left in place")
            if doc["rules"].get(family) == FamilyState.OK:
                doc["rules"][family] = FamilyState.DRIFTED


def render_text(doc: dict[str, Any]) -> str:
    """``status`` for people."""
    lines = [
        f"imdsguard: {doc['state'].upper()}",
        f"  mode:     {doc['mode']}    backend: {doc['backend']}",
        f"  daemon:   {'running (pid ' + str(doc['daemon']['pid']) + ')' if doc['daemon']['running'] else 'not running'}",  # noqa: E501
        f"  rules:    ipv4 {doc['rules']['ipv4']}, ipv6 {doc['rules']['ipv6']}"
        f"    (restored {doc['daemon']['rules_restored_total']} times)",
    ]
    if doc["broker"]["enabled"]:
        healthy = "healthy" if doc["broker"]["healthy"] else "NOT healthy"
        lines.append(f"  broker:   {healthy}")
    if doc["blocked"]["total"] is None:
        lines.append("  blocked:  unknown (the event log could not be read)")
    else:
        lines.append(f"  blocked:  {doc['blocked']['total']} attempts logged")
    recent = doc["blocked"].get("recent") or []
    if recent:
        from imdsguard.events.log import format_console  # noqa: PLC0415 - text output only

        lines.append(f"  recent:   (last {min(len(recent), RECENT)}, newest last)")
        lines.extend(f"    {format_console(event)}" for event in recent[-RECENT:])
    units = doc.get("units") or {}
    stopped = [u for u, state in units.items() if state != "running"]
    if units:
        lines.append(f"  units:    {len(units) - len(stopped)} of {len(units)} running")
    if stopped:
        names = ", ".join(stopped)
        lines.append(f"  note:     not running (no cgroup, no rule until they start): {names}")
    if doc["attribution"].get("available") is False:
        lines.append(f"  note:     attribution unavailable: {doc['attribution']['reason']}")
    elif doc["attribution"].get("held") is False:
        lines.append(f"  note:     attribution best-effort: {doc['attribution']['reason']}")
    for limit in doc.get("limits", []):
        lines.append(f"  limit:    {limit}")
    for reason in doc["reasons"]:
        lines.append(f"  ! {reason}")
    for problem in doc["problems"]:
        lines.append(f"    - {problem}")
    return "\n".join(lines)


def exit_code(doc: dict[str, Any]) -> int:
    """0 protected, 1 degraded, 2 unprotected, 3 unknown."""
    return EXIT[doc["state"]]
