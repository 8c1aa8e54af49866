"""nftables rules as data: the table a :class:`~imdsguard.policy.RuleSet` asks for (pure).

See :mod:`imdsguard.firewall.nftables` for the layout.
"""

from __future__ import annotations

import grp
import hashlib
import json
import pwd
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from imdsguard import cgroups
from imdsguard.domain import Action, Capture, Containers
from imdsguard.policy import FAMILIES, MARK_SEEN, QUEUE_NUM, RuleSet

TABLE = "imdsguard"
FAMILY = "inet"
# Before the usual filter chains (priority 0), after mangle (-150): other tools'
# marks are set, and a deny here costs nothing downstream.
PRIORITY = -10
#: The daemon-less copy of the deny. After our own table, so a denied packet
#: reaches the capture's queue or log there first; a reject in either is final.
BACKSTOP = "imdsguard_backstop"
BACKSTOP_PRIORITY = -5
#: The chain of ``allow.units`` rules (loaded in nft syntax, see the package docstring).
UNITS = "units"

Cmd = dict[str, Any]


def expand_groups(gids: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """Member uids of each group: primary (from passwd) and supplementary (from group)."""
    wanted = set(gids)
    members: dict[int, set[int]] = {gid: set() for gid in wanted}
    for entry in pwd.getpwall():
        if entry.pw_gid in wanted:
            members[entry.pw_gid].add(entry.pw_uid)
    for gid in wanted:
        try:
            names = grp.getgrgid(gid).gr_mem
        except KeyError:
            continue
        for name in names:
            try:
                members[gid].add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                continue
    return {gid: tuple(sorted(uids)) for gid, uids in members.items()}


def _match(left: Any, right: Any, op: str = "==") -> Cmd:
    return {"match": {"op": op, "left": left, "right": right}}


def _mark_has(bit: int) -> Cmd:
    return _match({"&": [{"meta": {"key": "mark"}}, bit]}, bit)


_CT_MARK: Cmd = {"ct": {"key": "mark"}}


def _seen() -> list[Cmd]:
    """The packet was queued and is back (NF_REPEAT): see :data:`~imdsguard.policy.MARK_SEEN`.

    Our bit in the packet's mark (the verdict sets it) *and* in its
    connection's conntrack mark (the queue rule sets it; no socket can), so a
    client's ``SO_MARK`` alone never counts as seen.
    """
    return [
        _match({"&": [_CT_MARK, MARK_SEEN]}, MARK_SEEN),
        _mark_has(MARK_SEEN),
    ]


def _ct_mark(op: str, value: int) -> Cmd:
    return {"mangle": {"key": _CT_MARK, "value": {op: [_CT_MARK, value & 0xFFFFFFFF]}}}


def _meta_mark_clear() -> Cmd:
    mark = {"meta": {"key": "mark"}}
    return {"mangle": {"key": mark, "value": {"&": [mark, 0xFFFFFFFF ^ MARK_SEEN]}}}


#: Packets that conntrack tracks: only their conntrack entry can carry MARK_SEEN,
#: so only they are queued (an untracked one would come back unmarked, forever).
_TRACKED = _match({"ct": {"key": "state"}}, ["new", "established", "related"], op="in")


def _daddr(family: str) -> Cmd:
    proto = "ip" if family == "ipv4" else "ip6"
    return {"payload": {"protocol": proto, "field": "daddr"}}


def _deny(ruleset: RuleSet, prefix: Sequence[Cmd] = ()) -> list[list[Cmd]]:
    if ruleset.action == Action.DROP:
        return [[*prefix, {"drop": None}]]
    return [
        [*prefix, _match({"meta": {"key": "l4proto"}}, "tcp"), {"reject": {"type": "tcp reset"}}],
        [*prefix, {"reject": {"type": "icmpx", "expr": "port-unreachable"}}],
    ]


def _deny_exprs(ruleset: RuleSet) -> list[list[Cmd]]:
    """What follows the allow rules (same semantics as the iptables backend).

    Only capture ``queue`` holds packets; with ``log`` the capture reads an
    NFLOG group instead (see :func:`_log_rule`) and the deny is immediate.
    """
    if ruleset.capture != Capture.QUEUE:
        return _deny(ruleset) if ruleset.enforcing else []
    flagged = _ct_mark("|", MARK_SEEN)
    if not ruleset.enforcing:
        bypass = {"queue": {"num": QUEUE_NUM, "flags": "bypass"}}
        return [
            [*_seen(), _ct_mark("&", ~MARK_SEEN), _meta_mark_clear(), {"return": None}],
            [_TRACKED, flagged, bypass],
        ]
    queue: Cmd = {"queue": {"num": QUEUE_NUM}}
    # Seen: denied. New: flagged and queued. Untracked (never queued): denied at once.
    return [*_deny(ruleset, _seen()), [_TRACKED, flagged, queue], *_deny(ruleset)]


def _log_rule(ruleset: RuleSet) -> list[Cmd] | None:
    """Capture ``log``: a copy of each packet for the capture (never a verdict)."""
    if ruleset.capture != Capture.LOG:
        return None
    return [{"log": {"group": QUEUE_NUM}}]


def _comment(chain: str, expr: Any) -> str:
    digest = hashlib.sha256(json.dumps([chain, expr], sort_keys=True).encode()).hexdigest()
    return f"imdsguard:{digest[:16]}"


class Plan:
    """The rendered table: the batch that creates it and what inspection expects."""

    def __init__(self, table: str = TABLE, priority: int = PRIORITY) -> None:
        self.table = table
        self.priority = priority
        self.commands: list[Cmd] = []
        self.sets: dict[str, tuple[str, list[Any]]] = {}
        self.chains: dict[str, dict[str, Any]] = {}
        self.rules: dict[str, list[str]] = {}
        self.required: dict[str, list[str]] = {}
        self.texts: list[str] = []  # rules of the units chain, in nft syntax

    def add_set(self, name: str, kind: str, elements: list[Any]) -> None:
        spec: Cmd = {"family": FAMILY, "table": self.table, "name": name, "type": kind}
        if elements:
            spec["elem"] = elements
        self.commands.append({"add": {"set": spec}})
        self.sets[name] = (kind, elements)

    def add_chain(self, name: str, hook: str | None = None) -> None:
        spec: Cmd = {"family": FAMILY, "table": self.table, "name": name}
        if hook:
            spec.update(type="filter", hook=hook, prio=self.priority, policy="accept")
        self.commands.append({"add": {"chain": spec}})
        self.chains[name] = {k: spec[k] for k in ("type", "hook", "prio", "policy") if k in spec}
        self.rules[name] = []
        self.required[name] = []

    def add_rule(self, chain: str, expr: list[Cmd], required: bool = False) -> None:
        comment = _comment(chain, expr)
        self.commands.append(
            {
                "add": {
                    "rule": {
                        "family": FAMILY,
                        "table": self.table,
                        "chain": chain,
                        "expr": expr,
                        "comment": comment,
                    }
                }
            }
        )
        self.rules[chain].append(comment)
        if required:
            self.required[chain].append(comment)

    def add_text_rule(self, chain: str, rule: str, identity: object) -> None:
        """A rule JSON cannot say, in nft syntax, its comment made of ``identity`` alone.

        (Not of ``rule``: its level depends on the cgroup namespace's depth,
        which only the daemon measures; ``status`` compares without it.)
        """
        comment = _comment(chain, identity)
        self.texts.append(f'add rule {FAMILY} {self.table} {chain} {rule} comment "{comment}"')
        self.rules[chain].append(comment)

    def units_script(self) -> str:
        """The units chain's transaction: flush it, add its rules (nft -f syntax)."""
        return "\n".join([f"flush chain {FAMILY} {self.table} {UNITS}", *self.texts]) + "\n"

    def batch(self) -> dict[str, Any]:
        """Replace our table atomically: add (so delete cannot fail), delete, re-create."""
        table = {"family": FAMILY, "name": self.table}
        prelude = [
            {"add": {"table": table}},
            {"delete": {"table": table}},
            {"add": {"table": table}},
        ]
        return {"nftables": prelude + self.commands}

    def replace_in_place(self, listing: list[dict[str, Any]]) -> list[Cmd]:
        """Replace the table's content, keeping the table (and its ``owner`` flag).

        An owned table cannot be deleted and re-added in one batch through
        libnftables' JSON (nft 1.0.6 cannot express table flags in JSON, and
        an ``add table`` without them asks the kernel to drop the flag:
        EOPNOTSUPP). Flushing its rules and deleting its chains and sets in the
        same transaction as the new content is just as atomic.
        """
        table = {"family": FAMILY, "name": self.table}
        out: list[Cmd] = [{"flush": {"table": table}}]
        for kind in ("chain", "set"):
            for obj in listing:
                if kind in obj:
                    name = obj[kind]["name"]
                    out.append(
                        {"delete": {kind: {"family": FAMILY, "table": self.table, "name": name}}}
                    )
        return out + self.commands

    def lines(self) -> list[str]:
        """One JSON command per line (golden tests, ``check-config --rules``).

        The units chain's rules follow as ``{"nft": "<command>"}``.
        """
        lines = [json.dumps(c, sort_keys=True) for c in self.commands]
        return lines + [json.dumps({"nft": t}) for t in self.texts]


def render(
    ruleset: RuleSet,
    group_members: Mapping[int, Sequence[int]],
    table: str = TABLE,
    priority: int = PRIORITY,
    cgroup_offset: int = 0,
) -> Plan:
    """The table for ``ruleset`` (pure: group membership is passed in).

    ``cgroup_offset`` is how deep our cgroup namespace's root lies (0 on a
    host; inside a container, see :meth:`NftablesBackend.cgroup_offset`):
    ``socket cgroupv2 level`` counts from the kernel's real root.
    """
    plan = Plan(table, priority)
    uids = set(ruleset.allow_uids)
    for gid in ruleset.allow_gids:
        uids.update(group_members.get(gid, ()))
    plan.add_set("allow_uids", "uid", sorted(uids))
    plan.add_set("imds_v4", "ipv4_addr", list(ruleset.endpoints_v4))
    plan.add_set("imds_v6", "ipv6_addr", list(ruleset.endpoints_v6))
    log = _log_rule(ruleset)
    plan.add_chain("deny")  # before guard, whose rules go to it
    if log is not None:
        plan.add_rule("deny", log)
    for expr in _deny_exprs(ruleset):
        plan.add_rule("deny", expr, required=True)
    skuid = {"meta": {"key": "skuid"}}
    if ruleset.allow_units:
        plan.add_chain(UNITS)
        for unit, path, inode in ruleset.allow_cgroups:
            level = cgroups.level(path) + cgroup_offset
            rule = f'socket cgroupv2 level {level} "{path}" accept'
            plan.add_text_rule(UNITS, rule, [unit, path, inode])
    plan.add_chain("guard")
    plan.add_rule("guard", [_match(skuid, "@allow_uids"), {"accept": None}])
    if ruleset.allow_units:
        plan.add_rule("guard", [{"jump": {"target": UNITS}}])
    # Any other process's socket: denied. ``meta skuid`` does not match at all
    # where no process owns the packet (see TEARDOWN in the iptables backend):
    # the last packets of an allowed connection, after its socket was closed,
    # pass when the connection is established (its SYN got through); whatever
    # else has no owner is denied. ``goto``: in audit mode the deny chain
    # returns, and the packet then leaves our table, as after an accept.
    goto_deny = {"goto": {"target": "deny"}}
    plan.add_rule("guard", [_match(skuid, {"range": [0, 4294967294]}), goto_deny], required=True)
    established = _match({"ct": {"key": "state"}}, ["established", "related"], op="in")
    plan.add_rule("guard", [established, {"accept": None}])
    plan.add_rule("guard", [goto_deny], required=True)
    _hook(plan, ruleset, "output", "guard")
    if ruleset.containers == Containers.DENY:
        # Forwarded traffic has no local socket owner: nothing is allowed.
        plan.add_chain("fwd_guard")
        if log is not None:
            plan.add_rule("fwd_guard", log)
        for expr in _deny_exprs(ruleset):
            plan.add_rule("fwd_guard", expr, required=True)
        _hook(plan, ruleset, "forward", "fwd_guard")
    return plan


def render_backstop(
    ruleset: RuleSet, group_members: Mapping[int, Sequence[int]], cgroup_offset: int = 0
) -> Plan | None:
    """The backstop table: the same allow and deny, no queue and no log; None in audit mode.

    It needs no daemon, so it outlives one: see :class:`NftablesBackend`.
    Its units chain matters as much as ours: a reject in either table is final.
    """
    if not ruleset.enforcing:
        return None
    plain = replace(ruleset, capture=Capture.NONE)
    return render(
        plain,
        group_members,
        table=BACKSTOP,
        priority=BACKSTOP_PRIORITY,
        cgroup_offset=cgroup_offset,
    )


def _hook(plan: Plan, ruleset: RuleSet, hook: str, target: str) -> None:
    """A base chain on ``hook`` sending traffic to the IMDS addresses into ``target``."""
    plan.add_chain(hook, hook=hook)
    for family in FAMILIES:
        if ruleset.endpoints(family):
            addresses = "@imds_v4" if family == "ipv4" else "@imds_v6"
            jump = {"jump": {"target": target}}
            plan.add_rule(hook, [_match(_daddr(family), addresses), jump], required=True)


def preview(ruleset: RuleSet, cgroup_offset: int = 0) -> list[str]:
    """Our table's batch, one JSON command per line, under a heading.

    What :meth:`NftablesBackend.preview` and ``check-config --rules`` print;
    groups are expanded with this host's passwd and group databases.
    """
    plan = render(ruleset, expand_groups(ruleset.allow_gids), cgroup_offset=cgroup_offset)
    return ["# nftables batch (nft -j), groups expanded with this host's /etc/group", *plan.lines()]
