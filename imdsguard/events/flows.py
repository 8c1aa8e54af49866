"""Fold packets into one event per connection attempt, and rate-limit floods.

Pure logic with an injected clock, so every timing rule is unit-tested.

Per mode (see :class:`FlowTable`):

- enforce + reject: the first packet of a socket is an event at once (the
  client is answered with a reset; low latency matters).
- enforce + drop: the client retransmits its SYN (1 s, 3 s, 7 s ...): those
  fold into one event with ``attempts``, emitted when the flow has been
  idle for ``drop_idle`` seconds or is ``drop_cap`` seconds old.
- audit: the SYN is attributed, but the event waits for the first request
  bytes, which say ``imds_version``; after ``audit_wait`` seconds without
  any (or at FIN/RST) it goes out with ``unknown``.

A flow is one socket: the 5-tuple plus the socket inode when known, so a
reused source port is a new flow, not a fold. After its event a flow
lingers (absorbing retransmits) and then is forgotten; the table is an LRU
with a hard cap, and a pending flow pushed out is emitted, not lost.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from imdsguard.domain import Action, Mode
from imdsguard.events.event import AUDITED, Event
from imdsguard.events.packet import MAX_REQUEST_BYTES, Packet, imds_version
from imdsguard.throttle import TokenBuckets

FlowKey = tuple[str, int, str, int, str, int]  # family, proto, src, sport, dst, dport


def flow_key(pkt: Packet) -> FlowKey:
    """The 5-tuple (with family) of ``pkt``."""
    return (pkt.family, pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport)


@dataclass
class Flow:
    """One connection attempt being folded into an event."""

    key: FlowKey
    inode: int | None
    event: Event | None  # None once emitted: a lingering flow only absorbs packets
    first: float
    last: float
    attempts: int = 1
    emitted: bool = False
    request: bytearray = field(default_factory=bytearray)
    next_seq: int | None = None
    version: str | None = None


class FlowTable:
    """Connection attempts in flight (see the module docstring)."""

    def __init__(
        self,
        mode: Mode,
        action: Action,
        *,
        cap: int = 8192,
        drop_idle: float = 2.5,
        drop_cap: float = 10.0,
        audit_wait: float = 1.0,
        reject_linger: float = 5.0,
        drop_linger: float = 70.0,
        audit_linger: float = 120.0,
    ) -> None:
        self.mode = mode
        self.action = action
        self.cap = cap
        self.drop_idle = drop_idle
        self.drop_cap = drop_cap
        self.audit_wait = audit_wait
        self.reject_linger = reject_linger
        self.drop_linger = drop_linger
        self.audit_linger = audit_linger
        self.folded = 0  # packets absorbed by an existing flow
        self._flows: OrderedDict[FlowKey, Flow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def reconfigure(self, mode: Mode, action: Action) -> None:
        """Adopt a new mode/action for flows from now on."""
        self.mode, self.action = mode, action

    def get(self, key: FlowKey) -> Flow | None:
        """The flow for ``key``, if one is in the table."""
        return self._flows.get(key)

    def fold(self, flow: Flow, pkt: Packet, now: float) -> list[Event]:
        """Another packet of a known flow; returns events that became ready."""
        flow.last = now
        self._flows.move_to_end(flow.key)
        self.folded += 1
        if not flow.emitted and (pkt.is_syn or self.mode != Mode.AUDIT):
            flow.attempts += 1
        return self._after_packet(flow, pkt, now)

    def add(self, pkt: Packet, inode: int | None, event: Event, now: float) -> list[Event]:
        """A new flow starting with ``pkt``; ``event`` is its event without timing fields.

        Returns events that became ready (this one in reject mode, or a
        pending flow evicted to stay under the cap).
        """
        ready: list[Event] = []
        key = flow_key(pkt)
        old = self._flows.pop(key, None)
        if old is not None and not old.emitted:
            ready.append(self._emit(old))
        while len(self._flows) >= self.cap:
            _, evicted = self._flows.popitem(last=False)
            if not evicted.emitted:
                ready.append(self._emit(evicted))
        flow = Flow(key, inode, event, now, now)
        self._flows[key] = flow
        return ready + self._after_packet(flow, pkt, now)

    def _after_packet(self, flow: Flow, pkt: Packet, now: float) -> list[Event]:
        if flow.emitted:
            return []
        if self.mode != Mode.AUDIT:
            return [self._emit(flow)] if self.action == Action.REJECT else []
        if pkt.payload and (flow.next_seq is None or pkt.seq == flow.next_seq):
            room = MAX_REQUEST_BYTES - len(flow.request)
            flow.request += pkt.payload[:room]
            flow.next_seq = (pkt.seq + len(pkt.payload)) & 0xFFFFFFFF
            flow.version = imds_version(bytes(flow.request))
        elif pkt.is_close:
            flow.version = imds_version(bytes(flow.request), complete=True)
        if flow.version is not None:
            return [self._emit(flow)]
        return []

    def _emit(self, flow: Flow) -> Event:
        if flow.event is None:
            raise ValueError("a flow is emitted once")
        flow.emitted = True
        event = flow.event.copy()
        event["attempts"] = flow.attempts
        if event.get("event") == AUDITED:
            version = flow.version or imds_version(bytes(flow.request), complete=True)
            event["imds_version"] = version or "unknown"
        else:
            event["imds_version"] = "unknown"  # a denied client never sends a request
        flow.request = bytearray()  # never keep request bytes (a token) longer than needed
        flow.event = None  # a lingering flow only absorbs packets: free its event
        return event

    def _deadline(self, flow: Flow) -> float:
        """When ``flow`` is due: its event (pending) or forgetting it (emitted)."""
        if flow.emitted:
            linger = self.drop_linger if self.action == Action.DROP else self.reject_linger
            return flow.last + (self.audit_linger if self.mode == Mode.AUDIT else linger)
        if self.mode == Mode.AUDIT:
            return flow.first + self.audit_wait
        if self.action == Action.DROP:
            return min(flow.last + self.drop_idle, flow.first + self.drop_cap)
        return flow.first

    def expire(self, now: float) -> list[Event]:
        """Events whose time has come; forgets flows that have lingered long enough."""
        ready: list[Event] = []
        for key, flow in list(self._flows.items()):
            if self._deadline(flow) > now:
                continue
            if flow.emitted:
                del self._flows[key]
            else:
                ready.append(self._emit(flow))
        return ready

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`expire` has something to do (pending flows only)."""
        pending = [self._deadline(f) for f in self._flows.values() if not f.emitted]
        return min(pending) if pending else None

    def flush(self) -> list[Event]:
        """Emit every pending flow and forget all (at stop)."""
        ready = [self._emit(f) for f in self._flows.values() if not f.emitted]
        self._flows.clear()
        return ready


