"""Tests for the simulated IMDS, over real HTTP on loopback only."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from imdsguard_testing.clock import FakeClock
from imdsguard_testing.imds_sim import (
    DEFAULT_ROLE,
    TOKEN_HEADER,
    TTL_HEADER,
    Fault,
    ImdsSimulator,
    SimConfig,
    format_listen,
    main,
    parse_listen,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
CREDS_PATH = f"/latest/meta-data/iam/security-credentials/{DEFAULT_ROLE}"
RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


class Reply:
    """An HTTP response read in full."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    timeout: float = 5.0,
) -> Reply:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def get_token(port: int, ttl: int = 60, host: str = "127.0.0.1") -> str:
    reply = call(port, "PUT", "/latest/api/token", {TTL_HEADER: str(ttl)}, host=host)
    assert reply.status == 200
    return reply.body.decode()


def parse_ts(value: str) -> datetime:
    assert RFC3339_Z.fullmatch(value), value
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


Factory = Callable[..., "tuple[ImdsSimulator, int]"]


@pytest.fixture
def make_sim(clock: FakeClock) -> Iterator[Factory]:
    """Start simulators on 127.0.0.1, port 0; all are shut down afterwards."""
    sims: list[ImdsSimulator] = []

    def factory(**overrides: Any) -> tuple[ImdsSimulator, int]:
        sim = ImdsSimulator(SimConfig(**overrides), clock=clock)
        sims.append(sim)
        [(_, port)] = sim.serve([("127.0.0.1", 0)])
        return sim, port

    yield factory
    for sim in sims:
        sim.shutdown()


@pytest.fixture
def port(make_sim: Factory) -> int:
    return make_sim()[1]


# -- tokens ---------------------------------------------------------------------


def test_token_put_returns_token_and_echoes_ttl(port: int) -> None:
    reply = call(port, "PUT", "/latest/api/token", {TTL_HEADER: "21600"})
    assert reply.status == 200
    assert reply.headers[TTL_HEADER.lower()] == "21600"
    assert reply.headers["content-type"] == "text/plain"
    assert reply.headers["server"] == "EC2ws"
    assert int(reply.headers["content-length"]) == len(reply.body) > 20
    assert call(port, "PUT", "/latest/api/token", {TTL_HEADER: "1"}).status == 200
    assert get_token(port) != get_token(port)


@pytest.mark.parametrize("ttl", ["0", "21601", "garbage", "-5", "", "1.5", None])
def test_token_put_rejects_bad_ttl(port: int, ttl: str | None) -> None:
    headers = {} if ttl is None else {TTL_HEADER: ttl}
    assert call(port, "PUT", "/latest/api/token", headers).status == 400


def test_token_put_through_proxy_is_forbidden(port: int) -> None:
    headers = {TTL_HEADER: "60", "X-Forwarded-For": "10.0.0.1"}
    assert call(port, "PUT", "/latest/api/token", headers).status == 403


def test_wrong_methods_are_refused(port: int) -> None:
    assert call(port, "GET", "/latest/api/token").status == 405
    assert call(port, "POST", "/latest/meta-data/", {"Content-Length": "0"}).status == 405


def test_imdsv1_served_when_tokens_optional(port: int) -> None:
    reply = call(port, "GET", "/latest/meta-data/instance-id")
    assert (reply.status, reply.body) == (200, b"i-0123456789abcdef0")


def test_imdsv1_refused_when_tokens_required(make_sim: Factory) -> None:
    _, port = make_sim(http_tokens="required")
    assert call(port, "GET", "/latest/meta-data/instance-id").status == 401
    token = get_token(port)
    reply = call(port, "GET", "/latest/meta-data/instance-id", {TOKEN_HEADER: token})
    assert (reply.status, reply.body) == (200, b"i-0123456789abcdef0")


def test_tokened_get_served_and_bad_token_refused(port: int) -> None:
    token = get_token(port)
    assert call(port, "GET", "/latest/meta-data/", {TOKEN_HEADER: token}).status == 200
    # An invalid token is refused even though IMDSv1 is allowed.
    assert call(port, "GET", "/latest/meta-data/", {TOKEN_HEADER: "bogus"}).status == 401
    assert call(port, "GET", "/latest/meta-data/", {TOKEN_HEADER: ""}).status == 401


