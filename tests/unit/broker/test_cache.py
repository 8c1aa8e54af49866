"""The broker's credential cache: refresh schedule, never expired, static stability."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from imdsguard.broker.cache import CredentialCache, Refresher, RefreshPolicy
from imdsguard.errors import ImdsError
from imdsguard.imds import Credentials, ImdsClient
from imdsguard_testing.imds_sim import ImdsSimulator, SimConfig

T0 = 1_700_000_000.0


class FakeClock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Source:
    """A fetch function handing out credentials issued "now" with ``lifetime``."""

    def __init__(self, clock: FakeClock, lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.fail: Exception | None = None
        self.same = False
        self.last: Credentials | None = None

    def __call__(self) -> Credentials:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        if self.same and self.last is not None:
            return self.last
        now = self.clock()
        self.last = Credentials(
            role="role",
            access_key_id=f"ASIA{self.calls:016d}",
            secret_access_key=f"secret-{self.calls}",
            session_token=f"token-{self.calls}",
            expiration=now + self.lifetime,
            last_updated=now,
        )
        return self.last


class Recorder:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return log


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, source: Source, jitter: float = 0.0, **policy: float) -> CredentialCache:
    return CredentialCache(
        source, RefreshPolicy(**policy), clock=clock, rand=lambda: jitter, logger=Recorder()
    )


def fetched_at(cache: CredentialCache, source: Source, clock: FakeClock, offset: float) -> bool:
    """Move to T0 + offset, run the refresher's step; whether it fetched."""
    clock.now = T0 + offset
    before = source.calls
    cache.step()
    return source.calls > before


@pytest.mark.parametrize(
    ("lifetime", "refresh_at"),
    [
        (3600, 2700),  # 1 h: 15 minutes before expiry comes before 80%
        (6 * 3600, 0.8 * 6 * 3600),  # 6 h: 80% of the lifetime comes first
        (20, 10),  # short-lived (tests): "15 minutes before" becomes half the lifetime
    ],
)
def test_refresh_ahead_of_expiry(clock: FakeClock, lifetime: float, refresh_at: float) -> None:
    source = Source(clock, lifetime)
    cache = make(clock, source)
    assert fetched_at(cache, source, clock, 0)
    assert not fetched_at(cache, source, clock, refresh_at - 1)
    assert fetched_at(cache, source, clock, refresh_at)
    current = cache.current()
    assert current is not None
    assert current.secret_access_key == "secret-2"  # noqa: S105 - a fake


def test_jitter_refreshes_early_by_a_bounded_amount(clock: FakeClock) -> None:
    source = Source(clock)
    cache = make(clock, source, jitter=0.999)
    cache.step()
    # Up to 10% of the 2,700 s wait, capped at 120 s.
    assert not fetched_at(cache, source, clock, 2700 - 121)
    assert fetched_at(cache, source, clock, 2700 - 119)


def test_never_served_expired(clock: FakeClock) -> None:
    source = Source(clock)
    cache = make(clock, source)
    cache.step()
    source.fail = ImdsError("IMDS GET ... answered HTTP 500")
    for offset in range(2700, 3600, 7):
        clock.now = T0 + offset
        cache.step()
        served = cache.current()
        if offset < 3600 - 60:
            assert served is not None, offset
            assert served.expiration - clock() >= 60
        else:
            assert served is None, offset
    health = cache.health()
    assert health["status"] == "unavailable"
    assert not health["healthy"]
    assert "HTTP 500" in health["last_error"]


def test_short_lifetimes_scale_the_serving_margin(clock: FakeClock) -> None:
    source = Source(clock, lifetime=20)
    cache = make(clock, source)
    cache.step()
    source.fail = ImdsError("down")
    clock.now = T0 + 17.9
    assert cache.current() is not None
    clock.now = T0 + 18.0  # 10% of 20 s before expiry
    assert cache.current() is None


def test_failures_back_off_exponentially_with_a_cap(clock: FakeClock) -> None:
    source = Source(clock)
    cache = make(clock, source, jitter=0.999)
    source.fail = ImdsError("IMDS down")
    waits = []
    for _ in range(9):
        cache.step()
        waits.append(round(cache._due - clock(), 1))
        clock.now = cache._due
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    # Jitter spreads retries over [half, full] of each wait.
    low = make(clock, Source(clock), jitter=0.0)
    low._fetch = source
    low.step()
    assert round(low._due - clock(), 2) == 0.5


def test_static_stability_serves_cached_and_reports_degraded(clock: FakeClock) -> None:
    source = Source(clock)
    cache = make(clock, source)
    cache.step()
    first = cache.current()
    source.fail = ImdsError("IMDS GET /latest/meta-data/iam/security-credentials/ timed out")
    assert fetched_at(cache, source, clock, 2700)
    assert cache.current() is first
    health = cache.health()
    assert health["status"] == "degraded"
    assert health["healthy"] is False
    assert health["consecutive_failures"] == 1
    assert "timed out" in health["last_error"]
    log = cache._log
    assert isinstance(log, Recorder)
    failed = [f for lvl, e, f in log.lines if e == "credentials_refresh_failed"]
    assert failed
    assert failed[-1]["serving_cached_until"] == "2023-11-14T23:12:20Z"  # expiry - 60 s
    source.fail = None
    clock.now = cache._due
    cache.step()
    assert cache.health()["status"] == "ok"
    renewed = cache.current()
    assert renewed is not None
    assert renewed is not first


