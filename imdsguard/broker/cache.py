"""The broker's credential cache: refreshed ahead of expiry, never served expired.

One refresher thread calls :meth:`CredentialCache.step`, which fetches when
due and says how long to sleep. Requests only read the cached value, so
however many clients ask, IMDS sees one fetch per refresh.

When to refresh: at 80% of the credentials' lifetime or when less than 15
minutes (at most half the lifetime) are left, whichever comes first, minus
a random jitter (so a fleet
does not refresh in step). IMDS publishes new credentials only some minutes
before the old ones expire, so a refresh may return the same set: then we
ask again every minute or so.

Static stability: when a fetch fails (IMDS 5xx, timeout, reset, truncated
JSON, ...) the cached credentials keep being served, the failure is retried
with capped exponential backoff plus jitter, and health says ``degraded``.
Credentials are withdrawn shortly before they expire (``serve_margin``):
a client gets a clear 503 rather than credentials AWS is about to refuse.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from imdsguard._log import Logger
from imdsguard.errors import ImdsGuardError
from imdsguard.imds import Credentials, format_time


@dataclass(frozen=True)
class RefreshPolicy:
    """Timings of the cache, in seconds (fractions where named so)."""

    refresh_before: float = 900.0  # refresh once less than this is left ...
    refresh_fraction: float = 0.8  # ... or at this share of the lifetime, if sooner
    jitter_fraction: float = 0.1  # refresh up to this share of the wait early ...
    max_jitter: float = 120.0  # ... but at most this much
    serve_margin: float = 60.0  # stop serving this long before expiry ...
    serve_margin_fraction: float = 0.1  # ... or this share of the lifetime, if shorter
    recheck: float = 60.0  # IMDS had nothing newer yet: ask again after this
    retry_base: float = 1.0  # first retry after a failed fetch
    retry_cap: float = 60.0  # longest wait between retries
    request_gap: float = 1.0  # a waiting client triggers a fetch at most this often
    request_wait: float = 3.0  # how long a request waits for a fetch when nothing is servable
    max_sleep: float = 30.0  # re-evaluate at least this often (wall clock changes)


class CredentialCache:
    """Cached role credentials plus the refresh schedule (see the module docstring).

    ``fetch`` returns fresh :class:`~imdsguard.imds.Credentials` or raises.
    ``clock`` is the wall clock (expirations are wall-clock times); ``rand``
    returns floats in [0, 1) for jitter. Both are injectable for tests.
    """

    def __init__(
        self,
        fetch: Callable[[], Credentials],
        policy: RefreshPolicy | None = None,
        *,
        logger: Logger | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._fetch = fetch
        self.policy = policy or RefreshPolicy()
        self._log = logger
        self._clock = clock
        self._rand = rand
        self._cond = threading.Condition()
        self.wake = threading.Event()  # set to make the refresher look again now
        self._creds: Credentials | None = None
        self._fetched_at: float | None = None
        self._due = clock()
        self._last_attempt: float | None = None
        self._failures = 0
        self._last_error: str | None = None
        self._fetches = 0

    # -- schedule

    def _lifetime(self, creds: Credentials, fetched_at: float) -> float:
        start = creds.last_updated if creds.last_updated is not None else fetched_at
        return max(creds.expiration - min(start, fetched_at), 0.0)

    def serve_until(self, creds: Credentials) -> float:
        """The wall-clock time after which ``creds`` are no longer handed out."""
        fetched_at = self._fetched_at if self._fetched_at is not None else self._clock()
        lifetime = self._lifetime(creds, fetched_at)
        margin = min(self.policy.serve_margin, lifetime * self.policy.serve_margin_fraction)
        return creds.expiration - margin

    def _next_refresh(self, creds: Credentials, now: float, renewed: bool) -> float:
        p = self.policy
        lifetime = self._lifetime(creds, now)
        start = creds.expiration - lifetime
        before = min(p.refresh_before, lifetime / 2)  # short lifetimes (tests): half of it
        point = min(start + lifetime * p.refresh_fraction, creds.expiration - before)
        if renewed and point > now:
            jitter = self._rand() * min(p.max_jitter, (point - now) * p.jitter_fraction)
            return point - jitter
        # Inside the refresh window already and IMDS had nothing newer: ask
        # again soon, but often enough to catch the rotation before we must
        # stop serving.
        left = self.serve_until(creds) - now
        return now + max(min(p.recheck, left / 4), p.request_gap)

    def _backoff(self) -> float:
        p = self.policy
        base = min(p.retry_cap, p.retry_base * float(2 ** min(self._failures - 1, 30)))
        return base * (0.5 + self._rand() / 2)  # "equal jitter"

    # -- the refresher's work

    def step(self) -> float:
        """Fetch if due; return how many seconds until something is due again."""
        now = self._clock()
        if now >= self._due:
            self._refresh(now)
            now = self._clock()
        return max(0.0, min(self._due - now, self.policy.max_sleep))

    def _refresh(self, now: float) -> None:
        self._last_attempt = now
        try:
            new = self._fetch()
        except ImdsGuardError as exc:
            self._failed(now, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the broker must never die of a bad answer
            # Only the type: an unexpected exception's text could quote a document.
            self._failed(now, f"unexpected {type(exc).__name__} while fetching credentials")
            return
        finally:
            self._fetches += 1  # attempts completed
        done = self._clock()
        old = self._creds
        renewed = old is None or new.expiration > old.expiration
        with self._cond:
            if renewed:
                self._creds, self._fetched_at = new, done
            self._failures, self._last_error = 0, None
            current = self._creds
            assert current is not None  # noqa: S101 - set above or before
            self._due = self._next_refresh(current, done, renewed)
            self._cond.notify_all()
        if self._log is not None:
            if renewed:
                self._log.info(
                    "credentials_refreshed",
                    role=current.role,
                    expires=format_time(current.expiration),
                    next_refresh=format_time(self._due),
                )
            else:
                self._log.debug(
                    "credentials_unchanged",
                    role=current.role,
                    expires=format_time(current.expiration),
                    next_check=format_time(self._due),
                )

    def _failed(self, now: float, error: str) -> None:
        with self._cond:
            self._failures += 1
            self._last_error = error
            self._due = now + self._backoff()
            creds = self._creds
            serving = creds is not None and now < self.serve_until(creds)
            self._cond.notify_all()
        if self._log is not None:
            self._log.warning(
                "credentials_refresh_failed",
                error=error,
                failures=self._failures,
                retry_in_s=round(self._due - now, 2),
                serving_cached_until=format_time(self.serve_until(creds))
                if serving and creds is not None
                else None,
            )

    # -- for requests

    def current(self) -> Credentials | None:
        """The cached credentials if they may be served now, else None."""
        creds = self._creds
        if creds is not None and self._clock() < self.serve_until(creds):
            return creds
        return None

    def request_refresh(self) -> None:
        """Nothing servable and a client waits: fetch soon (rate-limited)."""
        with self._cond:
            last = self._last_attempt
            earliest = self._clock() if last is None else last + self.policy.request_gap
            self._due = min(self._due, max(self._clock(), earliest))
        self.wake.set()

    def wait_current(self, timeout: float | None = None) -> Credentials | None:
        """:meth:`current`, waiting up to ``timeout`` for a fetch when there is none."""
        creds = self.current()
        if creds is not None:
            return creds
        deadline = time.monotonic() + (self.policy.request_wait if timeout is None else timeout)
        self.request_refresh()
        with self._cond:
            while True:
                creds = self.current()
                left = deadline - time.monotonic()
                if creds is not None or left <= 0:
                    return creds
                self._cond.wait(left)

    # -- reporting

    def health(self) -> dict[str, Any]:
        """``status`` (``ok|degraded|unavailable``) and the facts behind it; no secrets."""
        now = self._clock()
        creds = self._creds
        servable = creds is not None and now < self.serve_until(creds)
        if not servable:
            status = "unavailable"
        elif self._failures:
            status = "degraded"
        else:
            status = "ok"
        last_error = self._last_error
        if not servable and last_error is None:
            last_error = "no credentials fetched yet" if creds is None else "credentials expired"
        return {
            "status": status,
            "healthy": status == "ok",
            "role": creds.role if creds else None,
            "credentials_expire": format_time(creds.expiration) if creds else None,
            "serving_until": format_time(self.serve_until(creds)) if creds else None,
            "last_refresh": format_time(self._fetched_at) if self._fetched_at else None,
            "next_refresh": format_time(self._due),
            "consecutive_failures": self._failures,
            "last_error": last_error,
            "fetches": self._fetches,
        }


class Refresher:
    """The thread that keeps a :class:`CredentialCache` fresh."""

    def __init__(self, cache: CredentialCache, logger: Logger | None = None) -> None:
        self.cache = cache
        self._log = logger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-refresh", daemon=True)

    def start(self) -> None:
        """Start refreshing (the first fetch happens at once)."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and wait for the thread (a fetch in flight ends by its own timeout)."""
        self._stop.set()
        self.cache.wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.cache.step()
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop refreshing
                delay = self.cache.policy.retry_cap
                if self._log is not None:
                    self._log.error("broker_refresher_error", error=type(exc).__name__)
            if self._stop.is_set():
                return
            self.cache.wake.wait(delay)
            self.cache.wake.clear()
