"""imdsguard.firewall.iptables without the kernel: rendered rules (golden files) and drift.

Regenerate the golden files with ``UPDATE_GOLDEN=1 pytest
tests/unit/firewall/iptables/test_render.py``
and review the diff.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imdsguard import cgroups
from imdsguard.cgroups import UnitCgroup
from imdsguard.config import parse_config
from imdsguard.domain import Capture
from imdsguard.firewall.base import Capabilities, FamilyState, Inspection
from imdsguard.firewall.iptables import (
    AUDITED,
    CHAIN,
    DOCKER_USER,
    FORWARDED,
    Snapshot,
    XtRule,
    compare,
    render,
)
from imdsguard.policy import RuleSet, build_ruleset

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
MULTI = "endpoints: [169.254.169.254, 169.254.170.2, 'fd00:ec2::254', 169.254.170.23]\n"


UNITS = "allow: {users: [], units: [amazon-ssm-agent.service, stopped.service]}\n"
#: amazon-ssm-agent.service runs; stopped.service has no cgroup (so no rule).
UNIT_CGROUPS = {
    "amazon-ssm-agent.service": UnitCgroup(
        "amazon-ssm-agent.service", "system.slice/amazon-ssm-agent.service", 8812
    ),
    "stopped.service": None,
}


def _ruleset(text: str = "", capture: Capture = Capture.QUEUE) -> RuleSet:
    # Numeric ids only (and root), so the output does not depend on /etc/passwd;
    # a broker's system user is a fixed uid here (the daemon passes its real one).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cgroups, "unified_problem", lambda: None)
        config = parse_config(text, "cfg.yaml")
    extra = (990,) if config.broker.enabled else ()
    return build_ruleset(
        config,
        extra_uids=extra,
        capabilities=Capabilities(capture, notifications=False),
        capturing=capture != Capture.NONE,
        unit_cgroups=UNIT_CGROUPS,
    )


# name -> (config text, capture, family)
CASES: dict[str, tuple[str, int | Capture.NONE, str]] = {
    "enforce_reject_ipv4": ("", Capture.QUEUE, "ipv4"),
    "enforce_reject_ipv6": ("", Capture.QUEUE, "ipv6"),
    "enforce_drop_ipv4": ("action: drop\n", Capture.QUEUE, "ipv4"),
    "audit_ipv4": ("mode: audit\n", Capture.QUEUE, "ipv4"),
    "audit_no_queue_ipv4": ("mode: audit\n", Capture.NONE, "ipv4"),
    "no_queue_ipv4": ("", Capture.NONE, "ipv4"),
    "no_queue_ipv6": ("", Capture.NONE, "ipv6"),
    "no_queue_drop_ipv4": ("action: drop\n", Capture.NONE, "ipv4"),
    "allow_groups_ipv4": (
        "allow: {users: [root, 4242], groups: [4343, 0]}\n",
        Capture.NONE,
        "ipv4",
    ),
    "broker_ipv4": ("broker: {enabled: true}\ncontainers: allow\n", Capture.QUEUE, "ipv4"),
    "containers_allow_ipv4": ("containers: allow\n", Capture.NONE, "ipv4"),
    "multiple_endpoints_ipv4": (MULTI, Capture.NONE, "ipv4"),
    "units_ipv4": (UNITS, Capture.QUEUE, "ipv4"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden_file(case: str) -> None:
    text, capture, family = CASES[case]
    got = "\n".join(render(_ruleset(text, capture), family).lines()) + "\n"
    golden = GOLDEN / f"iptables_{case}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(got)
    assert golden.exists(), f"{golden} is missing: run with UPDATE_GOLDEN=1"
    assert got == golden.read_text(), f"{golden} differs: review, then run with UPDATE_GOLDEN=1"


def test_every_golden_file_has_a_case() -> None:
    stale = {p.name for p in GOLDEN.glob("iptables_*.txt")} - {f"iptables_{c}.txt" for c in CASES}
    assert not stale


def test_allow_groups_include_supplementary_groups() -> None:
    lines = render(_ruleset(CASES["allow_groups_ipv4"][0]), "ipv4").lines()
    assert "-A IMDSGUARD -m owner --uid-owner 4242 -j RETURN" in lines
    assert "-A IMDSGUARD -m owner --gid-owner 0 --suppl-groups -j RETURN" in lines
    assert "-A IMDSGUARD -m owner --gid-owner 4343 --suppl-groups -j RETURN" in lines


def test_multiple_endpoints_jump_in_order() -> None:
    lines = render(_ruleset(MULTI), "ipv4").lines()
    assert [line for line in lines if line.startswith("-A OUTPUT")] == [
        "-A OUTPUT -d 169.254.169.254/32 -j IMDSGUARD",
        "-A OUTPUT -d 169.254.170.2/32 -j IMDSGUARD",
        "-A OUTPUT -d 169.254.170.23/32 -j IMDSGUARD",
    ]


def test_audit_mode_never_denies() -> None:
    for capture in (Capture.QUEUE, Capture.NONE):
        lines = render(_ruleset("mode: audit\n", capture), "ipv4").lines()
        assert not [line for line in lines if "REJECT" in line or "DROP" in line]


def test_audited_packets_leave_our_chain() -> None:
    # A "-j" would RETURN into IMDSGUARD and reach the NFQUEUE rule again.
    lines = render(_ruleset("mode: audit\n"), "ipv4").lines()
    seen = "-m connmark --mark 0x1000/0x1000 -m mark --mark 0x1000/0x1000"
    assert f"-A IMDSGUARD {seen} -g IMDSGUARD-AUDITED" in lines


def test_enforce_queue_has_no_bypass() -> None:
    lines = render(_ruleset(), "ipv4").lines()
    tracked = "-m conntrack --ctstate NEW,RELATED,ESTABLISHED"
    assert f"-A IMDSGUARD {tracked} -j NFQUEUE --queue-num 5421" in lines
    assert not [line for line in lines if "--queue-bypass" in line]


@pytest.mark.parametrize("mode", ["enforce", "audit"])
@pytest.mark.parametrize("action", ["reject", "drop"])
def test_no_packet_mark_admits_or_skips_the_queue(mode: str, action: str) -> None:
    """SO_MARK needs only CAP_NET_RAW: a packet mark never decides on its own.

    "Seen" (back from the queue) also needs our bit in the conntrack mark,
    which no socket can set; the queue rule sets it, only for tracked packets.
    """
    config = f"mode: {mode}\naction: {action}\ncontainers: deny\n"
    for family in ("ipv4", "ipv6"):
        rendered = render(_ruleset(config), family)
        rules = [r for rs in rendered.chains.values() for r in rs]
        for rule in rules:
            for name, params in rule.matches:
                if name == "mark":
                    assert params == (("mark", "0x1000/0x1000"),), rule.save()
                    assert dict(rule.matches)["connmark"] == params, rule.save()
        queued = [r for r in rules if r.target == "NFQUEUE"]
        flags = [r for r in rules if r.target == "CONNMARK" and r.chain != "IMDSGUARD-AUDITED"]
        assert len(queued) == len(flags) == 2  # IMDSGUARD and IMDSGUARD-FWD
        for queue, flag in zip(queued, flags):
            assert (
                queue.matches
                == flag.matches
                == (("conntrack", (("ctstate", "NEW,RELATED,ESTABLISHED"),)),)
            )
            assert flag.target_params == (("set-xmark", "0x1000/0x1000"),)
            chain = rendered.chains[queue.chain]
            assert chain.index(flag) == chain.index(queue) - 1, "flag right before the queue"


def test_importing_the_module_does_not_load_iptc() -> None:
    code = "import sys, imdsguard.firewall.iptables; sys.exit('iptc' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- compare: the kernel's state (a snapshot) against the policy ----------------------


HOST_RULE = XtRule("OUTPUT", "ACCEPT", matches=(("owner", (("uid-owner", "0"),)),))


def _snapshot(ruleset: RuleSet, family: str = "ipv4") -> Snapshot:
    """What the kernel holds right after apply(), with one host rule after ours."""
    rendered = render(ruleset, family)
    return Snapshot(
        output=[j for j in rendered.jumps if j.chain == "OUTPUT"] + [HOST_RULE],
        chains={name: list(rules) for name, rules in rendered.chains.items()},
        forward=[j for j in rendered.jumps if j.chain == "FORWARD"],
    )


def _check(snap: Snapshot, ruleset: RuleSet, state: str, fragment: str = "") -> Inspection:
    result = compare(snap, ruleset, "ipv4")
    assert result.state == state, result.problems
    assert fragment in " | ".join(result.problems)
    return result


@pytest.mark.parametrize("case", sorted(CASES))
def test_identical_is_ok(case: str) -> None:
    text, capture, family = CASES[case]
    ruleset = _ruleset(text, capture)
    assert compare(_snapshot(ruleset, family), ruleset, family) == Inspection(
        family, FamilyState.OK
    )


def test_parameter_order_does_not_matter() -> None:
    # The kernel reader sorts parameters; render() keeps them in command-line order.
    ruleset = _ruleset("allow: {groups: [4343]}\n")
    snap = _snapshot(ruleset)
    snap.chains[CHAIN] = [
        dataclasses.replace(r, matches=tuple((n, tuple(reversed(p))) for n, p in r.matches))
        for r in snap.chains[CHAIN]
    ]
    _check(snap, ruleset, FamilyState.OK)


def test_chain_missing() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    del snap.chains[CHAIN]
    _check(snap, ruleset, FamilyState.MISSING, "chain IMDSGUARD does not exist")


def test_chain_flushed() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    snap.chains[CHAIN] = []
    _check(snap, ruleset, FamilyState.MISSING, "chain IMDSGUARD lacks")


def test_forward_chain_flushed() -> None:
    ruleset = _ruleset(capture=Capture.NONE)
    snap = _snapshot(ruleset)
    snap.chains[FORWARDED] = []
    _check(snap, ruleset, FamilyState.MISSING, "chain IMDSGUARD-FWD lacks '-A IMDSGUARD-FWD -p tcp")


def test_flushed_audit_chain_only_drifts() -> None:
    # In audit mode nothing is denied, so an emptied chain loses nothing that protects.
    ruleset = _ruleset("mode: audit\n")
    snap = _snapshot(ruleset)
    snap.chains[CHAIN] = []
    _check(snap, ruleset, FamilyState.DRIFTED, "chain IMDSGUARD differs")


def test_accept_inserted_above_our_jumps() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    snap.output.insert(0, XtRule("OUTPUT", "ACCEPT", dst="169.254.169.254/32"))
    # IMDS traffic is accepted before it reaches us: not protected, whatever follows.
    result = _check(snap, ruleset, FamilyState.MISSING, "comes before our jump in OUTPUT")
    assert len(result.problems) == 1
    assert not result.effective


def test_harmless_rule_above_our_jumps_in_audit_mode_only_drifts() -> None:
    # Audit mode denies nothing, so a rule ahead of our jump cannot open anything.
    ruleset = _ruleset("mode: audit\n")
    snap = _snapshot(ruleset)
    snap.output.insert(0, XtRule("OUTPUT", "ACCEPT", dst="169.254.169.254/32"))
    _check(snap, ruleset, FamilyState.DRIFTED, "not the first rules of OUTPUT")


def test_return_inserted_at_the_top_of_our_chain() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    snap.chains[CHAIN].insert(0, XtRule(CHAIN, "RETURN"))
    result = _check(snap, ruleset, FamilyState.MISSING, "'-A IMDSGUARD -j RETURN' comes before")
    assert not result.effective


def test_foreign_rule_after_our_deny_only_drifts() -> None:
    # Never reached: the deny above it ends every packet's way through the chain.
    ruleset = _ruleset(capture=Capture.NONE)
    snap = _snapshot(ruleset)
    snap.chains[CHAIN].append(XtRule(CHAIN, "ACCEPT"))
    _check(snap, ruleset, FamilyState.DRIFTED, "chain IMDSGUARD differs")


def test_docker_user_starting_with_our_jumps_guards_forward() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    ours = [dataclasses.replace(j, chain=DOCKER_USER) for j in snap.forward]
    snap.docker_user = [*ours, XtRule(DOCKER_USER, "RETURN")]
    # dockerd's restart puts its jumps on top of FORWARD; DOCKER-USER still denies first.
    snap.forward[:0] = [XtRule("FORWARD", DOCKER_USER), XtRule("FORWARD", "DOCKER-FORWARD")]
    _check(snap, ruleset, FamilyState.DRIFTED, "not the first rules of FORWARD")
    # Without our jumps in DOCKER-USER, Docker's ACCEPTs come first.
    snap.docker_user = [XtRule(DOCKER_USER, "RETURN")]
    result = _check(snap, ruleset, FamilyState.MISSING, "comes before our jump in FORWARD")
    assert "our jumps are not the first rules of DOCKER-USER" in result.problems


def test_duplicate_jump() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    snap.output.append(snap.output[0])
    _check(snap, ruleset, FamilyState.DRIFTED, "OUTPUT has extra or duplicate jumps")


def test_jump_for_an_endpoint_no_longer_configured() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    snap.forward.append(XtRule("FORWARD", FORWARDED, dst="169.254.170.2/32"))
    _check(snap, ruleset, FamilyState.DRIFTED, "FORWARD has extra or duplicate jumps")


def test_allow_rule_removed_but_deny_intact() -> None:
    ruleset = _ruleset("allow: {users: [root, 4242]}\n")
    snap = _snapshot(ruleset)
    snap.chains[CHAIN] = [r for r in snap.chains[CHAIN] if "4242" not in r.save()]
    result = _check(snap, ruleset, FamilyState.DRIFTED, "chain IMDSGUARD differs from the policy")
    assert result.effective


def test_extra_allow_rule() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    snap.chains[CHAIN].insert(
        0, XtRule(CHAIN, "RETURN", matches=(("owner", (("uid-owner", "1000"),)),))
    )
    # uid 1000 reaches IMDS although the policy denies it.
    _check(snap, ruleset, FamilyState.MISSING, "'-A IMDSGUARD -m owner --uid-owner 1000 -j RETURN'")


def test_stale_audited_chain_in_enforce_mode() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    snap.chains[AUDITED] = render(_ruleset("mode: audit\n"), "ipv4").chains[AUDITED]
    result = _check(snap, ruleset, FamilyState.DRIFTED, "stale chain IMDSGUARD-AUDITED")
    assert len(result.problems) == 1


def test_stale_forward_chain_when_containers_allowed() -> None:
    ruleset = _ruleset("containers: allow\n")
    deny = _snapshot(_ruleset())
    snap = _snapshot(ruleset)
    snap.chains[FORWARDED] = deny.chains[FORWARDED]
    snap.forward = deny.forward
    result = _check(snap, ruleset, FamilyState.DRIFTED, "stale chain IMDSGUARD-FWD")
    assert "FORWARD has extra or duplicate jumps to our chains" in result.problems


def test_audit_jump_instead_of_goto_drifts() -> None:
    ruleset = _ruleset("mode: audit\n")
    snap = _snapshot(ruleset)
    snap.chains[CHAIN] = [dataclasses.replace(r, goto=False) for r in snap.chains[CHAIN]]
    _check(snap, ruleset, FamilyState.DRIFTED, "chain IMDSGUARD differs")


def test_missing_jump_for_an_endpoint() -> None:
    ruleset = _ruleset(MULTI, capture=Capture.NONE)
    snap = _snapshot(ruleset)
    snap.output = [r for r in snap.output if r.dst != "169.254.170.2/32"]
    result = _check(
        snap, ruleset, FamilyState.MISSING, "OUTPUT has no jump for 169.254.170.2/32 to IMDSGUARD"
    )
    assert not result.effective


def test_missing_forward_jump() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    snap.forward = []
    _check(snap, ruleset, FamilyState.MISSING, "FORWARD has no jump for 169.254.169.254/32")


def test_missing_wins_over_drift() -> None:
    ruleset = _ruleset()
    snap = _snapshot(ruleset)
    snap.chains[AUDITED] = []
    snap.output = [HOST_RULE]
    result = _check(snap, ruleset, FamilyState.MISSING, "no jump")
    assert "stale chain IMDSGUARD-AUDITED" in result.problems


def test_a_restarted_unit_renders_a_different_rule() -> None:
    """Same path, new cgroup (inode): the rule differs, so the daemon loads it again."""
    before = render(_ruleset(UNITS), "ipv4")
    cg = UnitCgroup("amazon-ssm-agent.service", "system.slice/amazon-ssm-agent.service", 9001)
    config = build_ruleset(parse_config("allow: {users: []}\n", "cfg.yaml"))
    after = render(
        dataclasses.replace(
            _ruleset(UNITS), allow_cgroups=(("amazon-ssm-agent.service", cg.path, cg.inode),)
        ),
        "ipv4",
    )
    assert before.lines() != after.lines()
    assert any("--path system.slice/amazon-ssm-agent.service" in ln for ln in after.lines())
    assert not any("stopped.service" in ln for ln in after.lines())
    assert config.allow_units == ()


def test_unit_comment_fits_xt_comment() -> None:
    """xt_comment holds 255 characters; a unit name may have 255 (systemd's limit)."""
    from imdsguard.firewall.iptables.render import _unit_rule

    long = "a" * 247 + ".service"
    comments = [
        dict(params)["comment"]
        for rule in (_unit_rule(long, f"system.slice/{long}", 4026531835), _unit_rule(long, "x", 1))
        for name, params in rule.matches
        if name == "comment"
    ]
    assert all(len(c) <= 255 for c in comments), [len(c) for c in comments]
    # The inode (what tells a restarted unit's rule apart) is kept whole.
    assert comments[0].endswith(" cgroup 4026531835") and comments[1].endswith(" cgroup 1")
    short = _unit_rule("amazon-ssm-agent.service", "p", 8812).matches[1][1]
    assert short == (("comment", "imdsguard unit amazon-ssm-agent.service cgroup 8812"),)