def test_token_expires_after_ttl(port: int, clock: FakeClock) -> None:
    token = get_token(port, ttl=10)
    clock.advance(9.5)
    assert call(port, "GET", "/latest/meta-data/", {TOKEN_HEADER: token}).status == 200
    clock.advance(0.5)
    assert call(port, "GET", "/latest/meta-data/", {TOKEN_HEADER: token}).status == 401


# -- metadata tree --------------------------------------------------------------


def test_listings(make_sim: Factory) -> None:
    _, port = make_sim(instance_id="i-0aaaabbbbccccdddd", region="eu-west-1")
    versions = call(port, "GET", "/").body.split(b"\n")
    assert versions[0] == b"1.0" and versions[-1] == b"latest"
    for dated in (b"2007-01-19", b"2009-04-04", b"2016-09-02", b"2018-09-24", b"2021-03-23"):
        assert dated in versions
    assert versions[:-1] == sorted(versions[:-1])
    for path in ("/latest", "/latest/"):
        assert call(port, "GET", path).body.split(b"\n") == [b"dynamic", b"meta-data"]
    for path in ("/latest/meta-data", "/latest/meta-data/"):
        reply = call(port, "GET", path)
        assert reply.status == 200
        entries = reply.body.decode().split("\n")
        for name in ("ami-id", "hostname", "instance-id", "local-ipv4", "iam/", "placement/"):
            assert name in entries
        assert "" not in entries
    assert call(port, "GET", "/latest/meta-data/iam/").body.split(b"\n") == [
        b"info",
        b"security-credentials/",
    ]
    placement = call(port, "GET", "/latest/meta-data/placement").body.split(b"\n")
    assert placement == [b"availability-zone", b"availability-zone-id", b"region"]
    assert call(port, "GET", "/latest/meta-data/placement/availability-zone-id").body == b"euw1-az1"
    assert call(port, "GET", "/latest/meta-data/placement/region").body == b"eu-west-1"
    assert call(port, "GET", "/latest/meta-data/placement/availability-zone").body == b"eu-west-1a"
    assert call(port, "GET", "/latest/meta-data/instance-id").body == b"i-0aaaabbbbccccdddd"
    assert call(port, "GET", "/latest/meta-data/ami-id").body.startswith(b"ami-")
    assert call(port, "GET", "/latest/meta-data/local-ipv4").body == b"172.31.16.5"
    hostname = call(port, "GET", "/latest/meta-data/hostname").body
    assert hostname == b"ip-172-31-16-5.eu-west-1.compute.internal"
    for path in ("/latest/meta-data/iam/security-credentials", CREDS_PATH.rsplit("/", 1)[0] + "/"):
        assert call(port, "GET", path).body == DEFAULT_ROLE.encode()


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/latest/meta-data/nope",
        "/latest/meta-data/iam/security-credentials/other-role",
        "/2009-04-05/meta-data/instance-id",
        "/2009-04-04/meta-data/iam/info",  # iam/ appeared in 2012-01-12
        "/2016-09-02/meta-data/placement/availability-zone-id",  # 2019-10-01
        "/latest/meta-data/instance-id/x",
    ],
)
def test_unknown_paths_are_404(port: int, path: str) -> None:
    reply = call(port, "GET", path)
    assert reply.status == 404
    assert reply.headers["content-type"] == "text/html"
    assert b"404 - Not Found" in reply.body


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/placement/availability-zone/",  # botocore's region fetcher
        "/latest//meta-data/placement/availability-zone",  # amazon-ec2-utils' ec2-metadata
        "//latest/meta-data//placement//availability-zone//",
        "/2009-04-04/meta-data/placement/availability-zone/",
    ],
)
def test_trailing_slash_and_empty_segments_are_tolerated(port: int, path: str) -> None:
    reply = call(port, "GET", path)
    assert (reply.status, reply.body) == (200, b"us-east-1a")


