"""Folding packets into events (reject, drop, audit) and the per-(uid, exe) rate limiter."""

from __future__ import annotations

from typing import Any

from imdsguard.events.event import AUDITED, BLOCKED
from imdsguard.events.flows import FlowTable, RateLimiter, flow_key
from imdsguard.events.packet import IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_SYN, Packet


def syn(sport: int = 40000, seq: int = 100) -> Packet:
    return Packet("ipv4", IPPROTO_TCP, "192.0.2.1", "169.254.169.254", sport, 80, TCP_SYN, seq)


def data(payload: bytes, seq: int = 101, sport: int = 40000, flags: int = TCP_ACK) -> Packet:
    return Packet(
        "ipv4", IPPROTO_TCP, "192.0.2.1", "169.254.169.254", sport, 80, flags, seq, payload
    )


def base(name: str = BLOCKED, pid: int = 7) -> dict[str, Any]:
    return {"event": name, "pid": pid, "attempts": 1, "imds_version": "unknown"}


def test_reject_emits_at_once_and_absorbs_repeats() -> None:
    table = FlowTable("enforce", "reject")
    (event,) = table.add(syn(), 11, base(), now=0.0)
    assert event["attempts"] == 1 and event["imds_version"] == "unknown"
    flow = table.get(flow_key(syn()))
    assert flow is not None
    assert table.fold(flow, syn(), 0.2) == []
    assert table.expire(1.0) == []
    assert table.next_deadline() is None  # nothing pending
    assert table.expire(10.0) == [] and len(table) == 0  # forgotten after lingering


def test_drop_folds_syn_retransmits_into_one_event() -> None:
    table = FlowTable("enforce", "drop", drop_idle=2.5, drop_cap=10.0)
    assert table.add(syn(), 11, base(), now=0.0) == []
    flow = table.get(flow_key(syn()))
    assert flow is not None
    for t in (1.0, 2.0, 3.0):
        assert table.fold(flow, syn(), t) == []
        assert table.expire(t + 0.1) == []
    assert table.next_deadline() == 5.5
    (event,) = table.expire(5.5)
    assert event["attempts"] == 4
    # A later retransmit of the same socket is absorbed, not a second event.
    assert table.fold(flow, syn(), 7.0) == []
    assert table.expire(9.6) == []


def test_drop_cap_bounds_the_wait() -> None:
    table = FlowTable("enforce", "drop", drop_idle=2.5, drop_cap=10.0)
    table.add(syn(), 11, base(), now=0.0)
    flow = table.get(flow_key(syn()))
    assert flow is not None
    t = 0.0
    while t < 9.5:
        t += 2.0
        table.fold(flow, syn(), t)
        if t < 10:
            assert table.expire(t) == []
    (event,) = table.expire(10.0)
    assert event["attempts"] == 6


def test_audit_waits_for_the_request_then_classifies() -> None:
    table = FlowTable("audit", "reject")
    assert table.add(syn(), 11, base(AUDITED), now=0.0) == []
    flow = table.get(flow_key(syn()))
    assert flow is not None
    assert table.fold(flow, data(b""), 0.01) == []  # handshake ACK
    assert table.fold(flow, data(b"GET /latest/meta-data/ HTTP/1.1\r\n"), 0.02) == []
    (event,) = table.fold(flow, data(b"Host: x\r\n\r\n", seq=101 + 33), 0.03)
    assert event["event"] == AUDITED
    assert event["imds_version"] == "v1"
    assert event["attempts"] == 1
    assert flow.request == bytearray()  # request bytes are not kept after the decision
    assert table.fold(flow, data(b"more", seq=500), 0.04) == []  # one event per connection


def test_audit_v2_token_request() -> None:
    table = FlowTable("audit", "reject")
    table.add(syn(), 11, base(AUDITED), now=0.0)
    flow = table.get(flow_key(syn()))
    assert flow is not None
    (event,) = table.fold(flow, data(b"PUT /latest/api/token HTTP/1.1\r\n"), 0.01)
    assert event["imds_version"] == "v2"


def test_audit_ignores_retransmitted_payload() -> None:
    table = FlowTable("audit", "reject")
    table.add(syn(), 11, base(AUDITED), now=0.0)
    flow = table.get(flow_key(syn()))
    assert flow is not None
    table.fold(flow, data(b"GET / HTTP/1.1\r\n"), 0.01)
    table.fold(flow, data(b"GET / HTTP/1.1\r\n"), 0.02)  # same seq again
    (event,) = table.fold(flow, data(b"X-aws-ec2-metadata-token: t\r\n\r\n", seq=117), 0.03)
    assert event["imds_version"] == "v2"


