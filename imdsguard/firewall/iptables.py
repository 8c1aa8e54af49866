"""The iptables backend, through python-iptables (libiptc, the legacy x_tables API).

Layout, per family (``filter`` table of iptables and ip6tables)::

    -A OUTPUT -d 169.254.169.254/32 -j IMDSGUARD        (first rules of OUTPUT)
    -A IMDSGUARD -m owner --uid-owner 0 -j RETURN
    -A IMDSGUARD -m owner --gid-owner 1001 --suppl-groups -j RETURN
    -A IMDSGUARD -j NFLOG --nflog-group 5421 ...        (when capture is on)
    -A IMDSGUARD -p tcp -j REJECT --reject-with tcp-reset
    -A IMDSGUARD -j REJECT --reject-with icmp-port-unreachable

Allowed traffic RETURNs rather than ACCEPTs: we never open anything the host's
own rules would close. Every change is made on one libiptc handle and
committed once, which replaces the whole table in a single setsockopt, so a
reload never lets a denied packet through.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from imdsguard import _locks
from imdsguard.errors import FirewallError, PermissionDeniedError
from imdsguard.firewall.base import FamilyState, Inspection
from imdsguard.policy import FAMILIES, RuleSet

CHAIN = "IMDSGUARD"

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
        parts.append(f"-j {self.target}")
        parts.extend(_params_text(self.target_params))
        return " ".join(parts)


def _params_text(params: Params) -> list[str]:
    return [f"--{k} {v}".rstrip() for k, v in params]


def _reject_icmp(family: str) -> str:
    return "icmp-port-unreachable" if family == "ipv4" else "icmp6-port-unreachable"


def _host(addr: str) -> str:
    return f"{addr}/32" if ipaddress.ip_address(addr).version == 4 else f"{addr}/128"


def render(ruleset: RuleSet, family: str) -> tuple[list[XtRule], list[XtRule]]:
    """The OUTPUT jumps and the chain's rules that ``ruleset`` asks for in ``family``."""
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
    rules += _deny_rules(ruleset, family)
    return jumps, rules


def _deny_rules(ruleset: RuleSet, family: str) -> list[XtRule]:
    rules = []
    if ruleset.log_group is not None:
        rules.append(
            XtRule(
                CHAIN,
                "NFLOG",
                # Only the group: python-iptables corrupts memory when a second
                # option is parsed into the same target (valgrind, iptables 1.8.9).
                target_params=(("nflog-group", str(ruleset.log_group)),),
            )
        )
    if not ruleset.enforcing:
        return rules
    if ruleset.action == "drop":
        rules.append(XtRule(CHAIN, "DROP"))
    else:
        # A TCP reset makes connect() fail at once; anything else gets ICMP. The explicit
        # "-m tcp" is what iptables adds itself, and python-iptables corrupts memory
        # building a "-p tcp" rule without it after an owner-match rule.
        rules.append(
            XtRule(
                CHAIN,
                "REJECT",
                protocol="tcp",
                matches=(("tcp", ()),),
                target_params=(("reject-with", "tcp-reset"),),
            )
        )
        rules.append(
            XtRule(CHAIN, "REJECT", target_params=(("reject-with", _reject_icmp(family)),))
        )
    return rules


def _required(ruleset: RuleSet, family: str) -> list[XtRule]:
    """The rules without which the chain does not do its job at all."""
    return _deny_rules(ruleset, family)


# --- talking to libiptc ----------------------------------------------------------


def _norm_addr(value: str) -> str | None:
    if value.startswith("!"):
        return value
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return value
    return None if net.prefixlen == 0 else str(net)


def _norm_params(params: dict[str, list[str]]) -> Params:
    return tuple(sorted((k, " ".join(v)) for k, v in params.items()))


def _from_iptc(rule: Any, chain: str) -> XtRule:
    protocol = rule.protocol if rule.protocol not in ("ip", "ipv6", "all", "0", None) else None
    matches = tuple((m.name, _norm_params(m.get_all_parameters())) for m in rule.matches)
    # Interfaces are not part of our rules; keep them visible so such a rule never equals ours.
    if rule.out_interface:
        matches += (("out-interface", (("iface", str(rule.out_interface)),)),)
    if rule.in_interface:
        matches += (("in-interface", (("iface", str(rule.in_interface)),)),)
    return XtRule(
        chain=chain,
        target=rule.target.name if rule.target is not None else "",
        dst=_norm_addr(rule.dst),
        protocol=protocol,
        matches=matches,
        target_params=_norm_params(rule.target.get_all_parameters()) if rule.target else (),
    )


