"""Capture denied (or, in audit mode, audited) IMDS connections and log who made them.

How it stays fail-closed and still attributes short-lived processes: the
firewall sends each not-allowlisted packet to IMDS to NFQUEUE (see
:mod:`imdsguard.firewall.iptables`). The kernel holds the packet, so the
client is still inside ``connect()``, with its socket and process alive,
while we attribute it (:mod:`imdsguard.events.attribution`). Then we give
the verdict ``NF_REPEAT``: the packet runs through the hook again, now with
:data:`~imdsguard.policy.MARK_SEEN` in its connection's conntrack mark (the
queue rule put it there) and in its own mark (the verdict adds it), and
meets the "seen: deny" rule (enforce) or "seen: clear and return" (audit).
We never accept or reject ourselves, so the policy stays in the firewall
rules, and no mark a process can set on its socket changes the outcome.

If this process dies, the kernel drops the packets still held and, in
enforce mode, every later one (the queue has no bypass and we never set
``F_FAIL_OPEN``): closed. Audit mode sets fail-open and its rule has
``--queue-bypass``: audit never blocks.

Where the kernel cannot queue (an nftables host without ``nft_queue``), the
rules log the packets to an NFLOG group instead (:mod:`imdsguard.events.nflog`)
and deny them at once; the same attribution then runs on the copy, while the
socket still exists: the user always, the process when it is still there.

Threads: the capture thread reads the queue, attributes, answers with the
verdict (milliseconds), and hands finished events to a queue; a writer
thread rate-limits them (per (uid, exe), per uid and overall), logs them through structlog
(stdout, journald) and appends them to the event log. Slow I/O never
delays a verdict.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

from imdsguard import paths
from imdsguard._log import Logger
from imdsguard._time import rfc3339
from imdsguard.config import Config
from imdsguard.domain import Action, Mode
from imdsguard.events.attribution import Attribution, Attributor
from imdsguard.events.event import AUDITED, BLOCKED, OTHER_PROCESS, SUMMARY, Event, ProcessKey
from imdsguard.events.flows import FlowTable, RateLimiter, flow_key
from imdsguard.events.log import DEFAULT_MAX_BYTES, EventLog
from imdsguard.events.nflog import NfLog
from imdsguard.events.nfqueue import NF_REPEAT, CaptureError, NfQueue, QueuedPacket
from imdsguard.events.packet import IPPROTO_TCP, Packet, PacketError, parse_packet
from imdsguard.events.procfs import container_for_address
from imdsguard.events.sockdiag import SockDiag
from imdsguard.netlink import NF_INET_FORWARD, NetfilterPacket
from imdsguard.policy import MARK_SEEN, QUEUE_NUM

TICK = 0.25  # longest sleep of the capture thread (expiry of folded flows)
BATCH = 512  # packets handled per wake-up before expiring flows
MAX_PENDING_EVENTS = 10000
SUMMARY_TOP = 10
CAPTURE_NICE = -10
TROUBLE_WINDOW = 60.0  # an error shows in ``status`` (degraded) this long after it
_STOP = object()


def _ifname(index: int | None) -> str | None:
    if not index:
        return None
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)


def build_event(
    mode: Mode,
    pkt: Packet,
    who: Attribution,
    wall: float,
    forwarded: bool = False,
    iface: str | None = None,
) -> Event:
    """An event with docs/contract.md's fields, in its order (attempts/version filled later)."""
    event: dict[str, Any] = {
        "event": AUDITED if mode == Mode.AUDIT else BLOCKED,
        "timestamp": rfc3339(wall),
        "mode": str(mode),
        "family": pkt.family,
    }
    if forwarded:
        event["src"] = pkt.src
    event["dst"] = pkt.dst
    event["dport"] = pkt.dport or None
    fields = who.fields()
    attributed = fields.pop("attributed")
    event.update(fields)
    event["attempts"] = 1
    event["attributed"] = attributed
    event["imds_version"] = "unknown"
    if forwarded:
        event["iface"] = iface
    return cast(Event, event)  # its keys: tests/unit/events/test_event.py


class _ContainerCache:
    """Source address -> container id, remembered briefly (bounded)."""

    ttl = 30.0
    size = 256

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, str | None]] = {}

    def lookup(self, address: str, now: float) -> str | None:
        hit = self._seen.get(address)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        found = container_for_address(address)
        if len(self._seen) >= self.size:
            self._seen.clear()
        self._seen[address] = (now, found)
        return found


#: Distinct (user, exe) pairs counted for metrics before the rest go to "other".
MAX_PROCESS_KEYS = 1000


