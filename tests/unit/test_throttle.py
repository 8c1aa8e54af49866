"""The one rate limiter, with a fake clock."""

from __future__ import annotations

from imdsguard.throttle import IntervalLimiter, TokenBuckets


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_interval_one_line_per_key_then_the_count() -> None:
    clock = FakeClock()
    limiter = IntervalLimiter(10.0, clock=clock)
    assert limiter.allow("a") == (True, 0)
    assert limiter.allow("a") == (False, 0)
    clock.now += 9.9
    assert limiter.allow("a") == (False, 0)
    assert limiter.allow("b") == (True, 0)  # keys are independent
    clock.now += 0.1
    assert limiter.allow("a") == (True, 2)  # two held back since the last line
    assert limiter.allow("a") == (False, 0)


def test_interval_first_line_at_any_clock_value() -> None:
    assert IntervalLimiter(10.0, clock=FakeClock(0.0)).allow() == (True, 0)
    assert IntervalLimiter(10.0).allow(now=-5.0) == (True, 0)


def test_interval_explicit_now_wins_over_the_clock() -> None:
    limiter = IntervalLimiter(10.0, clock=FakeClock(0.0))
    assert limiter.allow("k", now=100.0)[0]
    assert not limiter.allow("k", now=105.0)[0]
    assert limiter.allow("k", now=110.0) == (True, 1)


def test_interval_keys_are_bounded() -> None:
    clock = FakeClock()
    limiter = IntervalLimiter(10.0, max_keys=3, clock=clock)
    for key in range(100):
        assert limiter.allow(key)[0]
        assert not limiter.allow(key)[0]  # a held line for a key keeps it bounded too
    assert len(limiter) == 3
    assert limiter.allow(0)[0]  # pushed out: forgotten, so allowed again


def test_interval_total_caps_all_keys_together() -> None:
    clock = FakeClock()
    limiter = IntervalLimiter(10.0, total=3, clock=clock)
    assert [limiter.allow(k)[0] for k in range(5)] == [True, True, True, False, False]
    clock.now += 10.0
    assert limiter.allow(3) == (True, 1)  # held once by the cap, counted like any other
    assert limiter.allow(4) == (True, 1)
    assert limiter.allow(0) == (True, 0)
    assert not limiter.allow(9)[0]  # the window is full again


def test_interval_total_is_a_sliding_window() -> None:
    clock = FakeClock()
    limiter = IntervalLimiter(10.0, total=2, clock=clock)
    assert limiter.allow("a")[0]
    clock.now += 5
    assert limiter.allow("b")[0]
    assert not limiter.allow("c")[0]
    clock.now += 5  # "a"'s line left the window, "b"'s not
    assert limiter.allow("c")[0]
    assert not limiter.allow("d")[0]


def test_buckets_burst_then_rate() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(burst=3, rate=1.0, clock=clock)
    for _ in range(3):
        assert buckets.has("k")
        buckets.take("k")
    assert not buckets.has("k")
    assert buckets.has("other")
    clock.now += 1.0
    assert buckets.has("k")
    buckets.take("k")
    assert not buckets.has("k")
    clock.now += 100.0
    for _ in range(3):  # refilled to the burst, not beyond
        buckets.take("k")
    assert not buckets.has("k")


def test_buckets_are_bounded_and_forget_the_oldest() -> None:
    buckets = TokenBuckets(burst=1, rate=0.0, max_keys=2, clock=FakeClock())
    for key in ("a", "b", "c"):
        buckets.take(key)
    assert len(buckets) == 2
    assert buckets.has("a")  # pushed out: a fresh budget
    assert not buckets.has("c")


def test_buckets_explicit_now() -> None:
    buckets = TokenBuckets(burst=1, rate=0.5)
    buckets.take("k", now=0.0)
    assert not buckets.has("k", now=1.0)
    assert buckets.has("k", now=2.0)
