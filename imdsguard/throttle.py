"""The one rate limiter: what a flood may cost the log (and the work behind a log line).

Two shapes, both keyed, both bounded LRUs (a flood of new keys pushes out
the oldest, it does not grow memory), both with an injectable clock
(``clock``, default :func:`time.monotonic`, or ``now=`` per call) so every
timing rule is unit-tested without sleeping:

- :class:`TokenBuckets`: ``burst`` at once, then ``rate`` per second, per
  key (the event log's budgets, :class:`imdsguard.events.flows.RateLimiter`).
- :class:`IntervalLimiter`: at most one line per key and ``interval``,
  counting what it held back so the next line can say ``suppressed_before``;
  optionally at most ``total`` lines per ``interval`` over all keys
  (``broker_request``, ``broker_refused``, ``broker_busy``, ``metrics_*``).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Hashable
from typing import Callable

Clock = Callable[[], float]

DEFAULT_MAX_KEYS = 1024


class TokenBuckets:
    """Token buckets by key: ``burst`` at once, then ``rate`` per second (a bounded LRU)."""

    def __init__(
        self,
        burst: float,
        rate: float,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.burst = burst
        self.rate = rate
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: collections.OrderedDict[Hashable, tuple[float, float]] = (
            collections.OrderedDict()
        )

    def _tokens(self, key: Hashable, now: float) -> float:
        tokens, stamp = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - stamp) * self.rate)

    def has(self, key: Hashable, now: float | None = None) -> bool:
        """Whether ``key`` has a token left (takes none)."""
        return self._tokens(key, self.clock() if now is None else now) >= 1

    def take(self, key: Hashable, now: float | None = None) -> None:
        """Take one token from ``key`` (it may go below zero: a debt paid at ``rate``)."""
        now = self.clock() if now is None else now
        tokens = self._tokens(key, now)
        self._buckets.pop(key, None)
        self._buckets[key] = (tokens - 1, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class IntervalLimiter:
    """At most one line per key and ``interval``; counts what it held back (bounded keys).

    ``total``, when given, also caps the lines of all keys together at
    ``total`` per ``interval`` (a sliding window): many keys at once must not
    flood either. A key held back by that cap is counted like one held back
    by its own interval.
    """

    def __init__(
        self,
        interval: float,
        max_keys: int = DEFAULT_MAX_KEYS,
        *,
        total: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._seen: collections.OrderedDict[Hashable, tuple[float, int]] = collections.OrderedDict()
        self._times: collections.deque[float] | None = (
            collections.deque(maxlen=total) if total is not None else None
        )

    def _flooded(self, now: float) -> bool:
        times = self._times
        return (
            times is not None
            and len(times) == times.maxlen
            and (not times or now - times[0] < self.interval)
        )

    def allow(self, key: Hashable = None, now: float | None = None) -> tuple[bool, int]:
        """(log it?, lines held back for ``key`` since its last line)."""
        now = self.clock() if now is None else now
        last, held = self._seen.get(key, (now - self.interval, 0))
        if now - last < self.interval or self._flooded(now):
            self._seen[key] = (last, held + 1)
            self._evict()
            return False, 0
        if self._times is not None:
            self._times.append(now)
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        self._evict()
        return True, held

    def forget(self, key: Hashable = None) -> None:
        """Start ``key`` afresh: its next line is allowed (the shared ``total`` cap aside)."""
        self._seen.pop(key, None)

    def _evict(self) -> None:
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)