def test_dated_versions_show_what_existed_then(port: int) -> None:
    for version in ("1.0", "2009-04-04", "2016-09-02", "2021-03-23", "latest"):
        assert call(port, "GET", f"/{version}/meta-data/instance-id").body == b"i-0123456789abcdef0"

    def entries(version: str) -> list[str]:
        return call(port, "GET", f"/{version}/meta-data/").body.decode().split("\n")

    old, mid, latest = entries("2009-04-04"), entries("2016-09-02"), entries("latest")
    assert "iam/" not in old and "network/" not in old and "mac" not in old
    assert {"iam/", "network/", "mac", "services/", "metrics/", "profile"} <= set(mid)
    assert "events/" not in mid and "identity-credentials/" not in mid
    assert {"events/", "identity-credentials/", "instance-life-cycle", "ipv6"} <= set(latest)
    assert set(old) < set(mid) < set(latest)
    assert call(port, "GET", "/1.0/").body.split(b"\n") == [b"meta-data"]
    assert call(port, "GET", "/2009-04-04").body.split(b"\n") == [b"dynamic", b"meta-data"]
    placement = call(port, "GET", "/2016-09-02/meta-data/placement/").body
    assert placement == b"availability-zone"


def test_network_interfaces_agree_with_the_rest(port: int) -> None:
    def get(path: str) -> str:
        reply = call(port, "GET", "/latest/meta-data/" + path)
        assert reply.status == 200, path
        return reply.body.decode()

    mac = get("mac")
    assert get("network/interfaces/macs/").split("\n") == [mac + "/"]
    nic = f"network/interfaces/macs/{mac}/"
    names = get(nic).split("\n")
    for name in (
        "device-number", "interface-id", "local-ipv4s", "mac", "owner-id", "subnet-id",
        "vpc-id", "vpc-ipv4-cidr-block", "vpc-ipv4-cidr-blocks", "security-group-ids",
        "security-groups", "ipv6s", "subnet-ipv4-cidr-block", "public-ipv4s",
    ):  # fmt: skip
        assert name in names
    assert get(nic + "mac") == mac
    assert get(nic + "device-number") == "0"
    assert get(nic + "local-ipv4s") == get("local-ipv4")
    assert get(nic + "ipv6s") == get("ipv6")
    assert get(nic + "public-ipv4s") == get("public-ipv4")
    assert get(nic + "local-hostname") == get("local-hostname")
    assert get(nic + "security-groups") == get("security-groups")
    assert get(nic + "interface-id").startswith("eni-")
    assert get(nic + "subnet-id").startswith("subnet-")
    assert get(nic + "vpc-id").startswith("vpc-")
    assert get(nic + "security-group-ids").startswith("sg-")
    doc = call(port, "GET", "/latest/dynamic/instance-identity/document").json()
    assert get(nic + "owner-id") == doc["accountId"]
    subnet = ipaddress.ip_network(get(nic + "subnet-ipv4-cidr-block"))
    vpc = ipaddress.ip_network(get(nic + "vpc-ipv4-cidr-block"))
    assert ipaddress.ip_address(get("local-ipv4")) in subnet and subnet.subnet_of(vpc)
    v6subnet = ipaddress.ip_network(get(nic + "subnet-ipv6-cidr-blocks"))
    assert ipaddress.ip_address(get("ipv6")) in v6subnet
    assert get(nic + f"ipv4-associations/{get('public-ipv4')}") == get("local-ipv4")
    assert get("public-hostname") == "ec2-203-0-113-25.compute-1.amazonaws.com"


def test_identity_credentials_events_keys_and_dynamic(port: int) -> None:
    base = "/latest/meta-data/"
    info = call(port, "GET", base + "identity-credentials/ec2/info").json()
    assert info["Code"] == "Success" and info["AccountId"] == "123456789012"
    listing = call(port, "GET", base + "identity-credentials/ec2/security-credentials/").body
    assert listing == b"ec2-instance"
    ec2 = call(port, "GET", base + "identity-credentials/ec2/security-credentials/ec2-instance")
    role = call(port, "GET", CREDS_PATH).json()
    assert ec2.json()["AccessKeyId"].startswith("ASIA")
    assert ec2.json()["AccessKeyId"] != role["AccessKeyId"]  # a set of its own
    assert call(port, "GET", base + "events/maintenance/").body == b"history\nscheduled"
    for leaf in ("history", "scheduled"):
        assert call(port, "GET", base + f"events/maintenance/{leaf}").json() == []
    keys = call(port, "GET", base + "public-keys/").body
    assert keys == b"0=imdsguard-demo-key"
    assert call(port, "GET", base + "public-keys/0/").body == b"openssh-key"
    key = call(port, "GET", base + "public-keys/0/openssh-key").body.decode()
    assert re.fullmatch(
        r"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI[A-Za-z0-9+/=]+ imdsguard-demo-key", key
    )
    identity = call(port, "GET", "/latest/dynamic/instance-identity/").body.split(b"\n")
    assert identity == [b"document", b"pkcs7", b"signature", b"rsa2048"]
    for leaf in ("pkcs7", "signature", "rsa2048"):
        body = call(port, "GET", f"/latest/dynamic/instance-identity/{leaf}").body.decode()
        assert all(len(line) <= 64 for line in body.split("\n"))
    assert call(port, "GET", base + "profile").body == b"default-hvm"
    assert call(port, "GET", base + "metrics/").body == b"vhostmd"