class RateLimiter:
    """Budgets for the event log: per (uid, exe), per uid, and for everyone together.

    An event is logged only when all three budgets have a token left, and
    then takes one from each. Per (uid, exe) alone, a user who renames its
    own copy of a program between connects gets a fresh budget every time
    (48,435 events in 80 s were measured that way); the per-uid budget
    stops that, and the global one bounds what many users together (or a
    uid-less forwarded flood) can write. What is refused is counted per
    (uid, exe) and per uid and handed out by :meth:`take_suppressed` for the
    periodic ``events_suppressed`` line. All tables are bounded LRUs.
    """

    def __init__(
        self,
        burst: float = 300,
        rate: float = 1.0,
        max_keys: int = 4096,
        *,
        uid_burst: float = 300,
        uid_rate: float = 1.0,
        global_burst: float = 1000,
        global_rate: float = 5.0,
    ) -> None:
        self.max_keys = max_keys
        self._key = TokenBuckets(burst, rate, max_keys)
        self._uid = TokenBuckets(uid_burst, uid_rate, max_keys)
        self._all = TokenBuckets(global_burst, global_rate, 1)
        self._suppressed: OrderedDict[Any, int] = OrderedDict()
        self.by_budget = {"process": 0, "uid": 0, "global": 0}
        self.suppressed_total = 0

    def allow(self, key: Any, now: float) -> bool:
        """True when an event for ``key`` ((uid, exe) or any key whose [0] is the uid) may go."""
        uid = key[0] if isinstance(key, tuple) and key else key
        budgets = (
            (self._key, key, "process"),
            (self._uid, uid, "uid"),
            (self._all, None, "global"),
        )
        for buckets, k, name in budgets:
            if not buckets.has(k, now):
                self.by_budget[name] += 1
                self.suppressed_total += 1
                self._suppressed[key] = self._suppressed.pop(key, 0) + 1
                if len(self._suppressed) > self.max_keys:
                    self._suppressed.popitem(last=False)
                return False
        for buckets, k, _ in budgets:
            buckets.take(k, now)
        return True

    def take_suppressed(self) -> dict[Any, int]:
        """What was suppressed since the last call, per key (and reset)."""
        out = dict(self._suppressed)
        self._suppressed.clear()
        return out
