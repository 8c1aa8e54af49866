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
        chain guard {
            meta skuid @allow_uids accept
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

With capture on (``queue_num`` set), the deny rules are preceded by a
``queue`` to the daemon and apply to packets back from it (their connection
flagged in its conntrack mark: no packet mark decides anything), as in
:mod:`imdsguard.firewall.iptables`.

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
everything) which the kernel applies atomically. Each rule carries a comment
with a hash of its expression, so drift is found by comparing comments, set
elements and chain hooks with what the policy renders.
"""

from __future__ import annotations

import grp
import hashlib
import json
import pwd
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from imdsguard.errors import FirewallError, PermissionDeniedError
from imdsguard.firewall.base import FamilyState, Inspection
from imdsguard.policy import FAMILIES, MARK_SEEN, RuleSet

TABLE = "imdsguard"
FAMILY = "inet"
# Before the usual filter chains (priority 0), after mangle (-150): other tools'
# marks are set, and a deny here costs nothing downstream.
PRIORITY = -10
_NETLINK_NETFILTER = 12
_NFNLGRP_NFTABLES = 7
_SOL_NETLINK = 270
_NETLINK_ADD_MEMBERSHIP = 1

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
    if ruleset.action == "drop":
        return [[*prefix, {"drop": None}]]
    return [
        [*prefix, _match({"meta": {"key": "l4proto"}}, "tcp"), {"reject": {"type": "tcp reset"}}],
        [*prefix, {"reject": {"type": "icmpx", "expr": "port-unreachable"}}],
    ]


def _deny_exprs(ruleset: RuleSet, hold: bool = True) -> list[list[Cmd]]:
    """What follows the allow rules (same semantics as the iptables backend).

    ``hold``: the kernel can queue (nft_queue). Without it the capture reads
    an NFLOG group instead (see :func:`_log_rule`) and the deny is immediate.
    """
    if ruleset.queue_num is None or not hold:
        return _deny(ruleset) if ruleset.enforcing else []
    flagged = _ct_mark("|", MARK_SEEN)
    if not ruleset.enforcing:
        bypass = {"queue": {"num": ruleset.queue_num, "flags": "bypass"}}
        return [
            [*_seen(), _ct_mark("&", ~MARK_SEEN), _meta_mark_clear(), {"return": None}],
            [_TRACKED, flagged, bypass],
        ]
    queue: Cmd = {"queue": {"num": ruleset.queue_num}}
    # Seen: denied. New: flagged and queued. Untracked (never queued): denied at once.
    return [*_deny(ruleset, _seen()), [_TRACKED, flagged, queue], *_deny(ruleset)]


def _log_rule(ruleset: RuleSet, hold: bool) -> list[Cmd] | None:
    """A copy of each packet for the capture where it cannot be queued (never a verdict)."""
    if ruleset.queue_num is None or hold:
        return None
    return [{"log": {"group": ruleset.queue_num}}]


def _comment(chain: str, expr: list[Cmd]) -> str:
    digest = hashlib.sha256(json.dumps([chain, expr], sort_keys=True).encode()).hexdigest()
    return f"imdsguard:{digest[:16]}"


class Plan:
    """The rendered table: the batch that creates it and what inspection expects."""

    def __init__(self) -> None:
        self.commands: list[Cmd] = []
        self.sets: dict[str, tuple[str, list[Any]]] = {}
        self.chains: dict[str, dict[str, Any]] = {}
        self.rules: dict[str, list[str]] = {}
        self.required: dict[str, list[str]] = {}

    def add_set(self, name: str, kind: str, elements: list[Any]) -> None:
        spec: Cmd = {"family": FAMILY, "table": TABLE, "name": name, "type": kind}
        if elements:
            spec["elem"] = elements
        self.commands.append({"add": {"set": spec}})
        self.sets[name] = (kind, elements)

    def add_chain(self, name: str, hook: str | None = None) -> None:
        spec: Cmd = {"family": FAMILY, "table": TABLE, "name": name}
        if hook:
            spec.update(type="filter", hook=hook, prio=PRIORITY, policy="accept")
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
                        "table": TABLE,
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

    def batch(self) -> dict[str, Any]:
        """Replace our table atomically: add (so delete cannot fail), delete, re-create."""
        table = {"family": FAMILY, "name": TABLE}
        prelude = [
            {"add": {"table": table}},
            {"delete": {"table": table}},
            {"add": {"table": table}},
        ]
        return {"nftables": prelude + self.commands}

    def lines(self) -> list[str]:
        """One JSON command per line (golden tests, ``check-config --rules``)."""
        return [json.dumps(c, sort_keys=True) for c in self.commands]


def render(ruleset: RuleSet, group_members: Mapping[int, Sequence[int]], hold: bool = True) -> Plan:
    """The table for ``ruleset`` (pure: group membership and queue support are passed in)."""
    plan = Plan()
    uids = set(ruleset.allow_uids)
    for gid in ruleset.allow_gids:
        uids.update(group_members.get(gid, ()))
    plan.add_set("allow_uids", "uid", sorted(uids))
    plan.add_set("imds_v4", "ipv4_addr", list(ruleset.endpoints_v4))
    plan.add_set("imds_v6", "ipv6_addr", list(ruleset.endpoints_v6))
    log = _log_rule(ruleset, hold)
    plan.add_chain("deny")  # before guard, whose rules go to it
    if log is not None:
        plan.add_rule("deny", log)
    for expr in _deny_exprs(ruleset, hold):
        plan.add_rule("deny", expr, required=True)
    skuid = {"meta": {"key": "skuid"}}
    plan.add_chain("guard")
    plan.add_rule("guard", [_match(skuid, "@allow_uids"), {"accept": None}])
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
    if ruleset.containers == "deny":
        # Forwarded traffic has no local socket owner: nothing is allowed.
        plan.add_chain("fwd_guard")
        if log is not None:
            plan.add_rule("fwd_guard", log)
        for expr in _deny_exprs(ruleset, hold):
            plan.add_rule("fwd_guard", expr, required=True)
        _hook(plan, ruleset, "forward", "fwd_guard")
    return plan


def _hook(plan: Plan, ruleset: RuleSet, hook: str, target: str) -> None:
    """A base chain on ``hook`` sending traffic to the IMDS addresses into ``target``."""
    plan.add_chain(hook, hook=hook)
    for family in FAMILIES:
        if ruleset.endpoints(family):
            addresses = "@imds_v4" if family == "ipv4" else "@imds_v6"
            jump = {"jump": {"target": target}}
            plan.add_rule(hook, [_match(_daddr(family), addresses), jump], required=True)


def compare(listing: list[dict[str, Any]], plan: Plan, ruleset: RuleSet) -> dict[str, Inspection]:
    """Compare ``nft -j list table`` output with ``plan``, per family."""
    objects = [o for o in listing if "metainfo" not in o]
    if not any("table" in o for o in objects):
        return {
            f: Inspection(f, FamilyState.MISSING, (f"table {FAMILY} {TABLE} does not exist",))
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
            if ruleset.enforcing and _foreign_first(have_rules, plan, name):
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


class NftablesBackend:
    """nftables implementation of :class:`~imdsguard.firewall.base.Backend`."""

    name = "nftables"

    def __init__(self, nft: str | None = None) -> None:
        found = nft or shutil.which("nft") or "/usr/sbin/nft"
        if not shutil.which(found):
            raise FirewallError("the nft command is not installed: install the nftables package")
        self._nft = found
        self._queue_supported: bool | None = None

    # -- running nft

    def _run(self, args: Sequence[str], stdin: str | None = None) -> str:
        proc = subprocess.run(
            [self._nft, *args], input=stdin, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()
            text = err[0] if err else f"exit {proc.returncode}"
            if "Operation not permitted" in proc.stderr:
                raise PermissionDeniedError(
                    f"nft {' '.join(args)}: the firewall needs root (CAP_NET_ADMIN): {text}"
                )
            raise FirewallError(f"nft {' '.join(args)} failed: {text}")
        return proc.stdout

    def _listing(self) -> list[dict[str, Any]]:
        proc = subprocess.run(
            [self._nft, "-j", "list", "table", FAMILY, TABLE],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return []
            if "Operation not permitted" in proc.stderr:
                raise PermissionDeniedError(
                    "cannot read the nftables ruleset: the firewall needs root (CAP_NET_ADMIN)"
                )
            raise FirewallError(f"nft list table failed: {proc.stderr.strip()}")
        data: list[dict[str, Any]] = json.loads(proc.stdout)["nftables"]
        return data

    def supports_queue(self) -> bool:
        """True when the kernel has nft_queue (CONFIG_NFT_QUEUE), checked without changes."""
        if self._queue_supported is None:
            probe = {
                "nftables": [
                    {"add": {"table": {"family": FAMILY, "name": "imdsguard_probe"}}},
                    {"add": {"chain": {"family": FAMILY, "table": "imdsguard_probe", "name": "c"}}},
                    {
                        "add": {
                            "rule": {
                                "family": FAMILY,
                                "table": "imdsguard_probe",
                                "chain": "c",
                                "expr": [{"queue": {"num": 1}}],
                            }
                        }
                    },
                ]
            }
            try:
                self._run(["-c", "-j", "-f", "-"], json.dumps(probe))
                self._queue_supported = True
            except FirewallError:
                self._queue_supported = False
        return self._queue_supported

    def plan(self, ruleset: RuleSet) -> Plan:
        """Render ``ruleset`` with the current group membership."""
        hold = ruleset.queue_num is None or self.supports_queue()
        return render(ruleset, expand_groups(ruleset.allow_gids), hold=hold)

    # -- the Backend interface

    def inspect(self, ruleset: RuleSet) -> dict[str, Inspection]:
        """See :meth:`imdsguard.firewall.base.Backend.inspect`."""
        return compare(self._listing(), self.plan(ruleset), ruleset)

    def apply(self, ruleset: RuleSet) -> bool:
        """See :meth:`imdsguard.firewall.base.Backend.apply`."""
        plan = self.plan(ruleset)
        found = compare(self._listing(), plan, ruleset)
        if all(i.state in (FamilyState.OK, FamilyState.DISABLED) for i in found.values()):
            return False
        self._run(["-j", "-f", "-"], json.dumps(plan.batch()))
        return True

    def remove(self) -> bool:
        """See :meth:`imdsguard.firewall.base.Backend.remove`."""
        if not self._listing():
            return False
        self._run(["delete", "table", FAMILY, TABLE])
        return True

    def present(self) -> tuple[str, ...]:
        """The families our table holds rules for (an ``inet`` table: both, if it exists)."""
        return FAMILIES if self._listing() else ()

    def close(self) -> None:
        """Nothing stays open between ``nft`` runs."""

    def watch(self) -> socket.socket:
        """A netlink socket that becomes readable whenever any nftables object changes."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             _NETLINK_NETFILTER)  # fmt: skip
        sock.bind((0, 0))
        sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, _NFNLGRP_NFTABLES)
        sock.setblocking(False)
        return sock