def test_optional_parts_can_be_absent(make_sim: Factory) -> None:
    _, port = make_sim(public_ipv4=None, ipv6=None, key_name=None, role=None)
    entries = call(port, "GET", "/latest/meta-data/").body.decode().split("\n")
    for name in ("public-ipv4", "public-hostname", "ipv6", "public-keys/", "iam/"):
        assert name not in entries
    assert "identity-credentials/" in entries  # present with or without a role
    nic = call(port, "GET", "/latest/meta-data/network/interfaces/macs/0e:12:34:56:78:9a/")
    for name in ("ipv6s", "public-ipv4s", "ipv4-associations/", "vpc-ipv6-cidr-blocks"):
        assert name not in nic.body.decode().split("\n")


def test_http_endpoint_disabled_is_403_for_everything(make_sim: Factory) -> None:
    _, port = make_sim(http_endpoint="disabled")
    for method, path in (("PUT", "/latest/api/token"), ("GET", "/"), ("GET", CREDS_PATH)):
        reply = call(port, method, path, {TTL_HEADER: "60"})
        assert reply.status == 403 and b"403 - Forbidden" in reply.body


def test_token_responses_carry_the_hop_limit() -> None:
    sim = ImdsSimulator(SimConfig(hop_limit=2))
    put = sim.respond("PUT", "/latest/api/token", {TTL_HEADER.lower(): "5"})
    assert (put.status, put.hop_limit) == (200, 2)
    assert sim.respond("PUT", "/latest/api/token", {}).hop_limit == 2  # its 400 too
    assert sim.respond("GET", "/latest/meta-data/ami-id", {}).hop_limit is None


def test_token_path_tolerates_slashes_like_the_rest(port: int) -> None:
    reply = call(port, "PUT", "/latest/api/token/", {TTL_HEADER: "60"})
    assert reply.status == 200
    assert call(port, "GET", "/latest/api/token").status == 405


def test_query_string_ignored_and_head_has_no_body(port: int) -> None:
    assert call(port, "GET", "/latest/meta-data/instance-id?x=1").body == b"i-0123456789abcdef0"
    reply = call(port, "HEAD", "/latest/meta-data/instance-id")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers["content-length"] == str(len("i-0123456789abcdef0"))


def test_iam_info_and_identity_document(port: int) -> None:
    info = call(port, "GET", "/latest/meta-data/iam/info").json()
    assert info["Code"] == "Success"
    assert info["InstanceProfileArn"].endswith(f":instance-profile/{DEFAULT_ROLE}")
    assert info["InstanceProfileId"].startswith("AIPA")
    parse_ts(info["LastUpdated"])
    doc = call(port, "GET", "/latest/dynamic/instance-identity/document").json()
    assert doc["instanceId"] == "i-0123456789abcdef0"
    assert doc["region"] == "us-east-1"
    assert doc["availabilityZone"] == "us-east-1a"
    assert {"accountId", "imageId", "instanceType", "privateIp", "pendingTime"} <= set(doc)


def test_credentials_document(port: int) -> None:
    creds = call(port, "GET", CREDS_PATH).json()
    assert list(creds) == [
        "Code",
        "LastUpdated",
        "Type",
        "AccessKeyId",
        "SecretAccessKey",
        "Token",
        "Expiration",
    ]
    assert creds["Code"] == "Success"
    assert creds["Type"] == "AWS-HMAC"
    assert re.fullmatch(r"ASIA[A-Z0-9]{16}", creds["AccessKeyId"])
    assert len(creds["SecretAccessKey"]) == 40
    assert len(creds["Token"]) > 100
    lifetime = parse_ts(creds["Expiration"]) - parse_ts(creds["LastUpdated"])
    assert lifetime.total_seconds() == pytest.approx(3600, abs=1)