def test_audit_without_request_times_out_as_unknown() -> None:
    table = FlowTable("audit", "reject", audit_wait=1.0)
    table.add(syn(), 11, base(AUDITED), now=0.0)
    assert table.expire(0.9) == []
    (event,) = table.expire(1.0)
    assert event["imds_version"] == "unknown"


def test_audit_fin_without_request_is_unknown_at_once() -> None:
    table = FlowTable("audit", "reject")
    table.add(syn(), 11, base(AUDITED), now=0.0)
    flow = table.get(flow_key(syn()))
    assert flow is not None
    (event,) = table.fold(flow, data(b"", flags=TCP_ACK | TCP_FIN), 0.1)
    assert event["imds_version"] == "unknown"


def test_audit_syn_retransmit_counts_attempts() -> None:
    table = FlowTable("audit", "reject")
    table.add(syn(), 11, base(AUDITED), now=0.0)
    flow = table.get(flow_key(syn()))
    assert flow is not None
    table.fold(flow, syn(), 1.0)
    (event,) = table.fold(flow, data(b"GET / HTTP/1.1\r\n\r\n"), 1.01)
    assert event["attempts"] == 2


def test_same_tuple_new_socket_replaces_the_flow() -> None:
    table = FlowTable("enforce", "drop")
    table.add(syn(), 11, base(pid=1), now=0.0)
    # Port reuse by another socket: the pending one is emitted, the new one starts.
    (old,) = table.add(syn(), 12, base(pid=2), now=0.5)
    assert old["pid"] == 1
    (new,) = table.flush()
    assert new["pid"] == 2


def test_cap_evicts_oldest_and_emits_pending() -> None:
    table = FlowTable("enforce", "drop", cap=3)
    for port in range(1, 4):
        assert table.add(syn(port), port, base(pid=port), now=float(port)) == []
    (evicted,) = table.add(syn(4), 4, base(pid=4), now=4.0)
    assert evicted["pid"] == 1
    assert len(table) == 3


def test_cap_holds_under_a_flood() -> None:
    table = FlowTable("enforce", "reject", cap=100)
    for port in range(5000):
        table.add(syn(port), port, base(pid=port), now=port / 1000)
    assert len(table) == 100


def test_rate_limiter_burst_then_rate() -> None:
    limiter = RateLimiter(burst=3, rate=1.0)
    key = (1001, "/usr/bin/curl")
    assert [limiter.allow(key, 0.0) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow((1001, "/usr/bin/python3"), 0.0)  # other keys are not affected
    assert not limiter.allow(key, 0.5)
    assert limiter.allow(key, 1.6)
    assert limiter.suppressed_total == 3
    assert limiter.take_suppressed() == {key: 3}
    assert limiter.take_suppressed() == {}


def test_rate_limiter_is_bounded() -> None:
    limiter = RateLimiter(burst=0, rate=0.0, max_keys=10)
    for uid in range(1000):
        limiter.allow((uid, "/x"), 0.0)
    assert len(limiter.take_suppressed()) == 10
    assert limiter.suppressed_total == 1000


def test_renaming_the_exe_does_not_buy_a_fresh_budget() -> None:
    """The flood measured: one uid, a new exe name per connect, 48,435 events in 80 s."""
    limiter = RateLimiter(burst=300, rate=1.0, uid_burst=300, uid_rate=1.0)
    logged = sum(limiter.allow((1001, f"/tmp/py{i}"), now=i / 600) for i in range(48_435))
    assert logged <= 300 + 81, logged  # burst, then one a second, over ~80 s
    assert limiter.by_budget["uid"] >= 48_000
    # Another uid still has its own budget.
    assert limiter.allow((1002, "/usr/bin/curl"), now=81.0)


def test_the_global_budget_bounds_many_uids_together() -> None:
    limiter = RateLimiter(global_burst=100, global_rate=1.0)
    logged = sum(limiter.allow((uid, "/bin/x"), now=0.0) for uid in range(1000))
    assert logged == 100 and limiter.by_budget["global"] == 900
    assert limiter.allow((5, "/bin/x"), now=1.0)  # refills
