"""A clock for tests: it stands still until the test moves it."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock the test moves by hand (one object can serve simulator and client)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