def test_unexpected_exceptions_do_not_crash_or_leak(clock: FakeClock) -> None:
    source = Source(clock)
    cache = make(clock, source)
    source.fail = KeyError("SecretAccessKey=abc123")
    cache.step()
    assert cache.health()["last_error"] == "unexpected KeyError while fetching credentials"


def test_same_credentials_from_imds_are_rechecked(clock: FakeClock) -> None:
    source = Source(clock)
    cache = make(clock, source)
    cache.step()
    source.same = True  # IMDS rotates only minutes before expiry
    assert fetched_at(cache, source, clock, 2700)
    assert cache.health()["status"] == "ok"
    # Asked again a minute later, not in a loop, not only at expiry.
    assert not fetched_at(cache, source, clock, 2700 + 59)
    assert fetched_at(cache, source, clock, 2700 + 60)
    source.same = False
    assert fetched_at(cache, source, clock, 2700 + 120)
    served = cache.current()
    assert served is not None
    assert served.expiration == clock() + 3600


def test_requests_trigger_fetches_at_a_limited_rate(clock: FakeClock) -> None:
    source = Source(clock)
    cache = make(clock, source, retry_base=10)
    source.fail = ImdsError("down")
    cache.step()  # failed at T0; the backoff says T0 + 5
    assert cache._due == T0 + 5
    for _ in range(100):
        cache.request_refresh()  # a waiting client: sooner, but not before T0 + 1
    assert cache._due == T0 + 1
    assert not fetched_at(cache, source, clock, 0.9)
    assert fetched_at(cache, source, clock, 1.0)
    clock.advance(0.5)
    cache.request_refresh()
    assert cache._due == T0 + 2


def test_wait_current_waits_for_the_refresher(clock: FakeClock) -> None:
    gate = threading.Event()
    source = Source(clock)

    def slow() -> Credentials:
        gate.wait(2)
        return source()

    cache = CredentialCache(slow, RefreshPolicy(request_wait=2), clock=clock)
    refresher = Refresher(cache)
    refresher.start()
    try:
        threading.Timer(0.2, gate.set).start()
        start = time.monotonic()
        creds = cache.wait_current()
        assert creds is not None
        assert 0.15 < time.monotonic() - start < 1.5
    finally:
        refresher.stop()


def test_wait_current_gives_up_after_request_wait(clock: FakeClock) -> None:
    source = Source(clock)
    source.fail = ImdsError("down")
    cache = CredentialCache(source, RefreshPolicy(request_wait=0.3), clock=clock)
    refresher = Refresher(cache)
    refresher.start()
    try:
        start = time.monotonic()
        assert cache.wait_current() is None
        assert 0.25 < time.monotonic() - start < 1.0
    finally:
        refresher.stop()


# -- against the simulated IMDS: every fault kind


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[tuple[ImdsSimulator, ImdsClient]]:
    simulator = ImdsSimulator(SimConfig(http_tokens="required"), clock=clock, wall_clock=clock)
    [(host, port)] = simulator.serve([("127.0.0.1", 0)])
    client = ImdsClient(f"http://{host}:{port}", timeout=0.3, token_ttl=21600, clock=clock)
    yield simulator, client
    simulator.shutdown()


@pytest.mark.parametrize("fault", ["500", "timeout", "truncate", "reset"])
def test_static_stability_under_imds_faults(
    clock: FakeClock, sim: tuple[ImdsSimulator, ImdsClient], fault: str
) -> None:
    simulator, client = sim
    cache = CredentialCache(client.role_credentials, clock=clock, rand=lambda: 0.0)
    cache.step()
    first = cache.current()
    assert first is not None
    simulator.set_fault(fault, delay=1.0 if fault == "timeout" else None)
    # From the refresh point to shortly before expiry, every attempt fails and
    # the cached set keeps being served.
    clock.now = first.expiration - 900
    while clock() < first.expiration - 61:
        cache.step()
        assert cache.current() is first
        assert cache.health()["status"] == "degraded"
        clock.now = max(cache._due, clock() + 90)
    assert cache.health()["consecutive_failures"] >= 5
    clock.now = first.expiration - 59
    assert cache.current() is None
    assert cache.health()["status"] == "unavailable"
    # IMDS recovers: the next attempt gets the rotated set.
    simulator.clear_fault()
    clock.now = cache._due
    cache.step()
    renewed = cache.current()
    assert renewed is not None
    assert renewed.expiration > first.expiration
    assert cache.health()["status"] == "ok"


def test_revoked_token_is_transparent(
    clock: FakeClock, sim: tuple[ImdsSimulator, ImdsClient]
) -> None:
    simulator, client = sim
    cache = CredentialCache(client.role_credentials, clock=clock, rand=lambda: 0.0)
    cache.step()
    simulator.set_fault("expire-tokens")  # 401 on the cached token: renewed, retried
    clock.advance(3600 - 290)  # IMDS has rotated (5 minutes before expiry)
    cache.step()
    assert cache.health()["status"] == "ok"
    assert cache.health()["consecutive_failures"] == 0
    assert [r["status"] for r in simulator.records()].count(401) == 1
