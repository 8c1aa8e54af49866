"""imdsguard.policy: from a Config to the backend-neutral RuleSet."""

from __future__ import annotations

import json

import pytest

from imdsguard.config import Config, parse_config
from imdsguard.domain import Capture, Containers
from imdsguard.errors import ImdsGuardError
from imdsguard.firewall.base import Capabilities
from imdsguard.policy import RuleSet, build_ruleset, capture_for


def _ruleset(
    text: str, *, extra_uids: tuple[int, ...] = (), capture: Capture = Capture.QUEUE
) -> RuleSet:
    return build_ruleset(
        parse_config(text, "cfg.yaml"),
        extra_uids=extra_uids,
        capabilities=Capabilities(capture, notifications=False),
        capturing=capture != Capture.NONE,
    )


def test_defaults() -> None:
    rs = build_ruleset(Config())
    assert rs == RuleSet(("169.254.169.254",), ("fd00:ec2::254",), (0,), ())  # same defaults
    assert rs == RuleSet(
        endpoints_v4=("169.254.169.254",),
        endpoints_v6=("fd00:ec2::254",),
        allow_uids=(0,),
        allow_gids=(),
        action="reject",
        mode="enforce",
        capture=Capture.NONE,
        containers=Containers.DENY,
    )
    assert rs.enforcing
    assert rs.families() == ("ipv4", "ipv6")


def test_endpoints_split_per_family_in_config_order() -> None:
    rs = _ruleset("endpoints: ['fd00:ec2::254', 169.254.170.2, 'fd00:ec2::1', 169.254.169.254]")
    assert rs.endpoints_v4 == ("169.254.170.2", "169.254.169.254")
    assert rs.endpoints_v6 == ("fd00:ec2::254", "fd00:ec2::1")
    assert rs.endpoints("ipv4") == rs.endpoints_v4
    assert rs.endpoints("ipv6") == rs.endpoints_v6


def test_uids_and_gids_sorted_and_unique() -> None:
    rs = _ruleset("allow:\n  users: [4242, root, 17, '4242']\n  groups: [50, 3, 0]\n")
    assert rs.allow_uids == (0, 17, 4242)
    assert rs.allow_gids == (0, 3, 50)


def test_extra_uids_are_merged() -> None:
    rs = _ruleset("allow: {users: [4242, 0]}", extra_uids=(4242, 9, 70000))
    assert rs.allow_uids == (0, 9, 4242, 70000)


def test_no_users_means_no_uid_allowed() -> None:
    assert _ruleset("allow: {users: []}").allow_uids == ()
    assert _ruleset("allow: {users: []}", extra_uids=(999,)).allow_uids == (999,)


def test_capture_is_the_backends_while_a_capture_runs_else_none() -> None:
    queue, log = Capabilities(Capture.QUEUE, False), Capabilities(Capture.LOG, True)
    assert build_ruleset(Config()).capture == Capture.NONE
    assert build_ruleset(Config(), capabilities=queue).capture == Capture.NONE
    assert build_ruleset(Config(), capabilities=queue, capturing=True).capture == Capture.QUEUE
    assert build_ruleset(Config(), capabilities=log, capturing=True).capture == Capture.LOG
    assert capture_for(None, capturing=True) == Capture.NONE


def test_mode_action_containers_carried_over() -> None:
    rs = _ruleset("mode: audit\naction: drop\ncontainers: allow\n")
    assert (rs.mode, rs.action, rs.containers) == ("audit", "drop", "allow")
    assert not rs.enforcing


def test_no_mark_grants_access() -> None:
    # The broker is allowed by its uid (extra_uids), never by a packet mark.
    assert "mark" not in _ruleset("broker: {enabled: true}").to_json()
    assert _ruleset("broker: {enabled: true}", extra_uids=(990,)).allow_uids == (0, 990)


def test_service_uids_is_the_brokers_account_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    from imdsguard import identity

    assert identity.service_uids(parse_config("", "cfg.yaml")) == ()
    monkeypatch.setenv("IMDSGUARD_BROKER_USER", "nobody")
    nobody = identity.broker_account()
    assert identity.service_uids(parse_config("broker: {enabled: true}", "cfg.yaml")) == (
        nobody.uid,
    )
    monkeypatch.setenv("IMDSGUARD_BROKER_USER", "imdsg-no-such-user")
    with pytest.raises(ImdsGuardError, match=r"useradd --system .* imdsg-no-such-user"):
        identity.service_uids(parse_config("broker: {enabled: true}", "cfg.yaml"))
    monkeypatch.setenv("IMDSGUARD_BROKER_USER", "root")
    with pytest.raises(ImdsGuardError, match="must not be root"):
        identity.broker_account()


@pytest.mark.parametrize(
    ("endpoints", "families"),
    [
        ("[169.254.169.254]", ("ipv4",)),
        ("['fd00:ec2::254']", ("ipv6",)),
        ("['fd00:ec2::254', 169.254.169.254]", ("ipv4", "ipv6")),
    ],
)
def test_families(endpoints: str, families: tuple[str, ...]) -> None:
    assert _ruleset(f"endpoints: {endpoints}\nendpoints_acknowledged: true").families() == families


@pytest.mark.parametrize(
    "text",
    [
        "",
        "mode: audit\naction: drop\ncontainers: allow\nbroker: {enabled: true}\n",
        "endpoints: ['fd00:ec2::254']\nendpoints_acknowledged: true\n"
        "allow: {users: [], groups: [4, 5]}\n",
    ],
)
@pytest.mark.parametrize("capture", list(Capture))
def test_json_round_trip(text: str, capture: Capture) -> None:
    rs = _ruleset(text, capture=capture)
    text_json = rs.to_json()
    assert RuleSet.from_json(text_json) == rs
    assert RuleSet.from_json(text_json).to_json() == text_json
    assert list(json.loads(text_json)) == sorted(json.loads(text_json))


def test_from_json_fills_keys_older_records_lack() -> None:
    old = {
        "endpoints_v4": ["169.254.169.254"],
        "endpoints_v6": [],
        "allow_uids": [0],
        "allow_gids": [],
        "action": "drop",
        "mode": "enforce",
    }
    rs = RuleSet.from_json(json.dumps({**old, "allow_mark": 0x2000}))  # a record of 0.1
    assert (rs.capture, rs.containers) == (Capture.NONE, Containers.ALLOW)
    assert rs.families() == ("ipv4",)


def test_from_json_reads_queue_num_records() -> None:
    """Records before ``capture``: a queue number meant queued, null meant no capture."""
    rs = _ruleset("", capture=Capture.QUEUE)
    old = json.loads(rs.to_json())
    del old["capture"]
    assert RuleSet.from_json(json.dumps({**old, "queue_num": 5421})).capture == Capture.QUEUE
    assert RuleSet.from_json(json.dumps({**old, "queue_num": None})).capture == Capture.NONE
    assert json.loads(rs.to_json())["capture"] == "queue"
