"""How ``nft -j list table`` output compares with a rendered :class:`~.render.Plan`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from imdsguard.firewall.base import FamilyState, Inspection
from imdsguard.firewall.nftables.render import FAMILY, UNITS, Plan
from imdsguard.policy import FAMILIES, RuleSet


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