class Capture:
    """NFQUEUE capture, attribution and event output (see the module docstring)."""

    def __init__(
        self,
        *,
        queue_num: int,
        mode: Mode,
        action: Action,
        event_log: EventLog,
        logger: Logger,
        proc_root: str = "/proc",
        rate_burst: float = 300,
        rate_per_second: float = 1.0,
        summary_interval: float = 60.0,
        flow_cap: int = 8192,
        hold: bool = True,
    ) -> None:
        self.queue_num = queue_num
        self.hold = hold  # False: read an NFLOG group of that number (nothing held)
        self.mode = mode
        self.action = action
        self.event_log = event_log
        self.log = logger
        self.proc_root = proc_root
        self.summary_interval = summary_interval
        self._flows = FlowTable(mode, action, cap=flow_cap)
        self._limiter = RateLimiter(burst=rate_burst, rate=rate_per_second)
        self._events: queue.Queue[Any] = queue.Queue(MAX_PENDING_EVENTS)
        self._nfq: NfQueue | NfLog | None = None
        self._diag: SockDiag | None = None
        self._attributor: Attributor | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._wake_r = self._wake_w = -1  # a pipe while running: wakes the capture thread
        self._pending_config: tuple[Mode, Action] | None = None
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._failed_config: str | None = None
        self._last_error_log = 0.0
        self._trouble: tuple[float, str] | None = None  # (when, what) of the last error
        self.counters = {
            "packets": 0,
            "events": 0,
            "attributed": 0,
            "suppressed": 0,
            "errors": 0,
            "dropped": 0,  # events lost because the writer fell behind (bounded queue)
            "held_us_total": 0,  # time from reading a packet to its verdict (attribution)
            "held_us_max": 0,
        }
        self._containers = _ContainerCache()
        # Blocked attempts per (user, exe) for metrics; bounded, overflow folded.
        self.by_process: dict[ProcessKey, int] = {}

    # -- life cycle

    def start(self) -> None:
        """Bind the queue (raises CaptureError/QueueBusyError) and start the threads."""
        if self._threads:
            return
        if self.hold:
            self._nfq = NfQueue(self.queue_num, fail_open=self.mode == Mode.AUDIT)
        else:
            self._nfq = NfLog(self.queue_num)
        try:
            self._diag = SockDiag()
        except OSError as exc:
            self._nfq.close()
            self._nfq = None
            raise CaptureError(f"cannot open a sock_diag netlink socket: {exc}") from None
        self._attributor = Attributor(self._diag, self.proc_root)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._capture_loop, name="imdsguard-capture", daemon=True),
            threading.Thread(target=self._writer_loop, name="imdsguard-events", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.log.info(
            "capture_started",
            queue=self.queue_num,
            source="nfqueue" if self.hold else "nflog",
            mode=self.mode,
            action=self.action,
        )

    def stop(self) -> None:
        """Flush pending events, unbind the queue, join the threads."""
        if not self._threads:
            return
        self._stop.set()
        self._wake()
        capture, writer = self._threads
        capture.join(timeout=10)
        self._put(_STOP, block=True)
        writer.join(timeout=10)
        self._threads = []
        if self._diag is not None:
            self._diag.close()
            self._diag = None
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1

    def reconfigure(self, *, mode: Mode, action: Action) -> None:
        """Adopt a new mode/action (applied by the capture thread within a tick)."""
        with self._lock:
            self._pending_config = (mode, action)
        if not self._threads:
            self._apply_config()
        self._wake()

    def stats(self) -> dict[str, Any]:
        """Counters (packets, events, attributed, suppressed, errors, ...) and state.

        JSON-able (it goes to ``state.json`` and the ``daemon_stopped`` line); the
        per-process counts are :attr:`by_process`, for metrics only.
        """
        out: dict[str, Any] = dict(self.counters)
        out.update(
            running=bool(self._threads) and self._failed is None,
            queue=self.queue_num,
            source="nfqueue" if self.hold else "nflog",
            mode=self.mode,
            action=self.action,
            flows=len(self._flows),
            folded=self._flows.folded,
        )
        if self._failed or self._failed_config:
            out["error"] = self._failed or self._failed_config
        if self._trouble is not None and time.monotonic() - self._trouble[0] < TROUBLE_WINDOW:
            out["degraded"] = self._trouble[1]
        return out

    def _error(self, event: str, **fields: Any) -> None:
        """Count an error; log it at most every 10 s; ``status`` shows it for a minute."""
        self.counters["errors"] += 1
        now = time.monotonic()
        self._trouble = (now, f"{event}: {fields.get('error')}")
        if now - self._last_error_log > 10:
            self._last_error_log = now
            self.log.error(event, **fields)

    # -- capture thread

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _apply_config(self) -> None:
        with self._lock:
            pending, self._pending_config = self._pending_config, None
        if pending is None:
            return
        mode, action = pending
        fail_open_changed = (mode == Mode.AUDIT) != (self.mode == Mode.AUDIT)
        self.mode, self.action = mode, action
        self._flows.reconfigure(mode, action)
        if fail_open_changed and self._nfq is not None:
            try:
                self._nfq.configure(fail_open=mode == Mode.AUDIT)
            except CaptureError as exc:
                # The queue keeps its old overflow behaviour; capture goes on.
                self._failed_config = str(exc)
                self.log.error("capture_reconfigure_failed", error=str(exc))

    def _capture_loop(self) -> None:
        _raise_priority()
        nfq = self._nfq
        if nfq is None:
            return
        try:
            while not self._stop.is_set():
                deadline = self._flows.next_deadline()
                timeout = TICK
                if deadline is not None:
                    timeout = min(TICK, max(0.0, deadline - time.monotonic()))
                ready, _, _ = select.select([nfq, self._wake_r], [], [], timeout)
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self._apply_config()
                for _ in range(BATCH):
                    packets = nfq.receive()
                    if not packets:
                        break
                    for qp in packets:
                        self._on_packet(nfq, qp)
                for event in self._flows.expire(time.monotonic()):
                    self._put(event)
        except Exception as exc:  # noqa: BLE001 - report, and stay closed (the kernel drops)
            self._failed = f"{type(exc).__name__}: {exc}"
            self.log.error("capture_failed", error=self._failed, effect="denied, unattributed")
        finally:
            for event in self._flows.flush():
                self._put(event)
            nfq.close()
            self._nfq = None

    def _on_packet(self, nfq: NfQueue | NfLog, qp: NetfilterPacket) -> None:
        self.counters["packets"] += 1
        start = time.perf_counter()
        events: list[Event] = []
        try:
            events = self._attribute(qp, time.time())
        except Exception as exc:  # noqa: BLE001 - a packet must always get its verdict
            self._error("capture_packet_error", error=f"{type(exc).__name__}: {exc}")
        finally:
            # Back through the hook with our bit set (its connection's conntrack mark has
            # it from the queue rule): the rules deny (enforce) or pass (audit).
            # A logged packet (NFLOG) went on through the rules already: nothing to answer.
            if isinstance(nfq, NfQueue) and isinstance(qp, QueuedPacket):
                nfq.verdict(qp.packet_id, NF_REPEAT, qp.mark | MARK_SEEN)
            held_us = int((time.perf_counter() - start) * 1e6)
            self.counters["held_us_total"] += held_us
            self.counters["held_us_max"] = max(self.counters["held_us_max"], held_us)
        for event in events:
            self._put(event)

    def _attribute(self, qp: NetfilterPacket, wall: float) -> list[Event]:
        attributor = self._attributor
        if attributor is None:
            return []
        now = time.monotonic()
        try:
            pkt = parse_packet(qp.payload)
        except PacketError:
            self.counters["errors"] += 1
            return []
        flows = self._flows
        # Without ports (ICMP, fragments) packets cannot be told apart by socket: no folding.
        flow = flows.get(flow_key(pkt)) if pkt.sport else None
        if flow is not None and pkt.proto == IPPROTO_TCP and not pkt.is_syn:
            return flows.fold(flow, pkt, now)  # audit: the rest of a known connection
        forwarded = qp.hook == NF_INET_FORWARD
        sock = None if forwarded else attributor.lookup_socket(pkt)
        inode = sock.inode if sock is not None else None
        if flow is not None and (inode is None or flow.inode in (None, inode)):
            return flows.fold(flow, pkt, now)  # a retransmitted SYN of the same socket
        # Forwarded: no local socket, so the kernel cannot know uid or pid.
        who = Attribution() if forwarded else attributor.attribute(sock, qp.uid, qp.gid)
        event = build_event(
            self.mode,
            pkt,
            who,
            wall,
            forwarded=forwarded,
            iface=_ifname(qp.indev) if forwarded else None,
        )
        return flows.add(pkt, inode, event, now)

    def _put(self, item: Any, block: bool = False) -> None:
        try:
            self._events.put(item, block=block, timeout=5 if block else None)
        except queue.Full:
            self.counters["dropped"] += 1

    # -- writer thread

    def _writer_loop(self) -> None:
        _raise_priority()
        next_summary = time.monotonic() + self.summary_interval
        while True:
            try:
                item = self._events.get(timeout=max(0.05, next_summary - time.monotonic()))
            except queue.Empty:
                item = None
            now = time.monotonic()
            if item is _STOP:
                self._summary()
                return
            if item is not None:
                self._write(item, now)
            if now >= next_summary:
                self._summary()
                next_summary = now + self.summary_interval

    def _write(self, event: Event, now: float) -> None:
        if not self._limiter.allow((event.get("uid"), event.get("exe")), now):
            self.counters["suppressed"] += 1
            return
        if "src" in event and event.get("container") is None:
            # After the verdict, in the writer thread: this scans /proc.
            event["container"] = self._containers.lookup(str(event["src"]), now)
        self.counters["events"] += 1
        if event.get("attributed"):
            self.counters["attributed"] += 1
        key = ProcessKey(event["user"] or event.get("src") or "?", event["exe"] or "?")
        if key not in self.by_process and len(self.by_process) >= MAX_PROCESS_KEYS:
            key = OTHER_PROCESS
        self.by_process[key] = self.by_process.get(key, 0) + 1
        self._output(event)

    def _output(self, event: Mapping[str, Any]) -> None:
        fields = {k: v for k, v in event.items() if k != "event"}
        try:
            self.log.info(event["event"], **fields)
        except Exception:  # noqa: BLE001 - stdout trouble must not stop the file log
            self.counters["errors"] += 1
        try:
            self.event_log.append(event)
        except OSError as exc:
            self._error("event_log_write_failed", path=self.event_log.path, error=str(exc))

    def _summary(self) -> None:
        suppressed = self._limiter.take_suppressed()
        dropped = self.counters["dropped"]
        if not suppressed:
            return
        top = sorted(suppressed.items(), key=lambda kv: -kv[1])[:SUMMARY_TOP]
        per_uid: dict[Any, int] = {}
        for (uid, _exe), n in suppressed.items():
            per_uid[uid] = per_uid.get(uid, 0) + n
        uids = sorted(per_uid.items(), key=lambda kv: -kv[1])[:SUMMARY_TOP]
        self._output(
            {
                "event": SUMMARY,
                "timestamp": rfc3339(time.time()),
                "total": sum(suppressed.values()),
                "keys": len(suppressed),
                "interval_s": self.summary_interval,
                "top": [{"uid": k[0], "exe": k[1], "count": n} for k, n in top],
                # A flood from one uid under many exe names shows here as one line.
                "uids": [{"uid": u, "count": n} for u, n in uids],
                "budgets": dict(self._limiter.by_budget),
                "dropped_total": dropped,
            }
        )


def _raise_priority() -> None:
    """Nice -10 for the calling thread (Linux: per-thread with the thread's id).

    A held packet is a client waiting in connect(): on a busy host (a burst
    of processes starting) a nice-0 capture thread waits its turn behind
    them, tens of milliseconds. Both our threads get it, so neither waits
    for the other's GIL while descheduled. Not real-time: a bug here cannot
    starve the host.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CAPTURE_NICE)


def _max_bytes() -> int:
    """Size of an event log generation: ``$IMDSGUARD_EVENTS_MAX_BYTES`` (small disks, tests)."""
    try:
        return max(4096, int(os.environ.get("IMDSGUARD_EVENTS_MAX_BYTES", "")))
    except ValueError:
        return DEFAULT_MAX_BYTES


class CaptureComponent:
    """:class:`Capture` as a daemon component (``imdsguard.components.Component``).

    ``start``/``stop`` as Capture; ``reconfigure(config)`` takes the new
    mode and action; ``health()`` is :meth:`Capture.stats`.
    """

    def __init__(
        self,
        config: Config,
        logger: Logger,
        event_log: EventLog | None = None,
        hold: bool = True,
    ) -> None:
        self.capture = Capture(
            queue_num=QUEUE_NUM,
            # Validated by the config (which says what was wrong, and where).
            mode=config.mode,
            action=config.action,
            event_log=event_log or EventLog(paths.events_file(), max_bytes=_max_bytes()),
            logger=logger,
            hold=hold,
        )

    @property
    def hold(self) -> bool:
        """True when packets are held in a queue; False when read from a log group."""
        return self.capture.hold

    def start(self) -> None:
        """Bind the queue and start capturing (before the queue rules go in)."""
        self.capture.start()

    def stop(self) -> None:
        """Stop capturing (after the queue-less rules went in)."""
        self.capture.stop()

    def reconfigure(self, config: Config) -> None:
        """Adopt ``config``'s mode and action."""
        self.capture.reconfigure(mode=config.mode, action=config.action)

    def health(self) -> dict[str, Any]:
        """The capture's counters, for ``status`` and metrics."""
        return self.capture.stats()

    def process_counts(self) -> dict[ProcessKey, int]:
        """Attempts per (user, exe) this run, for metrics (bounded; the rest is ``other``)."""
        return dict(self.capture.by_process)