def _set_parameter(module: Any, key: str, value: str | None) -> None:
    # python-iptables parses and checks through a pointer that libxtables keeps per
    # extension (xtables_match.m / xtables_target.t), last set by whichever object
    # of that extension touched it, possibly one already freed. Point it at ours
    # first (valgrind showed the use-after-free; it crashed with iptables 1.8.9).
    module._update_pointers()
    module.set_parameter(key, value)


def _repoint(rule: Any) -> None:
    # See _set_parameter: libiptc insertion runs each extension's final check.
    for match in rule.matches:
        match._update_pointers()
    rule.target._update_pointers()


def _canonical(rule: XtRule) -> XtRule:
    return XtRule(
        chain=rule.chain,
        target=rule.target,
        dst=rule.dst,
        protocol=rule.protocol,
        matches=tuple((name, tuple(sorted(p))) for name, p in rule.matches),
        target_params=tuple(sorted(rule.target_params)),
    )


@dataclass
class _Snapshot:
    """What the kernel has of ours in one family's filter table."""

    output: list[XtRule]
    chain: list[XtRule] | None  # None: our chain does not exist

    def jump_positions(self) -> list[int]:
        return [i for i, r in enumerate(self.output) if r.target == CHAIN]


class IptablesBackend:
    """python-iptables implementation of :class:`~imdsguard.firewall.base.Backend`."""

    name = "iptables"

    def __init__(self) -> None:
        try:
            import iptc  # noqa: PLC0415 - libxtables is loaded on import; keep it lazy
        except Exception as exc:  # noqa: BLE001 - any failure here means "unusable"
            raise FirewallError(
                f"python-iptables cannot be loaded ({exc}); install iptables (libxtables)"
            ) from None
        self._iptc = iptc

    # -- low level

    def family_enabled(self, family: str) -> bool:
        """False when the kernel has the family switched off (IPv6 disabled)."""
        return family == "ipv4" or os.path.exists("/proc/net/if_inet6")

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._iptc.IPTCError as exc:
            text = str(exc)
            if "Permission denied" in text or "must be root" in text or os.geteuid() != 0:
                raise PermissionDeniedError(
                    f"cannot {what}: the firewall needs root (CAP_NET_ADMIN): {text}"
                ) from None
            raise FirewallError(f"cannot {what}: {text}") from None

    def _table(self, family: str) -> Any:
        iptc = self._iptc
        with self._errors(f"open the {family} filter table"):
            table = (
                iptc.Table(iptc.Table.FILTER)
                if family == "ipv4"
                else iptc.Table6(iptc.Table6.FILTER)
            )
            table.autocommit = False
            table.refresh()
        return table

    def _snapshot(self, table: Any) -> _Snapshot:
        iptc = self._iptc
        output = [_from_iptc(r, "OUTPUT") for r in iptc.Chain(table, "OUTPUT").rules]
        chain = None
        if table.is_chain(CHAIN):
            chain = [_from_iptc(r, CHAIN) for r in iptc.Chain(table, CHAIN).rules]
        return _Snapshot(output, chain)

    def _build(self, family: str, rule: XtRule) -> Any:
        iptc = self._iptc
        new = iptc.Rule() if family == "ipv4" else iptc.Rule6()
        if rule.dst:
            new.dst = rule.dst
        if rule.protocol:
            new.protocol = rule.protocol
        for name, params in rule.matches:
            match = new.create_match(name)
            for key, value in params:
                _set_parameter(match, key, value or None)
        target = iptc.Target(new, rule.target)
        for key, value in rule.target_params:
            _set_parameter(target, key, value)
        new.target = target
        return new

    # -- the Backend interface

    def inspect(self, ruleset: RuleSet) -> dict[str, Inspection]:
        """See :meth:`imdsguard.firewall.base.Backend.inspect`."""
        result = {}
        for family in FAMILIES:
            if not ruleset.endpoints(family):
                result[family] = Inspection(
                    family, FamilyState.DISABLED, ("no endpoint configured",)
                )
            elif not self.family_enabled(family):
                result[family] = Inspection(
                    family, FamilyState.DISABLED, ("IPv6 is disabled in the kernel",)
                )
            else:
                with self._errors(f"read the {family} rules"):
                    snap = self._snapshot(self._table(family))
                result[family] = _compare(snap, ruleset, family)
        return result

    def apply(self, ruleset: RuleSet) -> bool:
        """See :meth:`imdsguard.firewall.base.Backend.apply`."""
        changed = False
        with _locks.hold(_locks.XTABLES_LOCK, what="the xtables lock"):
            for family in FAMILIES:
                if not self.family_enabled(family):
                    continue
                if not ruleset.endpoints(family):
                    changed |= self._remove_family(family)
                    continue
                table = self._table(family)
                with self._errors(f"apply the {family} rules"):
                    if _compare(self._snapshot(table), ruleset, family).state == FamilyState.OK:
                        continue
                    self._rewrite(table, ruleset, family)
                    table.commit()
                    table.refresh()
                changed = True
        return changed

    def _rewrite(self, table: Any, ruleset: RuleSet, family: str) -> None:
        iptc = self._iptc
        jumps, rules = render(ruleset, family)
        if not table.is_chain(CHAIN):
            table.create_chain(CHAIN)
        chain = iptc.Chain(table, CHAIN)
        chain.flush()
        for rule in rules:
            built = self._build(family, rule)
            _repoint(built)
            chain.append_rule(built)
        output = iptc.Chain(table, "OUTPUT")
        for rule in list(output.rules):
            if rule.target is not None and rule.target.name == CHAIN:
                output.delete_rule(rule)
        for rule in reversed(jumps):
            built = self._build(family, rule)
            _repoint(built)
            output.insert_rule(built, 0)

    def remove(self) -> bool:
        """See :meth:`imdsguard.firewall.base.Backend.remove`."""
        changed = False
        with _locks.hold(_locks.XTABLES_LOCK, what="the xtables lock"):
            for family in FAMILIES:
                if self.family_enabled(family):
                    changed |= self._remove_family(family)
        return changed

    def _remove_family(self, family: str) -> bool:
        iptc = self._iptc
        table = self._table(family)
        with self._errors(f"remove the {family} rules"):
            found = False
            for chain in table.chains:
                for rule in list(chain.rules):
                    if rule.target is not None and rule.target.name == CHAIN:
                        chain.delete_rule(rule)
                        found = True
            if table.is_chain(CHAIN):
                iptc.Chain(table, CHAIN).flush()
                table.delete_chain(CHAIN)
                found = True
            if found:
                table.commit()
                table.refresh()
        return found


