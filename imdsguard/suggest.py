"""``imdsguard suggest``: turn what audit mode saw into a proposed ``allow:`` block.

Audit mode logs every access by a process that is not allowlisted
(``imds_access_audited``). From those events this proposes the users to
allow, or a group where several of them share one, with counts and
last-seen times as YAML comments, ready to paste into the config; and it
lists who still uses IMDSv1.

Audit mode does not log allowlisted users, so the proposal also carries the
users and groups the config already allows (marked ``# already allowed``):
pasting it must not take anyone's access away. Everything taken from events
(executables, units, user names, times) is escaped before it is printed, so
a program cannot add lines to the proposal or hide them on a terminal by
its name.

Root seen from a system service is proposed as that unit (``allow.units``)
rather than as the user root: allowing root lets every root process
through, allowing the unit only that service's processes (cgroup v2 hosts).
Root seen outside any service (a login session, cron) is still proposed as
a user, with that said in its comment.

A group is proposed only when every member of it was seen using IMDS:
allowing a group lets all its members through, and a suggestion must not
quietly widen access beyond what was observed.
"""

from __future__ import annotations

import grp
import json
import pwd
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from imdsguard.config import AllowConfig, Principal
from imdsguard.events.log import escape

AUDITED = "imds_access_audited"


@dataclass
class _Seen:
    count: int = 0
    last: str = ""
    exes: set[str] = field(default_factory=set)
    units: set[str] = field(default_factory=set)

    def add(self, event: dict[str, Any]) -> None:
        self.count += int(event.get("attempts") or 1)
        self.last = max(self.last, str(event.get("timestamp") or ""))
        if event.get("exe"):
            self.exes.add(str(event["exe"]))
        if event.get("unit"):
            self.units.add(str(event["unit"]))

    def merge(self, other: _Seen) -> None:
        self.count += other.count
        self.last = max(self.last, other.last)
        self.exes |= other.exes
        self.units |= other.units

    def describe(self) -> str:
        """Counts, last time, executables and units: escaped, fit for one comment line."""
        what = ", ".join(escape(e) for e in sorted(self.exes)[:3]) or "unknown exe"
        if len(self.exes) > 3:
            what += f" (+{len(self.exes) - 3} more)"
        units = ", ".join(escape(u) for u in sorted(self.units)[:3])
        where = f" [{units}]" if units else ""
        return f"{self.count} accesses, last {escape(self.last) or '?'}: {what}{where}"


def _service(event: dict[str, Any]) -> str | None:
    """The system service a root event came from (``allow.units`` material), or None."""
    unit = event.get("unit")
    if event.get("uid") != 0 or not isinstance(unit, str) or not unit.endswith(".service"):
        return None
    if unit.startswith("user@"):  # a user's own manager: not one service
        return None
    return unit


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _members(gid: int) -> set[int]:
    """Every uid in group ``gid``: primary (passwd) and supplementary (group)."""
    uids = {p.pw_uid for p in pwd.getpwall() if p.pw_gid == gid}
    try:
        names = grp.getgrgid(gid).gr_mem
    except KeyError:
        return uids
    for name in names:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    return uids


def _groups_covering(uids: set[int]) -> list[tuple[grp.struct_group, set[int]]]:
    """Groups with 2+ members, all of them among ``uids`` (largest first, disjoint)."""
    found = []
    for group in grp.getgrall():
        members = _members(group.gr_gid)
        if len(members) >= 2 and members <= uids:
            found.append((group, members))
    found.sort(key=lambda gm: (-len(gm[1]), gm[0].gr_name))
    chosen: list[tuple[grp.struct_group, set[int]]] = []
    covered: set[int] = set()
    for group, members in found:
        if not members & covered:
            chosen.append((group, members))
            covered |= members
    return chosen


def _item(value: str) -> str:
    """``value`` as a YAML list item on one line (quoted where YAML needs it)."""
    dumped: str = yaml.safe_dump([value], default_flow_style=False, width=1 << 20)
    lines = [ln for ln in dumped.splitlines() if ln != "..."]
    if len(lines) == 1:
        return lines[0]
    return f"- {json.dumps(value)}"  # JSON's escapes are valid in a YAML double-quoted string


def _section(key: str, entries: list[tuple[str, str]]) -> list[str]:
    """``key:`` and its items under ``allow:``, each with its comment."""
    if not entries:
        return [f"  {key}: []"]
    lines = [f"  {key}:"]
    for name, note in entries:
        item = f"  {_item(name)}"
        lines.append(f"{item}  # {note}" if note else item)
    return lines


