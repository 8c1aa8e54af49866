"""``imdsguard suggest``: turn what audit mode saw into a proposed ``allow:`` block.

Audit mode logs every access by a process that is not allowlisted
(``imds_access_audited``). From those events this proposes the users to
allow, or a group where several of them share one, with counts and
last-seen times as YAML comments, ready to paste into the config; and it
lists who still uses IMDSv1.

A group is proposed only when every member of it was seen using IMDS:
allowing a group lets all its members through, and a suggestion must not
quietly widen access beyond what was observed.
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

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

    def describe(self) -> str:
        what = ", ".join(sorted(self.exes)[:3]) or "unknown exe"
        if len(self.exes) > 3:
            what += f" (+{len(self.exes) - 3} more)"
        units = f" [{', '.join(sorted(self.units)[:3])}]" if self.units else ""
        return f"{self.count} accesses, last {self.last or '?'}: {what}{units}"


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


def suggest(events: Iterable[dict[str, Any]], source: str = "") -> str:
    """The proposal as YAML text (with comments) for ``events``."""
    by_uid: dict[int, _Seen] = {}
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
        if uid is None:
            forwarded.add(event)
        else:
            by_uid.setdefault(int(uid), _Seen()).add(event)
        if event.get("imds_version") == "v1":
            who = str(event.get("user") or event.get("src") or uid)
            key = (who, str(event.get("exe") or "?"), str(event.get("unit") or "-"))
            v1.setdefault(key, _Seen()).add(event)

    lines = [
        "# imdsguard suggest: proposed allowlist from audit mode",
        f"# {total} audited accesses{f' between {first} and {last}' if total else ''}"
        + (f" ({source})" if source else ""),
        "# Prefer the credential broker (broker.clients) for software that only",
        "# needs the role's credentials; allow direct IMDS access only where needed.",
    ]
    groups = _groups_covering(set(by_uid))
    in_groups = set().union(*(m for _, m in groups)) if groups else set()
    users = sorted(u for u in by_uid if u not in in_groups)
    body: dict[str, Any] = {"allow": {"users": [_user_name(u) for u in users]}}
    if groups:
        body["allow"]["groups"] = [g.gr_name for g, _ in groups]
    dumped = yaml.safe_dump(body, sort_keys=False, default_flow_style=False).splitlines()
    comments = {f"- {_user_name(u)}": by_uid[u].describe() for u in users}
    for group, members in groups:
        seen = _Seen()
        for uid in members:
            other = by_uid[uid]
            seen.count += other.count
            seen.last = max(seen.last, other.last)
            seen.exes |= other.exes
            seen.units |= other.units
        names = ", ".join(sorted(_user_name(u) for u in members))
        comments[f"- {group.gr_name}"] = f"members {names}: {seen.describe()}"
    for line in dumped:
        note = comments.get(line.strip())
        lines.append(f"{line}  # {note}" if note else line)
    if not by_uid:
        lines.append("# nothing to allow: no local process used IMDS while audited")
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
            lines.append(f"#   user {who}, exe {exe}, unit {unit}: {seen.count}, last {seen.last}")
    else:
        lines.append("# no IMDSv1 use seen: instances can require tokens (http-tokens required)")
    return "\n".join(lines) + "\n"
