"""Capture logic without the kernel: event shape, packet handling, rate limit and summary."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from imdsguard.events.attribution import Attribution, Attributor
from imdsguard.events.capture import Capture, build_event, rfc3339
from imdsguard.events.log import SUMMARY, EventLog, read_events
from imdsguard.events.nfqueue import NF_INET_FORWARD, NF_INET_LOCAL_OUT, CaptureError, QueuedPacket
from imdsguard.events.packet import IPPROTO_TCP, TCP_SYN, Packet
from imdsguard.events.sockdiag import SocketInfo
from imdsguard_testing.fakes import RecordingLogger

CONTRACT_FIELDS = [
    "event",
    "timestamp",
    "mode",
    "family",
    "dst",
    "dport",
    "uid",
    "user",
    "gid",
    "pid",
    "ppid",
    "exe",
    "cmdline",
    "comm",
    "ancestors",
    "unit",
    "container",
    "attempts",
    "attributed",
    "imds_version",
]

SYN = Packet("ipv4", IPPROTO_TCP, "192.0.2.1", "169.254.169.254", 40000, 80, TCP_SYN)


def test_rfc3339() -> None:
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500Z"


def test_event_has_exactly_the_contract_fields() -> None:
    event = build_event("enforce", SYN, Attribution(uid=1, attributed=False), 1.0)
    assert list(event) == CONTRACT_FIELDS
    assert event["event"] == "imds_access_blocked"
    assert event["cmdline"] == [] and event["ancestors"] == []
    audit = build_event("audit", SYN, Attribution(), 1.0)
    assert audit["event"] == "imds_access_audited"


def test_forwarded_event_adds_src_and_iface() -> None:
    event = build_event("enforce", SYN, Attribution(), 1.0, forwarded=True, iface="docker0")
    assert set(event) == {*CONTRACT_FIELDS, "src", "iface"}
    assert (event["src"], event["iface"], event["uid"], event["pid"]) == (
        "192.0.2.1",
        "docker0",
        None,
        None,
    )


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CaptureError):
        Capture(
            queue_num=1,
            mode="block",
            action="reject",
            event_log=EventLog(str(tmp_path / "e")),
            logger=RecordingLogger(),
        )


def _capture(tmp_path: Path, mode: str = "enforce", action: str = "reject", **kw: Any) -> Capture:
    return Capture(
        queue_num=1,
        mode=mode,
        action=action,
        event_log=EventLog(str(tmp_path / "events.jsonl")),
        logger=RecordingLogger(),
        **kw,
    )


def _ipv4_syn(sport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, TCP_SYN, 65535, 0, 0)
    return (
        struct.pack("!BBHHHBBH", 0x45, 0, 40, 1, 0, 64, 6, 0)
        + bytes([192, 0, 2, 1, 169, 254, 169, 254])
        + tcp
    )


class Sockets:
    def lookup(
        self, family: str, proto: int, local: tuple[str, int], remote: tuple[str, int]
    ) -> SocketInfo | None:
        return SocketInfo(inode=local[1], uid=1001, state=2)  # inode = source port


def test_packets_become_events_and_retransmits_fold(tmp_path: Path) -> None:
    cap = _capture(tmp_path, action="drop")
    cap._attributor = Attributor(Sockets(), str(tmp_path / "noproc"), user_name=lambda u: "alice")
    qp = QueuedPacket(1, NF_INET_LOCAL_OUT, 0, 1001, 1001, None, 2, _ipv4_syn(40000))
    assert cap._attribute(qp, 1.0) == []  # drop: folded until idle
    assert cap._attribute(qp, 1.0) == []
    (event,) = cap._flows.flush()
    assert event["attempts"] == 2
    assert (event["uid"], event["user"], event["attributed"]) == (1001, "alice", False)


def test_forwarded_packets_are_not_attributed(tmp_path: Path) -> None:
    cap = _capture(tmp_path)
    cap._attributor = Attributor(Sockets(), str(tmp_path / "noproc"))
    qp = QueuedPacket(1, NF_INET_FORWARD, 0, None, None, 1, 2, _ipv4_syn(40001))
    (event,) = cap._attribute(qp, 1.0)
    assert event["src"] == "192.0.2.1" and event["uid"] is None and "iface" in event


def test_garbage_packet_counts_an_error(tmp_path: Path) -> None:
    cap = _capture(tmp_path)
    cap._attributor = Attributor(Sockets(), str(tmp_path / "noproc"))
    assert cap._attribute(QueuedPacket(1, 3, 0, None, None, None, None, b"\x00junk"), 1.0) == []
    assert cap.stats()["errors"] == 1


def test_writer_rate_limits_and_summarises(tmp_path: Path) -> None:
    cap = _capture(tmp_path, rate_burst=3, rate_per_second=0.0)
    for i in range(5):
        event = build_event("enforce", SYN, Attribution(uid=1001, pid=i, attributed=True), 1.0)
        event["exe"] = "/usr/bin/curl"
        cap._write(event, now=0.0)
    other = build_event("enforce", SYN, Attribution(uid=1002, attributed=False), 1.0)
    cap._write(other, now=0.0)
    cap._summary()
    stats = cap.stats()
    assert (stats["events"], stats["attributed"], stats["suppressed"]) == (4, 3, 2)
    logger = cap.log
    assert isinstance(logger, RecordingLogger)
    names = [name for _, name, _ in logger.lines]
    assert names == ["imds_access_blocked"] * 4 + [SUMMARY]
    summary = logger.lines[-1][2]
    assert summary["total"] == 2
    assert summary["top"] == [{"uid": 1001, "exe": "/usr/bin/curl", "count": 2}]
    path = str(tmp_path / "events.jsonl")
    assert len(read_events(path, 100)) == 4
    assert read_events(path, 1, summaries=True)[0]["event"] == SUMMARY
    cap._summary()  # nothing new: no second line
    assert len(logger.lines) == 5


def test_reconfigure_before_start(tmp_path: Path) -> None:
    cap = _capture(tmp_path)
    cap.reconfigure(mode="audit", action="drop")
    assert (cap.stats()["mode"], cap.stats()["action"]) == ("audit", "drop")
    with pytest.raises(CaptureError):
        cap.reconfigure(mode="audit", action="explode")


def _ipv4_icmp() -> bytes:
    icmp = bytes([8, 0, 0, 0, 0, 1, 0, 1])
    return (
        struct.pack("!BBHHHBBH", 0x45, 0, 28, 1, 0, 64, 1, 0)
        + bytes([192, 0, 2, 1, 169, 254, 169, 254])
        + icmp
    )


def test_portless_packets_are_never_folded(tmp_path: Path) -> None:
    cap = _capture(tmp_path)
    cap._attributor = Attributor(Sockets(), str(tmp_path / "noproc"), user_name=lambda u: None)
    first = QueuedPacket(1, NF_INET_LOCAL_OUT, 0, 1001, 1001, None, 2, _ipv4_icmp())
    second = QueuedPacket(2, NF_INET_LOCAL_OUT, 0, 1002, 1002, None, 2, _ipv4_icmp())
    (one,) = cap._attribute(first, 1.0)
    (two,) = cap._attribute(second, 1.1)
    assert (one["uid"], two["uid"]) == (1001, 1002)
    assert one["dport"] is None
