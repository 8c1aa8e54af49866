"""The native nftables backend: one table of our own, changed in one transaction.

Layout (``nft list table inet imdsguard``)::

    table inet imdsguard {
        set allow_uids { type uid; elements = { 0, 1001 } }   # users + expanded groups
        set imds_v4 { type ipv4_addr; elements = { 169.254.169.254 } }
        set imds_v6 { type ipv6_addr; elements = { fd00:ec2::254 } }
        chain output {
            type filter hook output priority -10; policy accept;
            ip daddr @imds_v4 jump guard
            ip6 daddr @imds_v6 jump guard
        }
        chain deny {
            meta l4proto tcp reject with tcp reset
            reject
        }
        chain units {            # allow.units: one rule per running unit
            socket cgroupv2 level 2 "system.slice/amazon-ssm-agent.service" accept
        }
        chain guard {
            meta skuid @allow_uids accept
            jump units               # only with allow.units
            meta skuid 0-4294967294 goto deny
            ct state established,related accept
            goto deny
        }
        chain forward {          # containers: deny
            type filter hook forward priority -10; policy accept;
            ip daddr @imds_v4 jump fwd_guard
            ip6 daddr @imds_v6 jump fwd_guard
        }
        chain fwd_guard { ... }  # the rules of deny: nothing forwarded is allowed
    }

With capture ``queue``, the deny rules are preceded by a ``queue`` to the
daemon and apply to packets back from it (their connection flagged in its
conntrack mark: no packet mark decides anything), as in
:mod:`imdsguard.firewall.iptables`. With capture ``log`` (a kernel without
nft_queue) a ``log group`` rule copies each packet to the daemon first and
the deny is immediate.

Why this is safe next to other firewalls: an ``accept`` in another table (or
an iptables-nft rule) only ends *that* table's evaluation; our table still
sees the packet and our ``reject``/``drop`` is final. So no other tool can
open IMDS by accepting early, and our own ``accept`` opens nothing the
host's rules close.

``meta skuid``/``skgid`` can only match a socket's uid and *primary* gid, so
allowed groups are expanded to their member uids (primary and
supplementary) every time the rules are rendered; the daemon re-checks
regularly, so an edit of /etc/passwd or /etc/group is picked up.

Every change is one ``nft -j -f -`` batch (add table; delete table; add
everything) which the kernel applies atomically. The one exception is the
``units`` chain: nft's JSON parser (1.0.6, Debian 12) does not know
``socket cgroupv2``, so its rules are loaded in nft's own syntax, as a
second transaction (flush the chain, add its rules) that also runs alone
when only a unit's cgroup changed. Right after a whole-table replacement
the chain is empty for that second transaction's duration: the units'
processes are denied meanwhile, nothing else is opened. Each rule carries a comment
with a hash of its expression, so drift is found by comparing comments, set
elements and chain hooks with what the policy renders.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import importlib
import json
import os
import pwd
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from imdsguard import cgroups
from imdsguard.domain import Action, BackendName, Capture, Containers
from imdsguard.errors import FirewallError, ImdsGuardError, PermissionDeniedError
from imdsguard.firewall.base import Backend, Capabilities, FamilyState, Inspection
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
#: How long the daemon's apply may act on the listing its inspect just made.
REUSE = 0.1
_NETLINK_NETFILTER = 12
_NFNLGRP_NFTABLES = 7
_SOL_NETLINK = 270
_NETLINK_ADD_MEMBERSHIP = 1
#: The chain of ``allow.units`` rules (loaded in nft syntax, see the module docstring).
UNITS = "units"
_PROBE_TABLE = "imdsguard_cgprobe"

Cmd = dict[str, Any]
#: What to write (our table, the backstop, the tables wanted) and what was listed.
_State = tuple["Plan", "Plan | None", list[str], dict[str, "list[dict[str, Any]] | None"]]


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


def compare(
    listing: list[dict[str, Any]],
    plan: Plan,
    ruleset: RuleSet,
) -> dict[str, Inspection]:
    """Compare ``nft -j list table`` output with ``plan``, per family."""
    objects = [o for o in listing if "metainfo" not in o]
    if not any("table" in o for o in objects):
        return {
            f: Inspection(f, FamilyState.MISSING, (f"table {FAMILY} {plan.table} does not exist",))
            if ruleset.endpoints(f)
            else Inspection(f, FamilyState.DISABLED, ("no endpoint configured",))
            for f in FAMILIES
        }
    sets = {o["set"]["name"]: o["set"] for o in objects if "set" in o}
    chains = {o["chain"]["name"]: o["chain"] for o in objects if "chain" in o}
    rules: dict[str, list[str]] = {}
    for obj in objects:
        if "rule" in obj:
            rules.setdefault(obj["rule"]["chain"], []).append(obj["rule"].get("comment", ""))
    missing: list[str] = []
    drift: list[str] = []
    for name, (_, elements) in plan.sets.items():
        have = sets.get(name)
        if have is None:
            missing.append(f"set {name} does not exist")
            continue
        found, wanted = set(map(str, _elements(have))), set(map(str, elements))
        if found == wanted:
            continue
        # Fewer IMDS addresses: traffic to the others skips us. More allowed uids:
        # users the policy denies get through. Either way we cannot vouch for it.
        opened = wanted - found if name.startswith("imds_") else found - wanted
        if opened and ruleset.enforcing:
            what = "lacks" if name.startswith("imds_") else "also admits"
            missing.append(f"set {name} {what} {', '.join(sorted(opened))}")
        else:
            drift.append(f"set {name} differs from the policy")
    for name, hooks in plan.chains.items():
        have_chain = chains.get(name)
        if have_chain is None:
            missing.append(f"chain {name} does not exist")
            continue
        if {k: have_chain.get(k) for k in hooks} != hooks:
            drift.append(f"chain {name} is hooked differently ({have_chain.get('prio')})")
        have_rules = rules.get(name, [])
        absent = [c for c in plan.required[name] if c not in have_rules]
        if absent:
            missing.append(f"chain {name} lacks {len(absent)} of our rules (flushed or edited)")
        elif have_rules != plan.rules[name]:
            foreign = [c for c in have_rules if c not in plan.rules[name]]
            if ruleset.enforcing and name == UNITS and foreign:
                missing.append(f"chain {name} has a rule we did not write: it can admit IMDS")
            elif ruleset.enforcing and _foreign_first(have_rules, plan, name):
                missing.append(
                    f"chain {name} has a rule we did not write before our deny: "
                    "it can admit IMDS traffic"
                )
            else:
                drift.append(f"chain {name} differs from the policy")
    for name in chains:
        if name not in plan.chains:
            drift.append(f"stale chain {name}")
    result = {}
    for family in FAMILIES:
        if not ruleset.endpoints(family):
            result[family] = Inspection(family, FamilyState.DISABLED, ("no endpoint configured",))
        elif missing:
            result[family] = Inspection(family, FamilyState.MISSING, tuple(missing + drift))
        elif drift:
            result[family] = Inspection(family, FamilyState.DRIFTED, tuple(drift))
        else:
            result[family] = Inspection(family, FamilyState.OK)
    return result


def _foreign_first(have: list[str], plan: Plan, chain: str) -> bool:
    """True when a rule that is not ours comes before the last of our required rules."""
    ours, required = set(plan.rules[chain]), plan.required[chain]
    last = max((have.index(c) for c in required if c in have), default=0)
    return any(comment not in ours for comment in have[:last])


def _elements(nft_set: dict[str, Any]) -> list[Any]:
    out = []
    for elem in nft_set.get("elem", []):
        # Single values come back as they are; some types come back wrapped.
        out.append(elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem)
    return out


def combine(
    ruleset: RuleSet, found: Mapping[str, dict[str, Inspection] | None], wanted: Sequence[str]
) -> dict[str, Inspection]:
    """One state per family from each table's comparison (``None``: the table is absent).

    A reject in any table is final, so a family is denied while either table
    denies it: ``ok`` when every wanted table matches the policy and no other
    of ours is there, ``drifted`` while at least one of them still governs
    the traffic (the daemon repairs the rest), ``missing`` when none does.
    A table of ours that is present but not wanted (the backstop in audit
    mode, a daemon's table left by an older imdsguard) is drift.
    """
    result = {}
    for family in FAMILIES:
        if not ruleset.endpoints(family):
            result[family] = Inspection(family, FamilyState.DISABLED, ("no endpoint configured",))
            continue
        states: list[FamilyState] = []
        problems: list[str] = []
        for table, inspections in found.items():
            if table not in wanted and inspections is None:
                continue
            if inspections is None:
                states.append(FamilyState.MISSING)
                problems.append(f"table {FAMILY} {table} does not exist")
                continue
            got = inspections[family]
            state = got.state
            extra = list(got.problems)
            if table not in wanted:
                state = FamilyState.DRIFTED if got.effective else state
                extra.insert(0, f"table {FAMILY} {table} is not wanted now")
            states.append(state)
            problems += [f"{table}: {p}" for p in extra]
        if all(s == FamilyState.OK for s in states):
            result[family] = Inspection(family, FamilyState.OK)
        elif any(s in (FamilyState.OK, FamilyState.DRIFTED) for s in states):
            result[family] = Inspection(family, FamilyState.DRIFTED, tuple(problems))
        else:
            result[family] = Inspection(family, FamilyState.MISSING, tuple(problems))
    return result


def load_binding() -> Any:
    """A new libnftables context (python3-nftables); FirewallError when it is missing."""
    try:
        module = importlib.import_module("nftables")
    except ImportError:
        raise FirewallError(
            "the nftables backend needs libnftables' Python binding: install python3-nftables "
            "(Debian/Ubuntu, Amazon Linux 2023, RHEL 9), or set firewall.backend: iptables"
        ) from None
    try:
        return module.Nftables()
    except OSError as exc:  # libnftables.so.1 itself is missing
        raise FirewallError(f"libnftables cannot be loaded ({exc}): install nftables") from None


class Context:
    """One libnftables context: one netlink socket, open as long as this object lives.

    Tables created with ``flags owner`` through a context belong to its socket:
    the kernel lets nobody else change or delete them and destroys them when
    the socket closes (when this object is freed or the process exits).
    """

    def __init__(self) -> None:
        self._nft = load_binding()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)

    def _failed(self, what: str, error: str) -> ImdsGuardError:
        lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
        text = next((ln for ln in lines if "Error:" in ln), lines[0] if lines else "failed")
        text = text.split("Error:", 1)[-1].strip()
        if "Operation not permitted" in error:
            if os.geteuid() != 0:
                return PermissionDeniedError(
                    f"nftables {what}: the firewall needs root (CAP_NET_ADMIN): {text}"
                )
            return FirewallError(
                f"nftables {what}: {text} (the table is owned by another process: "
                "a running imdsguard daemon holds it)"
            )
        return FirewallError(f"nftables {what} failed: {text}")

    def check(self, commands: list[Cmd], what: str) -> None:
        """Let the kernel validate ``commands`` without committing them (``nft -c``)."""
        self._nft.set_dry_run(True)
        try:
            self.json(commands, what)
        finally:
            self._nft.set_dry_run(False)

    def json(self, commands: list[Cmd], what: str) -> None:
        """Run ``commands`` as one transaction."""
        rc, _out, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise self._failed(what, err)

    def text(self, command: str, what: str) -> None:
        """Run nft syntax (for what JSON cannot say in nft 1.0.6: table flags)."""
        rc, _out, err = self._nft.cmd(command)
        if rc != 0:
            raise self._failed(what, err)

    def table(self, name: str) -> list[dict[str, Any]] | None:
        """``list table inet NAME`` as JSON objects; None when the table does not exist."""
        rc, out, err = self._nft.json_cmd(
            {"nftables": [{"list": {"table": {"family": FAMILY, "name": name}}}]}
        )
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise self._failed(f"list table {name}", err)
        objects: list[dict[str, Any]] = (out or {}).get("nftables", [])
        return [o for o in objects if "metainfo" not in o]


class NftablesBackend(Backend):
    """nftables implementation of :class:`~imdsguard.firewall.base.Backend`.

    Two tables (see the README's "What a firewall reload does"):

    - ``inet imdsguard``: the daemon's, with the queue or log for the
      capture. Created ``flags owner`` through a context the daemon keeps
      open (``hold=True``), so no other process can flush, edit or delete it
      (``nft flush ruleset`` skips it; its edits get EPERM) and it goes
      with the daemon.
    - ``inet imdsguard_backstop``: the same allow and deny without queue, owned
      by nobody, so it stays when the daemon is gone (kill -9, stop, upgrade).
      Hooked after our own table, so attribution sees denied packets first.
      A reload's ``flush ruleset`` removes it; the daemon puts it back while
      its owned table keeps IMDS closed.

    Without a daemon (one-shot ``apply``) only the backstop is written: it
    is all that would survive the command's exit. ``daemon_running``: a
    daemon holds ``inet imdsguard``, so inspect expects it and leaves it be.
    """

    name = BackendName.NFTABLES

    def __init__(self, hold: bool = False, daemon_running: bool = False) -> None:
        self._reader = Context()  # listings: never the owner's socket (see README)
        self._owner = Context() if hold else None
        self._expect_main = hold or daemon_running
        self._owns_main = False  # our owner context created the table now in the kernel
        self._queue_supported: bool | None = None
        self._cgroup_offset: int | None = None
        self.owner_problem: str | None = None
        self._last: tuple[RuleSet, float, _State] | None = None  # the last inspection's

    def capabilities(self) -> Capabilities:
        """Queue where the kernel has nft_queue, else log; nftables announces changes."""
        capture = Capture.QUEUE if self._can_queue() else Capture.LOG
        return Capabilities(capture=capture, notifications=True)

    def _can_queue(self) -> bool:
        """True when the kernel has nft_queue (CONFIG_NFT_QUEUE), checked without changes."""
        if self._queue_supported is None:
            probe = "imdsguard_probe"
            commands: list[Cmd] = [
                {"add": {"table": {"family": FAMILY, "name": probe}}},
                {"add": {"chain": {"family": FAMILY, "table": probe, "name": "c"}}},
                {
                    "add": {
                        "rule": {
                            "family": FAMILY,
                            "table": probe,
                            "chain": "c",
                            "expr": [{"queue": {"num": 1}}],
                        }
                    }
                },
            ]
            try:
                # Through the listing context (no new socket: a probe context
                # freed only by a later garbage collection kept its fd open).
                self._reader.check(commands, "queue probe")
                self._queue_supported = True
            except PermissionDeniedError:
                raise
            except FirewallError:
                self._queue_supported = False
        return self._queue_supported

    def cgroup_offset(self) -> int:
        """How many levels below the kernel's cgroup root our ``/sys/fs/cgroup`` starts.

        0 in the initial cgroup namespace. In another one (a container:
        systemd-nspawn puts its payload in ``/payload``) ``socket cgroupv2
        level`` still counts from the real root, which no file inside
        tells. So it is measured, once: a throw-away table counts one UDP
        datagram of ours to 127.0.0.1 against our own cgroup at each
        candidate level, and the level that matched gives the offset.
        """
        if self._cgroup_offset is None:
            self._cgroup_offset = 0
            if not cgroups.own_cgroup_ns_is_initial():
                self._cgroup_offset = self._probe_cgroup_offset()
        return self._cgroup_offset

    def _probe_cgroup_offset(self, tries: int = 8) -> int:
        own = cgroups.own_path()
        if not own:
            raise FirewallError(
                "cannot match units in this cgroup namespace: the daemon runs at its root, "
                "so the depth of the namespace cannot be measured (run it as a service)"
            )
        depth = cgroups.level(own)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            table = f"{FAMILY} {_PROBE_TABLE}"
            lines = [
                f"add table {table}",
                f"add chain {table} out {{ type filter hook output priority {PRIORITY}; }}",
            ]
            lines += [
                f'add rule {table} out udp dport {port} socket cgroupv2 level {depth + k} "{own}" '
                "counter"
                for k in range(tries)
            ]
            self._reader.text("\n".join(lines) + "\n", "cgroup namespace probe")
            try:
                with contextlib.suppress(OSError):  # IPAddressDeny= may refuse it after our hook
                    sock.sendto(b"imdsguard cgroup probe", ("127.0.0.1", port))
                listing = self._reader.table(_PROBE_TABLE) or []
            finally:
                self._reader.json([_delete_table(_PROBE_TABLE)], "delete the probe table")
        counts = [
            next((e["counter"]["packets"] for e in o["rule"]["expr"] if "counter" in e), 0)
            for o in listing
            if "rule" in o
        ]
        matched = [k for k, n in enumerate(counts) if n]
        if len(matched) != 1:
            raise FirewallError(
                f"cannot measure this cgroup namespace's depth (matches at {matched}): "
                "allow.units cannot be enforced here"
            )
        return matched[0]

    def plan(self, ruleset: RuleSet) -> Plan:
        """Our own table for ``ruleset``, rendered with the current group membership."""
        return self._wanted(ruleset)[0]

    def _wanted(
        self, ruleset: RuleSet, loading: bool = False
    ) -> tuple[Plan, Plan | None, list[str]]:
        """The plans; ``loading``: they go into the kernel, so the cgroup namespace's
        depth is measured if not known yet (inspection compares without it)."""
        members = expand_groups(ruleset.allow_gids)
        offset = 0
        if ruleset.allow_cgroups:
            offset = self.cgroup_offset() if loading else (self._cgroup_offset or 0)
        main = render(ruleset, members, cgroup_offset=offset)
        backstop = render_backstop(ruleset, members, cgroup_offset=offset)
        wanted = ([TABLE] if self._expect_main else []) + ([BACKSTOP] if backstop else [])
        return main, backstop, wanted

    def _state(self, ruleset: RuleSet, reuse: bool = False, loading: bool = False) -> _State:
        last = self._last
        # A plan rendered before the cgroup namespace's depth was measured is not loaded.
        unmeasured = loading and bool(ruleset.allow_cgroups) and self._cgroup_offset is None
        fresh = last is not None and last[0] == ruleset and time.monotonic() - last[1] < REUSE
        if reuse and fresh and not unmeasured and last is not None:
            return last[2]
        main, backstop, wanted = self._wanted(ruleset, loading)
        listings = {TABLE: self._reader.table(TABLE), BACKSTOP: self._reader.table(BACKSTOP)}
        state = main, backstop, wanted, listings
        self._last = (ruleset, time.monotonic(), state)
        return state

    @staticmethod
    def _compare(
        ruleset: RuleSet, plans: Mapping[str, Plan | None], listings: Mapping[str, Any]
    ) -> dict[str, dict[str, Inspection] | None]:
        found: dict[str, dict[str, Inspection] | None] = {}
        for table, listing in listings.items():
            plan = plans[table]
            if listing is None:
                found[table] = None
            elif plan is None:  # present but nothing of it is wanted: audit-mode backstop
                found[table] = {
                    f: Inspection(f, FamilyState.DRIFTED, ("it denies in audit mode",))
                    for f in FAMILIES
                }
            else:
                found[table] = compare(listing, plan, ruleset)
        return found

    # -- the Backend interface

    def inspect(self, ruleset: RuleSet) -> dict[str, Inspection]:
        """See :meth:`imdsguard.firewall.base.Backend.inspect`."""
        main, backstop, wanted, listings = self._state(ruleset)
        found = self._compare(ruleset, {TABLE: main, BACKSTOP: backstop}, listings)
        return combine(ruleset, found, wanted)

    def apply(self, ruleset: RuleSet) -> bool:
        """See :meth:`imdsguard.firewall.base.Backend.apply`."""
        # The daemon applies right after an inspect that found something wrong:
        # its listing is reused (a change since then notifies the daemon again).
        main, backstop, wanted, listings = self._state(
            ruleset, reuse=self._owner is not None, loading=True
        )
        self._last = None  # whatever is written below, the next look lists afresh
        found = self._compare(ruleset, {TABLE: main, BACKSTOP: backstop}, listings)

        def fine(table: str) -> bool:
            got = found[table]
            if table not in wanted:
                return got is None
            return got is not None and all(
                i.state in (FamilyState.OK, FamilyState.DISABLED) for i in got.values()
            )

        changed = False
        writer = self._owner or self._reader
        if not fine(BACKSTOP):  # first: it covers the gap if our table must be re-created
            if backstop is not None:
                writer.json(backstop.batch()["nftables"], "replace the backstop table")
                _load_units(writer, backstop)
            else:
                writer.json([_delete_table(BACKSTOP)], "delete the backstop table")
            changed = True
        if fine(TABLE):
            return changed
        if self._owner is None:
            if listings[TABLE] is not None and not self._expect_main:
                # Left by an older imdsguard, or by a daemon on a kernel without owned tables.
                self._reader.json([_delete_table(TABLE)], f"delete table {FAMILY} {TABLE}")
                changed = True
            return changed
        current = listings[TABLE]
        if self._owns_main and current is not None:
            self._owner.json(main.replace_in_place(current), "replace our table")
            _load_units(self._owner, main)
            return True
        self._create_owned(self._owner, listings[TABLE] is not None)
        self._owner.json(main.commands, "fill our table")
        _load_units(self._owner, main)
        return True

    def _create_owned(self, owner: Context, exists: bool) -> None:
        """An empty ``inet imdsguard`` owned by ``owner`` (the backstop denies meanwhile)."""
        delete = f"delete table {FAMILY} {TABLE}\n" if exists else ""
        try:
            owner.text(f"{delete}add table {FAMILY} {TABLE} {{ flags owner; }}", "own table")
            self._owns_main = True
            self.owner_problem = None
            return
        except PermissionDeniedError:
            raise
        except FirewallError as exc:
            if "Operation not permitted" in str(exc) or "owned by another" in str(exc):
                raise
            # Kernel < 5.12 (or an nft without the flag): an ordinary table.
            self.owner_problem = (
                f"the kernel refused an owned table ({exc}): a `flush ruleset` by another "
                "process removes our rules until the daemon repairs them (kernel >= 5.12 needed)"
            )
        owner.json(
            [{"add": {"table": {"family": FAMILY, "name": TABLE}}}, _delete_table(TABLE),
             {"add": {"table": {"family": FAMILY, "name": TABLE}}}],
            "create our table",
        )  # fmt: skip
        self._owns_main = True

    def preview(self, ruleset: RuleSet) -> list[str]:
        """See :meth:`imdsguard.firewall.base.Backend.preview` (one JSON command per line)."""
        return self.plan(ruleset).lines()

    def limits(self) -> tuple[str, ...]:
        """What this backend cannot guard against here (for ``status``)."""
        return (self.owner_problem,) if self.owner_problem else ()

    def remove(self) -> bool:
        """See :meth:`imdsguard.firewall.base.Backend.remove`."""
        writer = self._owner or self._reader
        changed = False
        if self._reader.table(BACKSTOP) is not None:
            writer.json([_delete_table(BACKSTOP)], "delete the backstop table")
            changed = True
        if self._reader.table(TABLE) is not None and self._expect_main and self._owner is None:
            # A running daemon's: the kernel lets no other process delete it (EPERM),
            # and it goes when the daemon stops.
            return changed
        if self._reader.table(TABLE) is not None:
            try:
                writer.json([_delete_table(TABLE)], f"delete table {FAMILY} {TABLE}")
            except PermissionDeniedError:
                raise
            except FirewallError as exc:
                if "owned by another" not in str(exc):
                    raise
                raise FirewallError(
                    f"table {FAMILY} {TABLE} belongs to the running imdsguard daemon and the "
                    "kernel lets no other process delete it; it goes when the daemon stops "
                    "(systemctl stop imdsguard)"
                ) from None
            self._owns_main = False
            changed = True
        return changed

    def present(self) -> tuple[str, ...]:
        """The families our tables hold rules for (``inet`` tables: both, if one exists)."""
        held = any(self._reader.table(name) is not None for name in (TABLE, BACKSTOP))
        return FAMILIES if held else ()

    def close(self) -> None:
        """Nothing to release early: the libnftables contexts go with this object.

        The owner context's socket *is* our table's life (the kernel destroys an
        owned table when it closes), so it is never closed before the daemon exits.
        """

    def watch(self) -> socket.socket:
        """A netlink socket that becomes readable whenever any nftables object changes."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             _NETLINK_NETFILTER)  # fmt: skip
        sock.bind((0, 0))
        sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, _NFNLGRP_NFTABLES)
        sock.setblocking(False)
        return sock


def _load_units(writer: Context, plan: Plan) -> None:
    """The units chain's rules, right after the JSON that (re)created the chain empty.

    A separate transaction (nft syntax: 1.0.6's JSON parser lacks ``socket
    cgroupv2``): until it lands, the units' processes are denied, nothing
    else changes. A unit's cgroup gone meanwhile fails it; the daemon looks
    the units up again and retries.
    """
    if UNITS in plan.chains:
        writer.text(plan.units_script(), f"load the units rules of {plan.table}")


def _delete_table(name: str) -> Cmd:
    return {"delete": {"table": {"family": FAMILY, "name": name}}}
