"""imdsguard.firewall.nftables without the kernel: the rendered batch (golden files) and drift.

Regenerate the golden files with ``UPDATE_GOLDEN=1 pytest
tests/unit/firewall/nftables/test_render.py``
and review the diff.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from imdsguard import cgroups
from imdsguard.cgroups import UnitCgroup
from imdsguard.config import parse_config
from imdsguard.domain import Capture
from imdsguard.firewall.base import Capabilities, FamilyState
from imdsguard.firewall.nftables import (
    BACKSTOP,
    BACKSTOP_PRIORITY,
    FAMILY,
    PRIORITY,
    TABLE,
    Plan,
    combine,
    compare,
    render,
    render_backstop,
)
from imdsguard.policy import RuleSet, build_ruleset

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
GROUPS = {4343: (5001, 5002), 0: (0,)}

UNITS = "allow: {users: [], units: [amazon-ssm-agent.service, stopped.service]}\n"
UNIT_CGROUPS = {
    "amazon-ssm-agent.service": UnitCgroup(
        "amazon-ssm-agent.service", "system.slice/amazon-ssm-agent.service", 8812
    ),
    "stopped.service": None,
}


#: Name -> (config, capture).
CASES: dict[str, tuple[str, Capture]] = {
    "enforce_reject": ("", Capture.NONE),
    "enforce_drop": ("action: drop\n", Capture.NONE),
    "enforce_queue": ("", Capture.QUEUE),
    "audit_queue": ("mode: audit\n", Capture.QUEUE),
    "groups_expanded": (
        "allow: {users: [4242], groups: [4343]}\ncontainers: allow\n",
        Capture.NONE,
    ),
    "broker_uid": ("broker: {enabled: true}\n", Capture.NONE),
    "ipv4_only": ("endpoints: [169.254.169.254]\nendpoints_acknowledged: true\n", Capture.NONE),
    "units": (UNITS, Capture.QUEUE),
}
#: Capture on, but the kernel cannot queue from nftables: log group, then deny at once.
LOG_CASES: dict[str, str] = {
    "enforce_log": "",
    "audit_log": "mode: audit\n",
}


#: The broker's system user in the broker cases (the daemon passes its real uid).
BROKER_UID = 990


def _ruleset(text: str, capture: Capture = Capture.NONE) -> RuleSet:
    # Numeric ids only (and root), so the output does not depend on /etc/passwd;
    # a broker's system user is a fixed uid here (the daemon passes its real one).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cgroups, "unified_problem", lambda: None)
        config = parse_config(text, "cfg.yaml")
    extra = (BROKER_UID,) if config.broker.enabled else ()
    return build_ruleset(
        config,
        extra_uids=extra,
        capabilities=Capabilities(capture, notifications=True),
        capturing=capture != Capture.NONE,
        unit_cgroups=UNIT_CGROUPS,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden_file(case: str) -> None:
    text, queue = CASES[case]
    got = "\n".join(render(_ruleset(text, queue), GROUPS).lines()) + "\n"
    golden = GOLDEN / f"nftables_{case}.jsonl"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()


@pytest.mark.parametrize("case", sorted(LOG_CASES))
def test_render_without_nft_queue_matches_golden_file(case: str) -> None:
    ruleset = _ruleset(LOG_CASES[case], Capture.LOG)
    got = "\n".join(render(ruleset, GROUPS).lines()) + "\n"
    golden = GOLDEN / f"nftables_{case}.jsonl"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()
    assert "queue" not in got and '"log": {"group": 5421}' in got


def test_the_log_rule_is_not_what_protects() -> None:
    # Flushing the log rule loses events, not protection: drifted, not missing.
    ruleset = _ruleset("", Capture.LOG)
    plan = render(ruleset, GROUPS)
    listing = _listing(plan)
    no_log = [o for o in listing if "log" not in json.dumps(o.get("rule", {}).get("expr", []))]
    assert len(no_log) == len(listing) - 2  # guard and fwd_guard
    assert _states(compare(no_log, plan, ruleset)) == {FamilyState.DRIFTED}


def _exprs(plan: Plan) -> list[list[dict[str, Any]]]:
    return [c["add"]["rule"]["expr"] for c in plan.commands if "rule" in c.get("add", {})]


@pytest.mark.parametrize("mode", ["enforce", "audit"])
@pytest.mark.parametrize("action", ["reject", "drop"])
@pytest.mark.parametrize("capture", [Capture.QUEUE, Capture.LOG])
def test_no_packet_mark_admits_or_skips_the_queue(mode: str, action: str, capture: Capture) -> None:
    """As for iptables: a packet mark (SO_MARK, CAP_NET_RAW) never decides on its own."""
    config = f"mode: {mode}\naction: {action}\ncontainers: deny\n"
    plan = render(_ruleset(config, capture), GROUPS)
    meta_mark = {"meta": {"key": "mark"}}
    ct_mark = {"&": [{"ct": {"key": "mark"}}, 0x1000]}
    for expr in _exprs(plan):
        matches = [e["match"] for e in expr if "match" in e]
        for match in matches:
            if json.dumps(meta_mark) in json.dumps(match["left"]):
                assert match == {"op": "==", "left": {"&": [meta_mark, 0x1000]}, "right": 0x1000}
                assert {"op": "==", "left": ct_mark, "right": 0x1000} in matches, expr
        if any("queue" in e for e in expr):
            ct_state, ct = {"ct": {"key": "state"}}, {"ct": {"key": "mark"}}
            tracked = ["new", "established", "related"]
            assert expr[0] == {"match": {"op": "in", "left": ct_state, "right": tracked}}
            assert expr[1] == {"mangle": {"key": ct, "value": {"|": [ct, 0x1000]}}}
    queues = [e for e in _exprs(plan) if any("queue" in x for x in e)]
    assert len(queues) == (2 if capture == Capture.QUEUE else 0)  # deny and fwd_guard


def test_batch_replaces_the_table_atomically() -> None:
    batch = render(_ruleset(""), GROUPS).batch()["nftables"]
    table = {"family": FAMILY, "name": TABLE}
    # add (so that delete cannot fail), delete, re-create: one transaction.
    assert batch[:3] == [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    assert all("add" in cmd for cmd in batch[3:])


def test_groups_become_member_uids() -> None:
    plan = render(_ruleset("allow: {users: [4242], groups: [4343]}\n"), GROUPS)
    assert plan.sets["allow_uids"] == ("uid", [4242, 5001, 5002])


def _listing(plan: Plan) -> list[dict[str, Any]]:
    """What ``nft -j list table`` prints after applying ``plan`` (handles omitted)."""
    out: list[dict[str, Any]] = [{"metainfo": {"json_schema_version": 1}}, {"table": {}}]
    for cmd in plan.commands:
        ((kind, spec),) = cmd["add"].items()
        out.append({kind: copy.deepcopy(spec)})
    return out


def _states(result: dict[str, Any]) -> set[str]:
    return {i.state for i in result.values()}


def test_compare_detects_each_kind_of_drift() -> None:
    ruleset = _ruleset("")
    plan = render(ruleset, GROUPS)
    good = _listing(plan)
    assert _states(compare(good, plan, ruleset)) == {FamilyState.OK}
    assert _states(compare([], plan, ruleset)) == {FamilyState.MISSING}

    flushed = [o for o in good if not ("rule" in o and o["rule"]["chain"] == "guard")]
    result = compare(flushed, plan, ruleset)
    assert _states(result) == {FamilyState.MISSING}
    assert "lacks" in result["ipv4"].problems[0]

    no_hook = [o for o in good if not ("chain" in o and o["chain"]["name"] == "output")]
    assert _states(compare(no_hook, plan, ruleset)) == {FamilyState.MISSING}

    edited = copy.deepcopy(good)
    for obj in edited:
        if "set" in obj and obj["set"]["name"] == "allow_uids":
            obj["set"]["elem"].append(65534)
    result = compare(edited, plan, ruleset)
    # uid 65534 reaches IMDS although the policy denies it.
    assert _states(result) == {FamilyState.MISSING}
    assert result["ipv4"].problems == ("set allow_uids also admits 65534",)

    fewer = copy.deepcopy(good)
    for obj in fewer:
        if "set" in obj and obj["set"]["name"] == "allow_uids":
            obj["set"]["elem"] = obj["set"]["elem"][1:]
    # An allowed user lost: stricter than the policy, still guarded.
    assert _states(compare(fewer, plan, ruleset)) == {FamilyState.DRIFTED}

    no_address = copy.deepcopy(good)
    for obj in no_address:
        if "set" in obj and obj["set"]["name"] == "imds_v4":
            obj["set"]["elem"] = []
    result = compare(no_address, plan, ruleset)
    assert _states(result) == {FamilyState.MISSING}
    assert result["ipv4"].problems == ("set imds_v4 lacks 169.254.169.254",)

    accept_first = copy.deepcopy(good)
    at = next(i for i, o in enumerate(accept_first) if o.get("rule", {}).get("chain") == "guard")
    accept_first.insert(at, {"rule": {"chain": "guard", "expr": [{"accept": None}]}})
    result = compare(accept_first, plan, ruleset)
    assert _states(result) == {FamilyState.MISSING}
    assert "before our deny" in result["ipv4"].problems[0]

    reprioritised = copy.deepcopy(good)
    for obj in reprioritised:
        if "chain" in obj and obj["chain"]["name"] == "output":
            obj["chain"]["prio"] = 100
    assert _states(compare(reprioritised, plan, ruleset)) == {FamilyState.DRIFTED}

    extra = [*good, {"rule": {"chain": "guard", "comment": "someone else's", "expr": []}}]
    assert _states(compare(extra, plan, ruleset)) == {FamilyState.DRIFTED}

    stale = [*good, {"chain": {"name": "leftover"}}]
    assert _states(compare(stale, plan, ruleset)) == {FamilyState.DRIFTED}


def test_ipv6_disabled_by_config_is_reported_disabled() -> None:
    ruleset = _ruleset("endpoints: [169.254.169.254]\nendpoints_acknowledged: true\n")
    plan = render(ruleset, GROUPS)
    result = compare(_listing(plan), plan, ruleset)
    assert result["ipv6"].state == FamilyState.DISABLED
    assert result["ipv4"].state == FamilyState.OK
    assert json.dumps(plan.batch())  # serialisable as sent to nft


def test_backstop_matches_golden_file() -> None:
    """The daemon-less copy: same allow and deny as our table, no queue or log, hooked after it."""
    ruleset = _ruleset("", Capture.QUEUE)
    backstop = render_backstop(ruleset, GROUPS)
    assert backstop is not None
    got = "\n".join(backstop.lines()) + "\n"
    golden = GOLDEN / "nftables_backstop.jsonl"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()
    assert "queue" not in got and '"log"' not in got
    main = render(ruleset, GROUPS)
    assert backstop.sets["allow_uids"] == main.sets["allow_uids"]  # allowed users pass both
    assert {c["prio"] for c in backstop.chains.values() if c} == {BACKSTOP_PRIORITY}
    assert BACKSTOP_PRIORITY > PRIORITY  # the capture sees a denied packet first
    assert render_backstop(_ruleset("mode: audit\n", Capture.QUEUE), GROUPS) is None


def test_replace_in_place_keeps_the_owned_table() -> None:
    plan = render(_ruleset(""), GROUPS)
    commands = plan.replace_in_place(_listing(plan))
    table = {"family": FAMILY, "name": TABLE}
    assert commands[0] == {"flush": {"table": table}}
    assert not any("table" in next(iter(c.values())) for c in commands[1:])  # never re-added
    deleted = [next(iter(c["delete"].values()))["name"] for c in commands if "delete" in c]
    assert sorted(deleted) == sorted([*plan.chains, *plan.sets])
    assert commands[1 + len(deleted) :] == plan.commands


def _found(ruleset: RuleSet, **tables: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, listing in tables.items():
        plan = render(ruleset, GROUPS) if name == TABLE else render_backstop(ruleset, GROUPS)
        assert plan is not None
        out[name] = None if listing is None else compare(listing(plan), plan, ruleset)
    return out


def test_combine_states_of_our_two_tables() -> None:
    ruleset = _ruleset("")
    both = [TABLE, BACKSTOP]
    whole = _found(ruleset, **{TABLE: _listing, BACKSTOP: _listing})
    assert _states(combine(ruleset, whole, both)) == {FamilyState.OK}
    # After `flush ruleset`: the owned table still denies, the backstop is gone.
    flushed = _found(ruleset, **{TABLE: _listing, BACKSTOP: None})
    result = combine(ruleset, flushed, both)
    assert _states(result) == {FamilyState.DRIFTED}
    assert result["ipv4"].problems == (f"table {FAMILY} {BACKSTOP} does not exist",)
    # The daemon's table gone (it died) while the backstop denies: drifted, still denied.
    died = _found(ruleset, **{TABLE: None, BACKSTOP: _listing})
    assert _states(combine(ruleset, died, both)) == {FamilyState.DRIFTED}
    # Without a daemon only the backstop is wanted.
    assert _states(combine(ruleset, died, [BACKSTOP])) == {FamilyState.OK}
    # An un-owned table of an older imdsguard next to it: drift (apply deletes it).
    assert _states(combine(ruleset, whole, [BACKSTOP])) == {FamilyState.DRIFTED}
    nothing = _found(ruleset, **{TABLE: None, BACKSTOP: None})
    assert _states(combine(ruleset, nothing, both)) == {FamilyState.MISSING}
    assert _states(combine(ruleset, nothing, [BACKSTOP])) == {FamilyState.MISSING}
    # Audit mode without a daemon: nothing is wanted, nothing there is fine.
    audit = _ruleset("mode: audit\n")
    assert _states(combine(audit, {TABLE: None, BACKSTOP: None}, [])) == {FamilyState.OK}


def test_combine_one_open_table_is_covered_by_the_other() -> None:
    # The owned table admits an extra uid (cannot happen: nobody else may edit it),
    # or the backstop was edited: a reject in the other table still denies.
    ruleset = _ruleset("")

    def widened(plan: Plan) -> list[dict[str, Any]]:
        listing = _listing(plan)
        for obj in listing:
            if "set" in obj and obj["set"]["name"] == "allow_uids":
                obj["set"]["elem"].append(65534)
        return listing

    found = _found(ruleset, **{TABLE: _listing, BACKSTOP: widened})
    result = combine(ruleset, found, [TABLE, BACKSTOP])
    assert _states(result) == {FamilyState.DRIFTED}
    assert any("also admits 65534" in p for p in result["ipv4"].problems)
    found = _found(ruleset, **{TABLE: widened, BACKSTOP: widened})
    assert _states(combine(ruleset, found, [TABLE, BACKSTOP])) == {FamilyState.MISSING}
