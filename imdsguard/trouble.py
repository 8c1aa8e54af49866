"""Failures of the daemon's periodic paths, logged (rate-limited) and published until they pass."""

from __future__ import annotations

import time
from typing import Any, Callable

from imdsguard._log import Logger
from imdsguard.throttle import IntervalLimiter


class Trouble:
    """Failures of the periodic paths: each logged (rate-limited) and published until it passes.

    A local user can make the daemon short of resources (file descriptors,
    memory) without being root: none of that may stop the loop that keeps
    the rules in place. A path that fails (``check``, ``reload``,
    ``publish``) logs its first error at once, then at most one line per
    ``interval`` with how many it held back, and shows in ``status`` as
    degraded; the first success after that logs ``periodic_recovered`` and
    clears it.
    """

    def __init__(
        self, logger: Logger, interval: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.log = logger
        self.interval = interval
        self._open: dict[str, dict[str, Any]] = {}
        self._lines = IntervalLimiter(
            interval, clock=clock
        )  # the first failure at once, then one per interval

    def failed(self, path: str, event: str, exc: BaseException) -> None:
        """``path`` failed with ``exc``; ``event`` names its log line."""
        error = f"{type(exc).__name__}: {exc}"
        entry = self._open.get(path)
        if entry is None:
            self._lines.forget(path)  # a new spell of trouble logs its first failure at once
            entry = self._open[path] = {"since": time.time(), "count": 0}
        entry["count"] += 1
        entry["error"] = error
        log, held = self._lines.allow(path)
        if log:
            self.log.error(event, path=path, error=error, repeated=held, effect=_EFFECT)

    def failures(self, path: str) -> int:
        """How many times ``path`` failed since it last succeeded."""
        entry = self._open.get(path)
        return 0 if entry is None else int(entry["count"])

    def ok(self, path: str) -> bool:
        """``path`` succeeded: clear its trouble (logging the recovery once); True if it had one."""
        entry = self._open.pop(path, None)
        if entry is None:
            return False
        self.log.info(
            "periodic_recovered",
            path=path,
            failures=entry["count"],
            seconds=round(time.time() - entry["since"], 1),
        )
        return True

    def reasons(self) -> list[str]:
        """For ``status``: one line per path still failing."""
        return [
            f"periodic {path} failing ({e['count']} times since "
            f"{time.strftime('%H:%M:%S', time.gmtime(e['since']))} UTC): {e['error']}"
            for path, e in sorted(self._open.items())
        ]


_EFFECT = "the rules in the kernel stay; the daemon retries on its next tick"
