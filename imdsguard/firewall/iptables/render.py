"""x_tables rules as data: what a :class:`~imdsguard.policy.RuleSet` asks for, per family (pure).

See :mod:`imdsguard.firewall.iptables` for the layout.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from imdsguard.domain import Action, Capture, Containers
from imdsguard.policy import MARK_SEEN, QUEUE_NUM, RuleSet

CHAIN = "IMDSGUARD"
AUDITED = "IMDSGUARD-AUDITED"
FORWARDED = "IMDSGUARD-FWD"
OUR_CHAINS = (CHAIN, AUDITED, FORWARDED)
#: Built-in chains we hook into, and the chain of ours each one jumps to.
HOOKS = {"OUTPUT": CHAIN, "FORWARD": FORWARDED}
#: Docker's chain for the host's own rules: Docker evaluates it before its own
#: (and puts its jump back on top of FORWARD each time it starts), so our forward
#: jumps also go first in it when it exists. Docker owns the chain; we never
#: create or delete it.
DOCKER_USER = "DOCKER-USER"
Params = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class XtRule:
    """One x_tables rule in a normal form that both rendering and reading produce."""

    chain: str
    target: str
    dst: str | None = None
    protocol: str | None = None
    matches: tuple[tuple[str, Params], ...] = ()
    target_params: Params = ()
    goto: bool = False  # "-g": a RETURN in the target chain goes back to *our* caller

    def save(self) -> str:
        """The rule as ``iptables-save`` would print it."""
        parts = [f"-A {self.chain}"]
        if self.dst:
            parts.append(f"-d {self.dst}")
        if self.protocol:
            parts.append(f"-p {self.protocol}")
        for name, params in self.matches:
            parts.append(f"-m {name}")
            parts.extend(_params_text(params))
        parts.append(f"{'-g' if self.goto else '-j'} {self.target}")
        parts.extend(_params_text(self.target_params))
        return " ".join(parts)


def _params_text(params: Params) -> list[str]:
    # An inverted parameter reads back as "! value"; iptables-save puts the "!" first.
    return [f"! --{k} {v[2:]}" if v.startswith("! ") else f"--{k} {v}".rstrip() for k, v in params]


def _reject_icmp(family: str) -> str:
    return "icmp-port-unreachable" if family == "ipv4" else "icmp6-port-unreachable"


def _host(addr: str) -> str:
    return f"{addr}/32" if ipaddress.ip_address(addr).version == 4 else f"{addr}/128"


@dataclass(frozen=True)
class Rendered:
    """Our rules for one family: the jumps (OUTPUT, FORWARD) and each chain of ours."""

    jumps: list[XtRule]
    chains: dict[str, list[XtRule]]

    def lines(self) -> list[str]:
        """``iptables-save`` lines (used by golden tests and ``check-config``)."""
        out = [f"-N {name}" for name in self.chains]
        out += [r.save() for r in self.jumps]
        for rules in self.chains.values():
            out += [r.save() for r in rules]
        return out


#: The last packets of an allowed connection: once its process has closed the
#: socket (FIN and ACK from an orphaned socket, TIME_WAIT's ACK from the kernel's
#: own socket) no process owns them, so no owner rule matches. A connection is
#: established only if its SYN got through, so letting an established
#: connection's owner-less packets pass opens nothing; without this every
#: allowed connection ended in a reset and a "blocked" event for its user.
#: ``! --uid-owner 0-4294967294`` matches exactly the packets without an owning
#: file; live sockets are judged by the owner rules above and the deny below.
TEARDOWN = XtRule(
    CHAIN,
    "RETURN",
    matches=(
        ("owner", (("uid-owner", "! 0-4294967294"),)),
        ("conntrack", (("ctstate", "RELATED,ESTABLISHED"),)),
    ),
)


def render(ruleset: RuleSet, family: str) -> Rendered:
    """What ``ruleset`` asks for in ``family``."""
    jumps = [XtRule("OUTPUT", CHAIN, dst=_host(ep)) for ep in ruleset.endpoints(family)]
    rules = [
        XtRule(CHAIN, "RETURN", matches=(("owner", (("uid-owner", str(uid)),)),))
        for uid in ruleset.allow_uids
    ]
    rules += [
        XtRule(
            CHAIN,
            "RETURN",
            matches=(("owner", (("gid-owner", str(gid)), ("suppl-groups", ""))),),
        )
        for gid in ruleset.allow_gids
    ]
    rules += [_unit_rule(unit, path, inode) for unit, path, inode in ruleset.allow_cgroups]
    rules.append(TEARDOWN)
    rules += _deny_rules(ruleset, family)
    chains = {CHAIN: rules}
    if not ruleset.enforcing and ruleset.capture == Capture.QUEUE:
        chains[AUDITED] = _audited_rules()
    if ruleset.containers == Containers.DENY:
        # Forwarded (container) traffic has no local owner: nothing is allowed.
        jumps += [XtRule("FORWARD", FORWARDED, dst=_host(ep)) for ep in ruleset.endpoints(family)]
        chains[FORWARDED] = _deny_rules(ruleset, family, FORWARDED)
    return Rendered(jumps, chains)


#: What xt_comment holds (XT_MAX_COMMENT_LEN 256, with its NUL); a unit name may have 255.
_MAX_COMMENT = 255


def _unit_rule(unit: str, path: str, inode: int) -> XtRule:
    """A running unit's sockets pass (xt_cgroup revision 1+, cgroup v2 path; Linux 4.5).

    The kernel looks ``path`` up when the table is loaded and holds that
    cgroup; the comment carries its inode, so a unit restarted into a new
    cgroup renders a different rule, which the daemon then loads. A name
    too long for the comment is cut there, the inode kept whole
    (libxtables refuses a longer ``--comment``, and the apply with it).
    """
    tail = f" cgroup {inode}"
    name = unit[: _MAX_COMMENT - len("imdsguard unit ") - len(tail)]
    return XtRule(
        CHAIN,
        "RETURN",
        matches=(
            ("cgroup", (("path", path),)),
            ("comment", (("comment", f"imdsguard unit {name}{tail}"),)),
        ),
    )


def _deny(ruleset: RuleSet, family: str, mark: bool, chain: str = CHAIN) -> list[XtRule]:
    seen = _seen_match() if mark else ()
    if ruleset.action == Action.DROP:
        return [XtRule(chain, "DROP", matches=seen)]
    # A TCP reset makes connect() fail at once; anything else gets ICMP. The explicit
    # "-m tcp" is what iptables adds itself, and python-iptables corrupts memory
    # building a "-p tcp" rule without it after an owner-match rule.
    return [
        XtRule(
            chain,
            "REJECT",
            protocol="tcp",
            matches=(("tcp", ()), *seen),
            target_params=(("reject-with", "tcp-reset"),),
        ),
        XtRule(
            chain, "REJECT", matches=seen, target_params=(("reject-with", _reject_icmp(family)),)
        ),
    ]


#: Packets that conntrack tracks: only their conntrack entry can carry MARK_SEEN,
#: so only they are queued (an untracked one would come back unmarked, forever).
_TRACKED = (("conntrack", (("ctstate", "NEW,RELATED,ESTABLISHED"),)),)


def _deny_rules(ruleset: RuleSet, family: str, chain: str = CHAIN) -> list[XtRule]:
    """Everything after the allow rules.

    Without capture ``queue``: the deny (enforce) or nothing (audit).

    With it: a tracked packet not seen yet gets MARK_SEEN in its
    connection's conntrack mark (which no socket can set) and goes to the
    queue; the daemon attributes it and repeats it (NF_REPEAT, with the bit
    added to the packet's own mark), so it comes back seen and is denied
    (enforce) or has the bits cleared and RETURNs (audit). Untracked packets
    (a host NOTRACK rule) cannot carry the bit: denied at once (enforce),
    passed (audit). The enforce queue has no ``--queue-bypass`` (which would
    ACCEPT when nobody listens): if the daemon dies, queued packets are
    dropped, so the host stays closed, and a clean stop swaps in the
    queue-less rules first. In audit mode ``--queue-bypass`` is right, since
    audit must never block.
    """
    if ruleset.capture != Capture.QUEUE:  # iptables never offers log (see capabilities)
        return _deny(ruleset, family, False, chain) if ruleset.enforcing else []
    params: Params = (("queue-num", str(QUEUE_NUM)),)
    flag = XtRule(chain, "CONNMARK", matches=_TRACKED, target_params=_set_seen(MARK_SEEN))
    if not ruleset.enforcing:
        return [
            # goto, not jump: AUDITED's RETURN must leave our chain (back to OUTPUT or
            # FORWARD), not fall through to the NFQUEUE rule and queue the packet again.
            XtRule(chain, AUDITED, matches=_seen_match(), goto=True),
            flag,
            XtRule(
                chain, "NFQUEUE", matches=_TRACKED, target_params=(*params, ("queue-bypass", ""))
            ),
        ]
    return [
        *_deny(ruleset, family, True, chain),
        flag,
        XtRule(chain, "NFQUEUE", matches=_TRACKED, target_params=params),
        *_deny(ruleset, family, False, chain),
    ]


def _set_seen(value: int) -> Params:
    return (("set-xmark", f"{value:#x}/{MARK_SEEN:#x}"),)


def _seen_match() -> tuple[tuple[str, Params], ...]:
    """Back from the queue: our bit in the conntrack mark and the packet's (see MARK_SEEN)."""
    bit = f"{MARK_SEEN:#x}/{MARK_SEEN:#x}"
    return (("connmark", (("mark", bit),)), ("mark", (("mark", bit),)))


def _audited_rules() -> list[XtRule]:
    """The audit-mode sub-chain: clear our bit (connection and packet), back to OUTPUT."""
    return [
        XtRule(AUDITED, "CONNMARK", target_params=_set_seen(0)),
        XtRule(AUDITED, "MARK", target_params=_set_seen(0)),
        XtRule(AUDITED, "RETURN"),
    ]


def required_rules(ruleset: RuleSet, family: str, chain: str) -> list[XtRule]:
    """The rules without which ``chain`` does not deny at all."""
    if not ruleset.enforcing or chain not in (CHAIN, FORWARDED):
        return []
    return _deny_rules(ruleset, family, chain)


def canonical(rule: XtRule) -> XtRule:
    return XtRule(
        chain=rule.chain,
        target=rule.target,
        dst=rule.dst,
        protocol=rule.protocol,
        matches=tuple((name, tuple(sorted(p))) for name, p in rule.matches),
        target_params=tuple(sorted(rule.target_params)),
        goto=rule.goto,
    )


def hook_jumps(wanted: Rendered, hook: str) -> list[XtRule]:
    """Our jumps at the top of ``hook`` (DOCKER-USER gets the FORWARD ones)."""
    source = "FORWARD" if hook == DOCKER_USER else hook
    return [replace(j, chain=hook) for j in wanted.jumps if j.chain == source]


def preview(ruleset: RuleSet) -> list[str]:
    """``iptables-save`` lines of every family with an endpoint, each under a heading.

    What :meth:`IptablesBackend.preview` and ``check-config --rules`` print.
    (``render`` takes a family where nftables' takes group members: x_tables
    has a table per family and matches supplementary groups in the kernel.)
    """
    out: list[str] = []
    for family in ruleset.families():
        out += [f"# {family} rules (iptables-save form)", *render(ruleset, family).lines()]
    return out