def _compare(snap: _Snapshot, ruleset: RuleSet, family: str) -> Inspection:
    jumps, rules = render(ruleset, family)
    missing: list[str] = []
    drift: list[str] = []
    if snap.chain is None:
        missing.append(f"chain {CHAIN} does not exist")
    elif [_canonical(r) for r in snap.chain] != [_canonical(r) for r in rules]:
        present = {_canonical(r) for r in snap.chain}
        absent = [r for r in _required(ruleset, family) if _canonical(r) not in present]
        if absent:
            missing.append(f"chain {CHAIN} lacks '{absent[0].save()}' (flushed or edited)")
        else:
            drift.append(f"chain {CHAIN} differs from the policy")
    current = [_canonical(snap.output[i]) for i in snap.jump_positions()]
    for jump in jumps:
        if _canonical(jump) not in current:
            missing.append(f"OUTPUT has no jump for {jump.dst} to {CHAIN}")
    wanted = [_canonical(j) for j in jumps]
    if not missing and [_canonical(r) for r in snap.output[: len(jumps)]] != wanted:
        drift.append(f"the jumps to {CHAIN} are not the first rules of OUTPUT")
    if not missing and current != wanted:
        drift.append(f"OUTPUT has extra or duplicate jumps to {CHAIN}")
    if missing:
        return Inspection(family, FamilyState.MISSING, tuple(missing + drift))
    if drift:
        return Inspection(family, FamilyState.DRIFTED, tuple(drift))
    return Inspection(family, FamilyState.OK)
