"""How one family's filter table (a :class:`Snapshot`) compares with the policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from imdsguard.firewall.base import FamilyState, Inspection
from imdsguard.firewall.iptables.render import (
    DOCKER_USER,
    HOOKS,
    OUR_CHAINS,
    XtRule,
    canonical,
    hook_jumps,
    render,
    required_rules,
)
from imdsguard.policy import RuleSet


@dataclass
class Snapshot:
    """What the kernel has of ours in one family's filter table."""

    output: list[XtRule]
    chains: dict[str, list[XtRule]]  # our chains that exist
    forward: list[XtRule] = field(default_factory=list)
    docker_user: list[XtRule] | None = None  # None: no DOCKER-USER chain

    def builtin(self, name: str) -> list[XtRule]:
        return self.output if name == "OUTPUT" else self.forward


def _bypass(
    rules: list[XtRule],
    ours: list[XtRule],
    needed: list[XtRule],
    guards: tuple[str, ...] = (),
) -> str | None:
    """The first rule not in ``ours`` that IMDS traffic meets before all of ``needed``.

    Such a rule can accept (or RETURN, or jump somewhere that accepts) before
    our deny (or our jump) is reached, so with it in place we cannot vouch for
    the family. ``guards`` are targets that send everything through our rules
    first (DOCKER-USER when it starts with our jumps).
    """
    known = {canonical(r) for r in ours}
    seen = [canonical(r) for r in rules]
    firsts = [seen.index(c) for c in map(canonical, needed) if c in seen]
    for rule in rules[: max(firsts, default=0)]:
        if canonical(rule) in known:
            continue
        if rule.target in guards and not (rule.dst or rule.protocol or rule.matches):
            return None
        return rule.save()
    return None


def _in_front(rules: list[XtRule], jumps: list[XtRule]) -> bool:
    return [canonical(r) for r in rules[: len(jumps)]] == [canonical(j) for j in jumps]


def compare(snap: Snapshot, ruleset: RuleSet, family: str) -> Inspection:
    wanted = render(ruleset, family)
    missing: list[str] = []
    drift: list[str] = []
    for name, rules in wanted.chains.items():
        have = snap.chains.get(name)
        if have is None:
            missing.append(f"chain {name} does not exist")
        elif [canonical(r) for r in have] != [canonical(r) for r in rules]:
            present = {canonical(r) for r in have}
            required = required_rules(ruleset, family, name)
            absent = [r for r in required if canonical(r) not in present]
            intruder = _bypass(have, rules, required)
            if absent:
                missing.append(f"chain {name} lacks '{absent[0].save()}' (flushed or edited)")
            elif intruder:
                missing.append(f"'{intruder}' comes before our deny: it can admit IMDS traffic")
            else:
                drift.append(f"chain {name} differs from the policy")
    for name in snap.chains:
        if name not in wanted.chains:
            drift.append(f"stale chain {name}")
    docker = hook_jumps(wanted, DOCKER_USER) if snap.docker_user is not None else []
    docker_first = bool(docker) and _in_front(snap.docker_user or [], docker)
    for hook, target in HOOKS.items():
        rules = snap.builtin(hook)
        current = [canonical(r) for r in rules if r.target in OUR_CHAINS]
        jumps = [canonical(j) for j in wanted.jumps if j.chain == hook]
        for jump in jumps:
            if jump not in current:
                missing.append(f"{hook} has no jump for {jump.dst} to {target}")
        if missing:
            continue
        guards = (DOCKER_USER,) if hook == "FORWARD" and docker_first else ()
        intruder = _bypass(rules, jumps, jumps, guards) if ruleset.enforcing else None
        if intruder:
            missing.append(
                f"'{intruder}' comes before our jump in {hook}: it can admit IMDS traffic"
            )
        elif not _in_front(rules, jumps):
            drift.append(f"the jumps to {target} are not the first rules of {hook}")
        if current != jumps:
            drift.append(f"{hook} has extra or duplicate jumps to our chains")
    if docker and not docker_first:
        drift.append(f"our jumps are not the first rules of {DOCKER_USER}")
    if missing:
        return Inspection(family, FamilyState.MISSING, tuple(missing + drift))
    if drift:
        return Inspection(family, FamilyState.DRIFTED, tuple(drift))
    return Inspection(family, FamilyState.OK)