def test_credentials_rotate_before_expiry(port: int, clock: FakeClock) -> None:
    first = call(port, "GET", CREDS_PATH).json()
    clock.advance(3600 - 300 - 1)
    assert call(port, "GET", CREDS_PATH).json() == first
    clock.advance(2)  # now within five minutes of expiry
    second = call(port, "GET", CREDS_PATH).json()
    assert second["AccessKeyId"] != first["AccessKeyId"]
    assert second["SecretAccessKey"] != first["SecretAccessKey"]
    assert second["Token"] != first["Token"]
    assert parse_ts(second["Expiration"]) > datetime.now(timezone.utc)
    assert parse_ts(second["Expiration"]) > parse_ts(first["Expiration"])
    assert parse_ts(second["LastUpdated"]) > parse_ts(first["LastUpdated"])
    clock.advance(100000)  # long expired: a fresh set, valid from now
    third = call(port, "GET", CREDS_PATH).json()
    assert third["AccessKeyId"] not in (first["AccessKeyId"], second["AccessKeyId"])
    assert (parse_ts(third["Expiration"]) - parse_ts(third["LastUpdated"])).total_seconds() == (
        pytest.approx(3600, abs=1)
    )


def test_short_credential_lifetime_still_gives_stable_sets(
    make_sim: Factory, clock: FakeClock
) -> None:
    _, port = make_sim(credential_lifetime=60)
    first = call(port, "GET", CREDS_PATH).json()["AccessKeyId"]
    clock.advance(29)
    assert call(port, "GET", CREDS_PATH).json()["AccessKeyId"] == first
    clock.advance(2)
    assert call(port, "GET", CREDS_PATH).json()["AccessKeyId"] != first


def test_custom_role_and_no_role(make_sim: Factory) -> None:
    _, port = make_sim(role="app-role")
    assert call(port, "GET", "/latest/meta-data/iam/security-credentials/").body == b"app-role"
    path = "/latest/meta-data/iam/security-credentials/app-role"
    assert call(port, "GET", path).status == 200
    assert call(port, "GET", CREDS_PATH).status == 404

    _, port = make_sim(role=None)
    assert call(port, "GET", "/latest/meta-data/iam/security-credentials/").status == 404
    assert call(port, "GET", "/latest/meta-data/iam/").status == 404
    assert call(port, "GET", CREDS_PATH).status == 404
    assert b"iam/" not in call(port, "GET", "/latest/meta-data/").body.split(b"\n")


def test_user_data(make_sim: Factory) -> None:
    _, port = make_sim()
    assert call(port, "GET", "/latest/user-data").status == 404
    _, port = make_sim(user_data=b"#!/bin/sh\necho hello\n")
    reply = call(port, "GET", "/latest/user-data")
    assert (reply.status, reply.body) == (200, b"#!/bin/sh\necho hello\n")
    assert b"user-data" in call(port, "GET", "/latest/").body.split(b"\n")


def test_respond_without_sockets() -> None:
    sim = ImdsSimulator(SimConfig(http_tokens="required"))
    assert sim.respond("GET", "/latest/meta-data/", {}).status == 401
    put = sim.respond("PUT", "/latest/api/token", {TTL_HEADER.lower(): "5"})
    assert put.status == 200
    token = put.body.decode()
    assert sim.token_valid(token)
    reply = sim.respond("GET", "/latest/meta-data/ami-id", {TOKEN_HEADER.lower(): token})
    assert reply.status == 200


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="http_tokens"):
        SimConfig(http_tokens="sometimes")
    with pytest.raises(ValueError, match="credential_lifetime"):
        SimConfig(credential_lifetime=0)
    with pytest.raises(ValueError, match="http_endpoint"):
        SimConfig(http_endpoint="off")
    for hops in (0, 65, True):
        with pytest.raises(ValueError, match="hop_limit"):
            SimConfig(hop_limit=hops)
    with pytest.raises(ValueError, match="fault"):
        Fault("explode")
    with pytest.raises(ValueError):
        Fault.from_json({"fault": "500", "paths": "/latest"})


