"""``imdsguard run``: apply the policy, keep it in place, reload on SIGHUP.

The loop is deliberately simple: one thread owns the firewall. It applies
the rule set, tells systemd READY=1 only once the kernel has the rules, then
inspects them every ``interval`` seconds and repairs any drift (our chain
flushed or deleted, the jump gone or no longer first, a whole-table flush),
logging each repair as ``rules_restored``. Helpers that need threads of their
own (attribution capture, the broker) are components started around it.

Failing closed: SIGTERM/SIGINT stop the daemon but leave the rules; a bad
config at start exits 2 without touching rules already in place; a bad
config on SIGHUP is logged and the old policy stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Optional, cast

from imdsguard import __version__, _locks, _state, cgroups, paths, transaction
from imdsguard._log import Logger
from imdsguard.components import Component, component_problems, in_phase, make_components
from imdsguard.config import Config, load_config
from imdsguard.domain import Capture, Mode
from imdsguard.errors import ImdsGuardError
from imdsguard.firewall.base import Backend, FamilyState
from imdsguard.firewall.detect import choose, leftovers, make_backend
from imdsguard.identity import service_uids
from imdsguard.notify import Notifier
from imdsguard.policy import RuleSet, build_ruleset, capture_for
from imdsguard.trouble import Trouble

DEFAULT_INTERVAL = 0.25  # polling backends (x_tables has no change notification)
QUICK_INTERVAL = 0.025  # polling backends with a cheap change test (iptables: table headers)
WATCHED_INTERVAL = 2.0  # notifying backends: a safety net, and /etc/group re-expansion
HEARTBEAT = 5.0


@dataclass
class _Counters:
    rules_restored: int = 0
    reloads: int = 0
    reload_failures: int = 0
    last_problems: list[str] = field(default_factory=list)


class Signals:
    """SIGTERM/SIGINT (stop) and SIGHUP (reload) as two events, and a pipe that
    wakes the daemon's ``select()`` when one arrives (or is requested)."""

    def __init__(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stop = threading.Event()
        self.reload = threading.Event()

    def install(self) -> None:
        """Handle the signals in this process (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        signal.set_wakeup_fd(self.wake_w)  # a signal wakes the select() in the loop

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        (self.reload if signum == signal.SIGHUP else self.stop).set()

    def request(self, event: threading.Event) -> None:
        """Set ``event`` (``stop`` or ``reload``) and wake the loop, as a signal would."""
        event.set()
        with contextlib.suppress(BlockingIOError):  # the pipe is full: it wakes anyway
            os.write(self.wake_w, b"w")


class Daemon:
    """The long-running guard (see module docstring), built from a loaded config.

    ``config_path`` is what a reload reads again (None: the default file).
    ``wiring`` says how the daemon reaches the host (config loader, backend,
    components, other backends' leftovers): the default is the real thing,
    unit tests pass fakes (:mod:`imdsguard_testing.fakes`). Every attribute
    is set here: the backend is made and the first rule set built, but
    nothing touches the kernel before :meth:`run`.
    """

    def __init__(
        self,
        config: Config,
        logger: Logger,
        interval: float = DEFAULT_INTERVAL,
        *,
        config_path: str | None = None,
        wiring: Wiring | None = None,
        signals: Signals | None = None,
    ) -> None:
        self.config_path = config_path
        self.log = logger
        self.interval = interval
        self.wiring = wiring or Wiring()
        self.signals = signals or Signals()
        self.started = time.time()
        self.counters = _Counters()
        self._wake_r = self.signals.wake_r
        self._stop = self.signals.stop
        self._reload = self.signals.reload
        self._components: dict[str, Component] = {}
        self.degraded: list[str] = []  # reasons protection is in place but something is off
        self.rollback_problem: str | None = None  # until the next good reload
        self.last_states: dict[str, str] = {}
        self.trouble = Trouble(logger)
        self._reserve_fd = _reserve()
        self._units_searched = 0.0  # monotonic time of the last full search for units
        self._notify = Notifier(on_error=self._notify_failed)
        self._limits_logged: set[str] = set()
        self.config: Config = config
        self.backend: Backend = self.wiring.backend_for(config, None)
        self._unit_cgroups: dict[str, cgroups.UnitCgroup | None] = {}
        self._unit_cgroups = self._resolve_units(config)
        self.ruleset: RuleSet = self._ruleset(config)

    def _notify_failed(self, address: str, error: str) -> None:
        self.log.warning(
            "sd_notify_failed",
            socket=address,
            error=error,
            effect="systemd is not told about readiness; protection is not affected",
        )

    # -- life cycle

    def run(self) -> int:
        """Protect until ``signals.stop`` (SIGTERM/SIGINT); the exit code.

        The process-wide parts (the daemon lock, signal handlers) are
        :func:`serve`'s: ``run`` alone is what unit tests drive.
        """
        self.log.info(
            "daemon_starting",
            version=__version__,
            pid=os.getpid(),
            config=self.config.path,
            backend=self.backend.name,
            mode=self.config.mode,
        )
        try:
            self._start_components(self.config, before=True)
            self.ruleset = self._ruleset(self.config)
            self._apply_resolving("startup")
            self._remove_leftovers()
            self._start_components(self.config, before=False)
            self.last_states = self._rule_states()
            self._publish()
            self._notify("READY=1", f"STATUS=protecting IMDS ({self.config.mode} mode)")
            self.log.info("daemon_ready", rules=self.last_states)
            self._loop()
        finally:
            self._notify("STOPPING=1")
            self._hand_over()
            final = {n: c.health() for n, c in self._components.items()}
            self._stop_components()
            self.log.info("daemon_stopped", rules_left_in_place=True, components=final)
        return 0

    def _loop(self) -> None:
        watch = self._watch()
        units = self._watch_units()
        next_heartbeat = time.monotonic() + HEARTBEAT
        next_full = 0.0
        try:
            while not self._stop.is_set():
                interval = self.interval if watch is None else max(self.interval, WATCHED_INTERVAL)
                # A polling backend with a cheap change test is asked often and
                # checked in full only when it says so (or every interval).
                quick = self._quick_check() if watch is None else None
                fds: list[Any] = [self._wake_r]
                if watch is not None:
                    fds.append(watch)
                if units is not None:
                    fds.append(units)
                timeout = QUICK_INTERVAL if quick is not None else interval
                ready, _, _ = select.select(fds, [], [], timeout)
                search = False
                for fd in ready:
                    if fd is units:
                        search = units.changed()
                    else:
                        _drain(fd)
                if self._stop.is_set():
                    break
                if self._reload.is_set():
                    self._reload.clear()
                    self._guarded("reload", "config_reload_failed", self._do_reload)
                    watch = self._guarded("watch", "watch_failed", self._rewatch, watch)
                    next_full = 0.0
                    if units is not None:
                        units.close()
                    units = self._watch_units()
                if self._refresh_units(search):
                    next_full = 0.0
                now = time.monotonic()
                if (
                    quick is None
                    or now >= next_full
                    # None (the quick check itself failed): do the full one
                    or self._guarded("quick", "rules_check_failed", self._quick_changed, quick)
                    is not False
                ):
                    self._guarded("check", "rules_check_failed", self._check)
                    next_full = time.monotonic() + interval
                if time.monotonic() >= next_heartbeat:
                    self._guarded("publish", "state_write_failed", self._publish)
                    next_heartbeat = time.monotonic() + HEARTBEAT
        finally:
            if watch is not None:
                watch.close()
            if units is not None:
                units.close()

    # -- units (allow.units)

    def _watch_units(self) -> cgroups.Watcher | None:
        """Notification of cgroups appearing and going, when the config names units."""
        if not self.config.allow.units:
            return None
        try:
            return cgroups.Watcher(self.config.allow.units)
        except OSError as exc:
            self.log.warning("units_watch_unavailable", error=str(exc), fallback="polling")
            return None

    def _resolve_units(self, config: Config, search: bool = True) -> dict[str, Any]:
        if not config.allow.units:
            return {}
        if search:
            self._units_searched = time.monotonic()
        return cgroups.resolve(config.allow.units, known=self._unit_cgroups, search=search)

    def _refresh_units(self, search: bool) -> bool:
        """Follow units starting, stopping and restarting (each start is a new cgroup).

        Every check stats the known cgroups (a restart keeps the path, not
        the inode); a full search of the slices runs when the watcher saw a
        unit or slice appear or go, and every HEARTBEAT seconds regardless.
        True when the rule set changed.
        """
        if not self.config.allow.units:
            return False
        search = search or time.monotonic() - self._units_searched >= HEARTBEAT
        found = self._resolve_units(self.config, search)
        if found == self._unit_cgroups:
            return False
        before = set(self.ruleset.units_not_running())
        self._unit_cgroups = found
        self.ruleset = self._ruleset(self.config)
        start = time.monotonic()
        try:
            self._apply("units_changed")
        except ImdsGuardError as exc:
            # A cgroup went between the lookup and the load: look again next tick.
            self._unit_cgroups = {}
            self.log.error("units_apply_failed", error=str(exc))
            return True
        now_stopped = set(self.ruleset.units_not_running())
        self.log.info(
            "units_changed",
            running=sorted(u for u, cg in found.items() if cg is not None),
            not_running=sorted(now_stopped),
            started=sorted(before - now_stopped),
            apply_ms=round((time.monotonic() - start) * 1000, 2),
        )
        self.last_states = self._rule_states()
        self._publish()
        return True

    def _quick_check(self) -> Callable[[], bool] | None:
        """The backend's cheap change test, for a backend the kernel notifies nothing of."""
        if self.backend.capabilities().notifications:
            return None  # its watch failed: poll with full checks every interval
        return self.backend.quick_check

    def _quick_changed(self, quick: Callable[[], bool]) -> bool:
        try:
            return quick()
        except ImdsGuardError:
            return True  # let the full check say what is wrong

    def _guarded(self, path: str, event: str, step: Callable[..., Any], *args: Any) -> Any:
        """Run one periodic step; no failure of it (EMFILE, ENOMEM, a bug) ends the loop.

        Returns the step's result, or None when it failed (see :class:`Trouble`).
        """
        before = self.trouble.failures(path)
        try:
            result = step(*args)
        except Exception as exc:  # noqa: BLE001 - MemoryError too: keep the loop (and rules) alive
            self.trouble.failed(path, event, exc)
            return None
        if self.trouble.failures(path) == before and self.trouble.ok(path) and path != "publish":
            self._guarded("publish", "state_write_failed", self._publish)  # clear it in status
        return result

    def _watch(self) -> socket.socket | None:
        """The backend's change-notification socket, if it has one."""
        try:
            return self.backend.watch()
        except OSError as exc:
            self.log.warning("watch_unavailable", error=str(exc), fallback="polling")
            return None

    def _rewatch(self, watch: socket.socket | None) -> socket.socket | None:
        if watch is not None:
            watch.close()
        return self._watch()

    # -- firewall

    def _apply_resolving(self, why: str) -> None:
        """:meth:`_apply`; when a unit's cgroup went meanwhile, look again and retry once."""
        try:
            self._apply(why)
        except ImdsGuardError:
            if not self.ruleset.allow_cgroups:
                raise
            self._unit_cgroups = self._resolve_units(self.config)
            self.ruleset = self._ruleset(self.config)
            self._apply(why)

    def _apply(self, why: str) -> None:
        with _locks.hold(paths.firewall_lock(), what="the imdsguard firewall lock"):
            changed = self.backend.apply(self.ruleset)
        self.log.info("rules_applied", reason=why, changed=changed, backend=self.backend.name)
        for limit in self._limits():
            if limit not in self._limits_logged:
                self._limits_logged.add(limit)
                self.log.warning("protection_limited", backend=self.backend.name, limit=limit)
        problem = self.backend.quick_check_problem()
        if problem:
            self.log.warning(
                "fast_check_unavailable",
                error=problem,
                effect="the rules are parsed on every check (about 2% of a core when idle)",
            )

    def _remove_leftovers(self) -> None:
        """Take out rules of ours in the backend we do not use (once ours are in place).

        A backend change (config, or auto-detection after an upgrade) leaves
        the old backend's rules behind: they deny by a stale policy, and
        ``status`` could not vouch for them.
        """
        try:
            with _locks.hold(paths.firewall_lock(), what="the imdsguard firewall lock"):
                for other, families in self.wiring.leftovers(self.backend.name):
                    try:
                        other.remove()
                    finally:
                        other.close()
                    self.log.warning(
                        "old_backend_rules_removed", backend=other.name, families=list(families)
                    )
        except ImdsGuardError as exc:
            # Harmless for protection (they deny too); status names them.
            self.log.error("old_backend_rules_left", error=str(exc))

    def _limits(self) -> list[str]:
        """What the backend cannot guard against on this host (shown by ``status``)."""
        return list(self.backend.limits())

    def _ruleset(self, config: Config) -> RuleSet:
        # Capture packets for attribution only while our capture listens (policy decides how).
        return build_ruleset(
            config,
            extra_uids=service_uids(config),
            capabilities=self.backend.capabilities(),
            capturing="capture" in self._components,
            unit_cgroups=self._unit_cgroups,
        )

    def _hand_over(self) -> None:
        """Before exiting, swap in rules that need no daemon (they stay: fail closed)."""
        current = self.ruleset
        if current.capture == Capture.NONE:
            return
        self.ruleset = dataclasses.replace(current, capture=Capture.NONE)
        try:
            self._apply("shutdown")
        except ImdsGuardError as exc:
            # The queue rules stay; with nobody listening they drop: still closed.
            self.log.error("rules_handover_failed", error=str(exc))

    def _rule_states(self) -> dict[str, str]:
        return {f: i.state for f, i in self.backend.inspect(self.ruleset).items()}

    def _attribution(self) -> dict[str, Any]:
        if "capture" in self._components:
            if self.ruleset.capture == Capture.QUEUE:
                return {"available": True, "held": True, "reason": None}
            return {
                "available": True,
                "held": False,
                "reason": "the kernel cannot queue packets from nftables (no nft_queue, "
                "CONFIG_NFT_QUEUE): denied packets are logged (NFLOG) and denied at once, so a "
                "process that exits within a millisecond is logged with its user only",
            }
        reason = "the capture could not start (see capture_unavailable in the log)"
        held = capture_for(self.backend.capabilities(), capturing=True) == Capture.QUEUE
        return {"available": False, "held": held, "reason": reason}

    def metrics_snapshot(self) -> dict[str, Any]:
        """Figures for the metrics exporter (called from its threads)."""
        components = dict(self._components)
        capture = components["capture"].health() if "capture" in components else {}
        broker = components["broker"].health() if "broker" in components else None
        states = dict(self.last_states)
        fine = all(v in (FamilyState.OK, FamilyState.DISABLED) for v in states.values())
        from imdsguard.events.capture import CaptureComponent  # noqa: PLC0415

        counted = components.get("capture")
        blocked_by = counted.process_counts() if isinstance(counted, CaptureComponent) else {}
        return {
            "version": __version__,
            "backend": self.backend.name,
            "mode": self.config.mode,
            "protected": bool(states) and fine and self.config.mode == Mode.ENFORCE,
            "rules": states,
            "rules_restored_total": self.counters.rules_restored,
            "reload_failures": self.counters.reload_failures,
            # Every attempt the capture saw this run: logged, rate-limited, or lost
            # to a full queue (cheap, and it only goes up; the log can be rotated).
            "blocked_total": sum(capture.get(k, 0) for k in ("events", "suppressed", "dropped")),
            "blocked_by": blocked_by,
            "broker_requests": (broker or {}).get("requests_by_status", {}),
            "broker_healthy": None if broker is None else bool(broker.get("healthy")),
            "updated": time.time(),
        }

    def _check(self) -> None:
        try:
            found = self.backend.inspect(self.ruleset)
            self.last_states = {f: i.state for f, i in found.items()}
            bad = {
                f: i
                for f, i in found.items()
                if i.state not in (FamilyState.OK, FamilyState.DISABLED)
            }
            if not bad:
                return
            problems = [f"{f}: {p}" for f, i in bad.items() for p in i.problems]
            start = time.monotonic()
            with _locks.hold(paths.firewall_lock(), what="the imdsguard firewall lock"):
                self.backend.apply(self.ruleset)
            repair_ms = round((time.monotonic() - start) * 1000, 2)  # found broken -> whole
            self.counters.rules_restored += 1
            self.counters.last_problems = problems
            self.last_states = {f: i.state for f, i in self.backend.inspect(self.ruleset).items()}
            self.log.warning(
                "rules_restored",
                problems=problems,
                families=sorted(bad),
                repair_ms=repair_ms,
                total=self.counters.rules_restored,
            )
            self._publish()
        except ImdsGuardError as exc:
            # Keep going: the next tick retries; what is in the kernel stays.
            self.trouble.failed("check", "rules_check_failed", exc)

    # -- reload

    def _do_reload(self) -> None:
        """Adopt the new config, or keep everything as it was (old policy, old rules).

        A reload is all or nothing: when the new config is invalid, or valid
        but its components cannot start (a broker socket that cannot be
        bound) or its rules cannot be applied, the previous config, policy,
        components and rules stay in force and the daemon carries on.

        Order: the capture first (it must listen before rules queue to it),
        then the rules, then the other components (the broker's first IMDS
        request needs the new rules' allowance for its uid).
        """
        previous = (self.config, self.backend, self.ruleset)
        loaded: list[tuple[Config, Backend]] = []  # what the "load" stage read
        # Components go back before the rules they serve (the capture before
        # rules that queue to it), whichever stage failed: one shared undo.
        components_back = transaction.once(lambda: self._roll_back_components(previous))

        def load() -> None:  # ConfigError, or the backend is unusable here
            config = self.wiring.load_config(self.config_path)
            loaded.append((config, self.wiring.backend_for(config, self.backend)))

        def switch() -> None:
            config, backend = loaded[0]
            self.config, self.backend = config, backend
            self._reconfigure_components(config, before=True)
            self._unit_cgroups = self._resolve_units(config)
            self.ruleset = self._ruleset(config)

        def rules_back() -> None:
            components_back()
            self._roll_back_rules(tried=loaded[0][1])

        failure = transaction.run(
            [
                transaction.Stage("load", load),
                transaction.Stage("components", switch, undo=components_back),
                transaction.Stage("apply", lambda: self._apply_resolving("reload"), rules_back),
                transaction.Stage(
                    "components",
                    lambda: self._reconfigure_components(self.config, before=False),
                    undo=components_back,
                ),
            ],
            on_failure=self._reload_failed,
        )
        if failure is not None:
            self._publish()
            return
        config, backend = loaded[0]
        if backend is not previous[1]:
            try:
                previous[1].remove()  # only after the new backend's rules are in place
                previous[1].close()
            except ImdsGuardError as exc:
                # Harmless for protection (both deny); the warning names what is left.
                self.log.warning("old_backend_rules_left", backend=previous[1].name, error=str(exc))
        self.counters.reloads += 1
        self.rollback_problem = None
        self.log.info("config_reloaded", config=config.path, mode=config.mode)
        self._publish()

    def _reload_failed(self, stage: str, exc: ImdsGuardError) -> None:
        self.counters.reload_failures += 1
        self.log.error("config_reload_failed", stage=stage, error=str(exc), kept="previous policy")

    def _roll_back_components(self, previous: tuple[Config, Backend, RuleSet]) -> None:
        """Put back the config and policy of before, and its components."""
        self.config, self.backend, self.ruleset = previous
        self._unit_cgroups = {}  # the next check looks the previous config's units up again
        try:
            self._reconfigure_components(self.config)
        except ImdsGuardError as exc:
            # The rules do not depend on the components: protection stays as it was.
            self.rollback_problem = f"a component of the previous config did not restart: {exc}"
            self.log.error("reload_rollback_incomplete", error=str(exc))

    def _roll_back_rules(self, tried: Backend) -> None:
        """Put back the rules of before (a new apply was tried with ``tried``)."""
        if tried is not self.backend:
            try:
                tried.remove()  # whatever part of the new backend's rules got in
            except ImdsGuardError as exc:
                self.log.error("reload_rollback_incomplete", error=str(exc))
        try:
            self._apply("reload_rolled_back")
        except ImdsGuardError as exc:
            # The check loop keeps retrying (rules_check_failed / rules_restored).
            self.log.error("reload_rollback_incomplete", error=str(exc))

    # -- components

    def _start_components(self, config: Config, before: bool | None = None) -> None:
        for name, component in self.wiring.components(
            config, self.log, self.backend, self.metrics_snapshot, None
        ).items():
            if in_phase(name, before):
                self._start_one(name, component)

    def _start_one(self, name: str, component: Component) -> None:
        try:
            component.start()
        except ImdsGuardError as exc:
            if name != "capture":
                raise
            # Protection does not depend on attribution: carry on without the queue.
            self.degraded.append(f"attribution unavailable: {exc}")
            self.log.error("capture_unavailable", error=str(exc))
            return
        self._components[name] = component

    def _reconfigure_components(self, config: Config, before: bool | None = None) -> None:
        wanted = self.wiring.components(
            config, self.log, self.backend, self.metrics_snapshot, self._components
        )
        wanted = {name: c for name, c in wanted.items() if in_phase(name, before)}
        for name in [n for n in self._components if in_phase(n, before)]:
            if name not in wanted:
                self._components.pop(name).stop()
        for name, component in wanted.items():
            current = self._components.get(name)
            if current is component:
                component.reconfigure(config)
                continue
            if current is not None:  # replaced (a capture of another kind for a new backend)
                self._components.pop(name).stop()
            self._start_one(name, component)

    def _stop_components(self) -> None:
        for name, component in list(self._components.items()):
            try:
                component.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                self.log.error("component_stop_failed", component=name, error=str(exc))
        self._components.clear()

    # -- published state

    def _write_state(self, state: _state.StateDocument) -> None:
        """Write state.json; out of file descriptors, spend the reserved one on it."""
        try:
            _state.write_state(state)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or self._reserve_fd is None:
                raise
            os.close(self._reserve_fd)  # so that status can still read "degraded"
            try:
                _state.write_state(state)
            finally:
                self._reserve_fd = _reserve()

    def _publish(self) -> None:
        components = {n: c.health() for n, c in self._components.items()}
        state: _state.StateDocument = {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "config": self.config.path,
            "mode": self.config.mode,
            "backend": self.backend.name,
            "ruleset": self.ruleset.to_json(),
            "capture": self.ruleset.capture,
            "rules_restored_total": self.counters.rules_restored,
            "last_problems": self.counters.last_problems,
            "reloads": self.counters.reloads,
            "reload_failures": self.counters.reload_failures,
            "components": components,
            "degraded": self.degraded
            + ([self.rollback_problem] if self.rollback_problem else [])
            + self.trouble.reasons()
            + component_problems(components),
            "units": {u: None if cg is None else cg.path for u, cg in self._unit_cgroups.items()},
            "attribution": cast(_state.Attribution, self._attribution()),
            "limits": self._limits(),
        }
        try:
            self._write_state(state)
        except OSError as exc:
            self.trouble.failed("publish", "state_write_failed", exc)
        exporter = self._components.get("metrics")
        if exporter is not None:
            exporter.write_now()  # type: ignore[attr-defined]


def _reserve() -> int | None:
    """A spare file descriptor, given up when the process runs out (see ``_write_state``)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _drain(fd: int | socket.socket) -> None:
    """Empty a wake-up pipe or notification socket (its content does not matter)."""
    while True:
        try:
            data = fd.recv(65536) if isinstance(fd, socket.socket) else os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            return  # e.g. ENOBUFS after a burst: we re-check everything anyway
        if not data:
            return


def _backend_for(config: Config, current: Backend | None) -> Backend:
    """The backend ``config`` names: ``current`` when it is that one already."""
    # Compare what the names resolve to: "auto" and "nftables" are the same
    # backend here, and a second nftables owner would be refused our own table.
    if current is not None and choose(config.backend) == current.name:
        return current
    return make_backend(config.backend, hold=True)


ConfigLoader = Callable[[Optional[str]], Config]
BackendFactory = Callable[[Config, Optional[Backend]], Backend]
ComponentFactory = Callable[
    [Config, Logger, Backend, Callable[[], dict[str, Any]], Optional[dict[str, Component]]],
    dict[str, Component],
]
LeftoverFinder = Callable[[str], list[tuple[Backend, tuple[str, ...]]]]


@dataclass(frozen=True)
class Wiring:
    """How a :class:`Daemon` reaches the host; unit tests replace each part with a fake.

    ``load_config(path)`` reads the config on reload; ``backend_for(config,
    current)`` is the backend ``config`` names (``current`` when unchanged);
    ``components(config, logger, backend, collect, existing)`` the components
    ``config`` asks for (reusing ``existing``); ``leftovers(name)`` the other
    backends holding rules of ours.
    """

    load_config: ConfigLoader = load_config
    backend_for: BackendFactory = _backend_for
    components: ComponentFactory = make_components
    leftovers: LeftoverFinder = leftovers


def serve(config_path: str | None, logger: Logger, interval: float = DEFAULT_INTERVAL) -> int:
    """``imdsguard run``: hold the daemon lock, handle the signals, load the config, run."""
    paths.ensure_dir(paths.run_dir())
    lock_fd = _locks.try_hold_forever(paths.daemon_lock())
    if lock_fd is None:
        state = _state.read_state() or {}
        raise ImdsGuardError(
            f"another imdsguard daemon is running (pid {state.get('pid', '?')}); "
            "stop it first (systemctl stop imdsguard)"
        )
    try:
        signals = Signals()
        signals.install()
        config = load_config(config_path)
        daemon = Daemon(config, logger, interval, config_path=config_path, signals=signals)
        return daemon.run()
    finally:
        os.close(lock_fd)
