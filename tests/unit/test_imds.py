"""The IMDS client against the simulated IMDS on loopback (never the real one)."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Callable

import pytest

from imdsguard.errors import ImdsError
from imdsguard.imds import (
    CREDENTIALS_PATH,
    TOKEN_PATH,
    Credentials,
    ImdsClient,
    ImdsRequestError,
    _Connection,
    format_time,
    parse_time,
)
from imdsguard_testing.clock import FakeClock
from imdsguard_testing.imds_sim import DEFAULT_ROLE, ImdsSimulator, SimConfig

CREDS = CREDENTIALS_PATH + DEFAULT_ROLE


Factory = Callable[..., tuple[ImdsSimulator, str]]


@pytest.fixture
def make_sim(start_sim: Factory, clock: FakeClock) -> Factory:
    """Simulators on ``host`` (default 127.0.0.1) with these SimConfig fields, on ``clock``."""

    def make(host: str = "127.0.0.1", **kwargs: Any) -> tuple[ImdsSimulator, str]:
        return start_sim(SimConfig(**kwargs), host, clock)

    return make


@pytest.fixture
def sim_url(make_sim: Factory) -> tuple[ImdsSimulator, str]:
    return make_sim(http_tokens="required")


def test_token_is_cached_across_requests(
    sim_url: tuple[ImdsSimulator, str], clock: FakeClock
) -> None:
    sim, url = sim_url
    client = ImdsClient(url, clock=clock)
    for _ in range(5):
        assert client.get_text("/latest/meta-data/instance-id") == "i-0123456789abcdef0"
    assert sim.count_for(TOKEN_PATH) == 1
    assert client.request_count == 6
    assert all(r["token"] for r in sim.records() if r["path"] != TOKEN_PATH)


def test_token_renewed_before_its_ttl(sim_url: tuple[ImdsSimulator, str], clock: FakeClock) -> None:
    sim, url = sim_url
    client = ImdsClient(url, token_ttl=100, clock=clock)
    client.get_text("/latest/meta-data/instance-id")
    clock.advance(85)  # 15 s before expiry: still within the renewal margin (10% of TTL)
    client.get_text("/latest/meta-data/instance-id")
    assert sim.count_for(TOKEN_PATH) == 1
    clock.advance(6)  # 9 s left: renewed before IMDS would refuse it
    client.get_text("/latest/meta-data/instance-id")
    assert sim.count_for(TOKEN_PATH) == 2
    assert all(r["status"] == 200 for r in sim.records())  # never a 401


def test_401_drops_the_token_and_retries_once(sim_url: tuple[ImdsSimulator, str]) -> None:
    sim, url = sim_url
    client = ImdsClient(url)
    client.get_text("/latest/meta-data/instance-id")
    sim.expire_tokens()  # as when IMDS restarts or the token outlives its TTL
    assert client.get_text("/latest/meta-data/instance-id") == "i-0123456789abcdef0"
    statuses = [(r["path"], r["status"]) for r in sim.records()]
    assert statuses[-3:] == [
        ("/latest/meta-data/instance-id", 401),
        (TOKEN_PATH, 200),
        ("/latest/meta-data/instance-id", 200),
    ]


def test_persistent_401_is_reported_not_looped(sim_url: tuple[ImdsSimulator, str]) -> None:
    sim, url = sim_url
    client = ImdsClient(url)
    sim.token_valid = lambda token: False  # type: ignore[method-assign] # IMDS takes no token
    with pytest.raises(ImdsRequestError) as info:
        client.get_text("/latest/meta-data/instance-id")
    assert info.value.kind == "http"
    assert info.value.status == 401
    assert sim.count_for("/latest/meta-data/instance-id") == 2  # one retry only


def test_imdsv1_probe(make_sim: Factory) -> None:
    _, optional = make_sim(http_tokens="optional")
    _, required = make_sim(http_tokens="required")
    assert ImdsClient(optional).imdsv1_enabled() is True
    assert ImdsClient(required).imdsv1_enabled() is False
    assert ImdsClient(optional).get_text("/latest/meta-data/ami-id", token=False).startswith("ami-")


def test_role_discovery_and_credentials(
    sim_url: tuple[ImdsSimulator, str], clock: FakeClock
) -> None:
    sim, url = sim_url
    client = ImdsClient(url)
    assert client.role_name() == DEFAULT_ROLE
    creds = client.role_credentials()
    doc = sim.current_credentials()
    assert creds.role == DEFAULT_ROLE
    assert creds.access_key_id == doc["AccessKeyId"]
    assert creds.secret_access_key == doc["SecretAccessKey"]
    assert creds.session_token == doc["Token"]
    assert format_time(creds.expiration) == doc["Expiration"]
    assert creds.last_updated is not None
    assert abs(creds.expiration - creds.last_updated - 3600) < 1
    out = creds.process_output()
    assert out == {
        "Version": 1,
        "AccessKeyId": doc["AccessKeyId"],
        "SecretAccessKey": doc["SecretAccessKey"],
        "SessionToken": doc["Token"],
        "Expiration": doc["Expiration"],
    }
    # Secrets never show in a repr (logs, tracebacks).
    assert doc["SecretAccessKey"] not in repr(creds)
    assert doc["Token"] not in repr(creds)
    assert client._token is not None
    assert client._token not in repr(client)


def test_no_role_is_a_clear_error(make_sim: Factory) -> None:
    _, url = make_sim(role=None)
    with pytest.raises(ImdsRequestError, match="no IAM role is attached") as info:
        ImdsClient(url).role_credentials()
    assert info.value.kind == "no-role"


def test_ipv6_base_url(make_sim: Factory) -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    sim, url = make_sim("::1", http_tokens="required")
    assert url.startswith("http://[::1]:")
    assert ImdsClient(url).role_name() == DEFAULT_ROLE
    assert sim.records()[0]["client"] == "::1"


@pytest.mark.parametrize(
    ("fault", "kind"),
    [("500", "http"), ("truncate", "truncated"), ("reset", "connection"), ("timeout", "timeout")],
)
def test_faults_become_imds_errors_without_secrets(
    sim_url: tuple[ImdsSimulator, str], fault: str, kind: str
) -> None:
    sim, url = sim_url
    client = ImdsClient(url, timeout=0.3)
    client.token()
    sim.set_fault(fault, paths=[CREDENTIALS_PATH], delay=1.0 if fault == "timeout" else None)
    start = time.monotonic()
    with pytest.raises(ImdsError) as info:
        client.role_credentials(DEFAULT_ROLE)
    assert time.monotonic() - start < 0.9
    assert isinstance(info.value, ImdsRequestError)
    assert info.value.kind == kind, info.value
    text = str(info.value)
    assert CREDS in text  # says what failed
    secrets = sim.current_credentials()
    assert client._token is not None
    for secret in (client._token, secrets["SecretAccessKey"], secrets["Token"]):
        assert secret not in text
        assert secret[:20] not in text


def test_connection_refused_is_an_imds_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(ImdsRequestError, match=r"IMDS PUT /latest/api/token") as info:
            ImdsClient(f"http://127.0.0.1:{port}", timeout=1).token()
    assert info.value.kind == "connection"


def test_oversized_answer_refused(make_sim: Factory) -> None:
    _, url = make_sim(user_data=b"x" * 5000)
    with pytest.raises(ImdsRequestError, match="larger than 4096 bytes"):
        ImdsClient(url, max_body=4096).get_bytes("/latest/user-data")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a socket as another uid needs root")
def test_sockets_created_as_the_owner_uid(sim_url: tuple[ImdsSimulator, str]) -> None:
    """``owner_uid``: the socket belongs to that uid (what the firewall's owner match sees)."""
    _, url = sim_url
    host, port = url[len("http://") :].rsplit(":", 1)
    conn = _Connection(host, int(port), 1.0, 65534)
    conn.connect()
    try:
        assert os.fstat(conn.sock.fileno()).st_uid == 65534
        assert os.geteuid() == 0  # given back at once
    finally:
        conn.close()
    assert ImdsClient(url, owner_uid=65534).role_name() == DEFAULT_ROLE


def test_bad_urls_and_ttls_rejected() -> None:
    with pytest.raises(ValueError, match="http://HOST"):
        ImdsClient("https://169.254.169.254")
    with pytest.raises(ValueError, match="TTL"):
        ImdsClient("http://127.0.0.1:1", token_ttl=0)


# -- documents and times


def _doc(**overrides: object) -> bytes:
    doc: dict[str, object] = {
        "Code": "Success",
        "LastUpdated": "2024-05-01T11:00:00Z",
        "Type": "AWS-HMAC",
        "AccessKeyId": "ASIAEXAMPLE",
        "SecretAccessKey": "s3cr3t-value",
        "Token": "t0ken-value",
        "Expiration": "2024-05-01T17:00:00Z",
    }
    doc.update(overrides)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def test_credentials_document_parsed() -> None:
    creds = Credentials.from_document(_doc(), "role")
    assert creds.expiration == parse_time("2024-05-01T17:00:00Z") == 1714582800
    assert creds.last_updated == 1714582800 - 6 * 3600
    assert creds.process_output()["Expiration"] == "2024-05-01T17:00:00Z"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_doc()[:60], "not valid JSON"),
        (b"[]", "not a JSON object"),
        (_doc(Code="Failure"), "Code 'Failure'"),
        (_doc(SecretAccessKey=None), "lacks SecretAccessKey"),
        (_doc(Token=""), "lacks Token"),
        (_doc(Expiration="tomorrow"), "unreadable Expiration"),
    ],
)
def test_bad_credentials_documents(body: bytes, message: str) -> None:
    with pytest.raises(ImdsRequestError, match=message) as info:
        Credentials.from_document(body, "role")
    assert info.value.kind == "invalid"
    assert "s3cr3t" not in str(info.value)
    assert "t0ken" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("2024-05-01T17:00:00Z", 1714582800),
        ("2024-05-01T17:00:00.250Z", 1714582800.25),
        ("2024-05-01T19:00:00+02:00", 1714582800),
        ("2024-05-01T12:30:00-0430", 1714582800),
        ("2024-05-01 17:00:00", 1714582800),
    ],
)
def test_parse_time(text: str, epoch: float) -> None:
    assert parse_time(text) == epoch


@pytest.mark.parametrize("text", ["", "2024-13-01T00:00:00Z", "2024-05-01", "17:00:00Z"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|month|day|range"):
        parse_time(text)