# -- faults ---------------------------------------------------------------------


def test_fault_500_respects_paths(make_sim: Factory) -> None:
    sim, port = make_sim()
    sim.set_fault("500", paths=["/latest/meta-data/iam/"])
    reply = call(port, "GET", CREDS_PATH)
    assert reply.status == 500
    assert b"500 - Internal Server Error" in reply.body
    assert call(port, "GET", "/latest/meta-data/instance-id").status == 200
    sim.set_fault("500")
    assert call(port, "PUT", "/latest/api/token", {TTL_HEADER: "60"}).status == 500
    sim.clear_fault()
    assert call(port, "GET", CREDS_PATH).status == 200


def test_fault_timeout(make_sim: Factory) -> None:
    sim, port = make_sim()
    sim.set_fault("timeout", delay=0.3)
    with pytest.raises(socket.timeout):
        call(port, "GET", "/latest/meta-data/instance-id", timeout=0.1)
    start = time.monotonic()
    reply = call(port, "GET", "/latest/meta-data/instance-id", timeout=3)
    assert time.monotonic() - start >= 0.25
    assert reply.status == 200
    assert Fault("timeout").effective_delay() == 10.0


def test_fault_truncate(make_sim: Factory) -> None:
    sim, port = make_sim()
    sim.set_fault("truncate")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", CREDS_PATH)
        resp = conn.getresponse()
        assert resp.status == 200
        full = int(resp.getheader("Content-Length") or 0)
        with pytest.raises(http.client.IncompleteRead) as excinfo:
            resp.read()
        assert len(excinfo.value.partial) == full // 2
    finally:
        conn.close()


def test_fault_reset(make_sim: Factory) -> None:
    sim, port = make_sim()
    sim.set_fault("reset", paths=["/latest/api/token"])
    with pytest.raises(ConnectionResetError):
        call(port, "PUT", "/latest/api/token", {TTL_HEADER: "60"})
    assert call(port, "GET", "/latest/meta-data/instance-id").status == 200
    statuses = [(r["path"], r["status"], r.get("fault")) for r in sim.records()]
    assert ("/latest/api/token", None, "reset") in statuses


def test_fault_expire_tokens(make_sim: Factory) -> None:
    sim, port = make_sim()
    old = get_token(port)
    sim.set_fault("expire-tokens")
    assert call(port, "GET", "/latest/meta-data/", {TOKEN_HEADER: old}).status == 401
    new = get_token(port)
    assert call(port, "GET", "/latest/meta-data/", {TOKEN_HEADER: new}).status == 200


def test_control_file_reloaded_on_change(make_sim: Factory, tmp_path: Path) -> None:
    control = tmp_path / "control.json"
    sim, port = make_sim(control_file=str(control))
    assert call(port, "GET", "/latest/meta-data/instance-id").status == 200

    control.write_text(json.dumps({"fault": "500", "paths": ["/latest/meta-data/"]}))
    assert call(port, "GET", "/latest/meta-data/instance-id").status == 500
    assert call(port, "GET", "/latest/dynamic/instance-identity/document").status == 200

    control.write_text(json.dumps({"fault": None}))
    assert call(port, "GET", "/latest/meta-data/instance-id").status == 200

    token = get_token(port)
    control.write_text(json.dumps({"fault": "expire-tokens"}))
    assert call(port, "GET", "/latest/meta-data/", {TOKEN_HEADER: token}).status == 401

    control.write_text(json.dumps({"fault": 500}))
    assert call(port, "GET", "/latest/meta-data/").status == 500
    control.write_text("{not json")  # a bad file keeps the fault in force
    assert call(port, "GET", "/latest/meta-data/").status == 500
    control.unlink()
    assert call(port, "GET", "/latest/meta-data/").status == 200
    assert sim.fault is None


# -- request log ------------------------------------------------------------------