def suggest(
    events: Iterable[dict[str, Any]],
    source: str = "",
    allowed: AllowConfig | None = None,
    config_path: str = "",
) -> str:
    """The proposal as YAML text (with comments) for ``events``.

    ``allowed`` is the allowlist in force (from ``config_path``): its users
    and groups are kept in the proposal. ``None`` means it could not be
    read, and the output says that it is left out.
    """
    by_uid: dict[int, _Seen] = {}
    by_unit: dict[str, _Seen] = {}
    v1: dict[tuple[str, str, str], _Seen] = {}
    forwarded = _Seen()
    total = 0
    first, last = "", ""
    for event in events:
        if event.get("event") != AUDITED:
            continue
        total += 1
        stamp = str(event.get("timestamp") or "")
        first = min(first, stamp) if first else stamp
        last = max(last, stamp)
        uid = event.get("uid")
        service = _service(event)
        if uid is None:
            forwarded.add(event)
        elif service is not None:
            by_unit.setdefault(service, _Seen()).add(event)
        else:
            by_uid.setdefault(int(uid), _Seen()).add(event)
        if event.get("imds_version") == "v1":
            who = str(event.get("user") or event.get("src") or uid)
            key = (who, str(event.get("exe") or "?"), str(event.get("unit") or "-"))
            v1.setdefault(key, _Seen()).add(event)

    span = f" between {escape(first)} and {escape(last)}" if total else ""
    lines = [
        "# imdsguard suggest: proposed allowlist from audit mode",
        f"# {total} audited accesses{span}" + (f" ({escape(source)})" if source else ""),
        "# Prefer the credential broker (broker.clients) for software that only",
        "# needs the role's credentials; allow direct IMDS access only where needed.",
    ]
    if allowed is None:
        lines += [
            "# NOTE: the current allowlist is NOT included (the config could not be read):",
            "# add the users and groups it allows, or pasting this takes their access away.",
        ]
    else:
        where = escape(config_path) if config_path else "the config"
        lines.append(f"# Keeps what {where} already allows (marked 'already allowed').")

    old_users: tuple[Principal, ...] = allowed.users if allowed else ()
    old_groups: tuple[Principal, ...] = allowed.groups if allowed else ()
    # Seen uids the config lets through already (events logged before it changed).
    covered = {p.id for p in old_users}
    for old in old_groups:
        covered |= _members(old.id)
    new_uids = {u for u in by_uid if u not in covered}
    old_group_ids = {g.id for g in old_groups}
    groups = [(g, m) for g, m in _groups_covering(new_uids) if g.gr_gid not in old_group_ids]
    in_groups = set().union(*(m for _, m in groups)) if groups else set()

    users: list[tuple[str, str]] = []
    for principal in old_users:
        seen = by_uid.get(principal.id)
        note = "already allowed" + (f"; {seen.describe()}" if seen else "")
        users.append((principal.name, note))
    for uid in sorted(new_uids - in_groups):
        users.append((_user_name(uid), by_uid[uid].describe()))
    group_entries = [(g.name, "already allowed") for g in old_groups]
    for group, members in groups:
        seen = _Seen()
        for uid in members:
            seen.merge(by_uid[uid])
        names = ", ".join(escape(_user_name(u)) for u in sorted(members))
        group_entries.append((group.gr_name, f"members {names}: {seen.describe()}"))

    old_units: tuple[str, ...] = allowed.units if allowed else ()
    unit_entries = [
        (u, "already allowed" + (f"; {by_unit[u].describe()}" if u in by_unit else ""))
        for u in old_units
    ]
    for unit in sorted(set(by_unit) - set(old_units)):
        unit_entries.append((unit, f"root service: {by_unit[unit].describe()}"))
    if 0 in new_uids - in_groups and by_unit:
        users = [
            (n, note + "; outside any service" if n == _user_name(0) else note) for n, note in users
        ]

    lines.append("allow:")
    lines += _section("users", users)
    if group_entries:
        lines += _section("groups", group_entries)
    if unit_entries:
        lines += _section("units", unit_entries)
        lines.append(
            "# units: their processes pass whoever they run as (needs the unified cgroup v2"
        )
        lines.append("# hierarchy); root need not be allowed for them.")
    if not new_uids and not set(by_unit) - set(old_units):
        lines.append("# nothing new to allow: no local process outside the allowlist used IMDS")
    if forwarded.count:
        lines.append(
            f"# forwarded (container) traffic: {forwarded.count} accesses; owner matching "
            "cannot apply there; see 'containers:'"
        )
    lines.append("#")
    if v1:
        lines.append(
            "# still using IMDSv1 (no token): move these to IMDSv2 before requiring tokens"
        )
        for (who, exe, unit), seen in sorted(v1.items(), key=lambda kv: -kv[1].count):
            lines.append(
                f"#   user {escape(who)}, exe {escape(exe)}, unit {escape(unit)}: "
                f"{seen.count}, last {escape(seen.last)}"
            )
    else:
        lines.append("# no IMDSv1 use seen: instances can require tokens (http-tokens required)")
    return "\n".join(lines) + "\n"