def test_request_log_never_holds_tokens(make_sim: Factory, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    sim, port = make_sim(request_log=str(log))
    token = get_token(port)
    call(port, "GET", CREDS_PATH, {TOKEN_HEADER: token})
    call(port, "GET", "/latest/meta-data/instance-id")
    call(port, "GET", "/latest/meta-data/", {TOKEN_HEADER: "not-a-token"})

    text = log.read_text()
    assert token not in text
    assert "not-a-token" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == 4 == sim.request_count
    for record in records:
        assert {"ts", "method", "path", "client", "token", "status"} <= set(record)
        assert record["client"] == "127.0.0.1"
    summary = [(r["method"], r["path"], r["token"], r["status"]) for r in records]
    assert summary == [
        ("PUT", "/latest/api/token", False, 200),
        ("GET", CREDS_PATH, True, 200),
        ("GET", "/latest/meta-data/instance-id", False, 200),
        ("GET", "/latest/meta-data/", True, 401),
    ]
    assert sim.count_for("/latest/meta-data/iam/") == 1
    sim.reset_counters()
    assert sim.request_count == 0
    assert sim.records() == []


# -- listeners and the command line ---------------------------------------------


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_ipv6_and_ipv4_listeners_share_state(clock: FakeClock) -> None:
    with ImdsSimulator(SimConfig(), clock=clock) as sim:
        bound = sim.serve([("127.0.0.1", 0), ("[::1]", 0)])
        assert [host for host, _ in bound] == ["127.0.0.1", "::1"]
        (_, v4_port), (_, v6_port) = bound
        token = get_token(v6_port, host="::1")
        reply = call(v4_port, "GET", "/latest/meta-data/instance-id", {TOKEN_HEADER: token})
        assert reply.status == 200
        assert sim.records()[0]["client"] == "::1"


def test_shutdown_is_prompt_with_idle_keepalive_connection(clock: FakeClock) -> None:
    sim = ImdsSimulator(SimConfig(), clock=clock)
    [(_, port)] = sim.serve([("127.0.0.1", 0)])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    conn.request("GET", "/latest/meta-data/")
    conn.getresponse().read()
    start = time.monotonic()
    sim.shutdown()
    conn.close()
    assert time.monotonic() - start < 2


def test_parse_listen() -> None:
    assert parse_listen("169.254.169.254:80") == ("169.254.169.254", 80)
    assert parse_listen("[fd00:ec2::254]:80") == ("fd00:ec2::254", 80)
    assert format_listen("fd00:ec2::254", 80) == "[fd00:ec2::254]:80"
    assert format_listen("127.0.0.1", 0) == "127.0.0.1:0"
    for bad in ("fd00:ec2::254:80", "127.0.0.1", "127.0.0.1:99999", "[::1]"):
        with pytest.raises(Exception, match="invalid"):
            parse_listen(bad)


def test_main_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["--listen", "nowhere"]) == 2
    assert main(["--listen", "127.0.0.1:0", "--credential-lifetime", "0"]) == 2
    assert main(["--listen", "127.0.0.1:0", "--user-data-file", "/nonexistent/x"]) == 2
    assert main(["--listen", "127.0.0.1:0", "--http-put-response-hop-limit", "0"]) == 2
    assert main(["--listen", "127.0.0.1:0", "--http-endpoint", "off"]) == 2
    capsys.readouterr()


def test_main_runs_until_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    log = tmp_path / "requests.jsonl"
    user_data = tmp_path / "user-data"
    user_data.write_bytes(b"hello")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    cmd = [
        sys.executable,
        "-m",
        "imdsguard_testing.imds_sim",
        "--listen",
        "127.0.0.1:0",
        "--http-tokens",
        "required",
        "--no-role",
        "--instance-id",
        "i-0feedfacecafebeef",
        "--user-data-file",
        str(user_data),
        "--request-log",
        str(log),
        "--ready-file",
        str(ready),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "simulator never became ready"
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid
        [address] = info["listen"]
        host, port = parse_listen(address)
        assert host == "127.0.0.1"

        assert call(port, "GET", "/latest/meta-data/instance-id").status == 401
        token = get_token(port)
        headers = {TOKEN_HEADER: token}
        assert call(port, "GET", "/latest/meta-data/instance-id", headers).body == (
            b"i-0feedfacecafebeef"
        )
        assert call(port, "GET", "/latest/user-data", headers).body == b"hello"
        assert call(port, "GET", CREDS_PATH, headers).status == 404

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert not ready.exists()
    assert len(log.read_text().splitlines()) == 5
    assert token not in log.read_text()
