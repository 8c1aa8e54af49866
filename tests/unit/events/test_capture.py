"""Capture logic without the kernel: event shape, packet handling, rate limit and summary."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from imdsguard.config import parse_config
from imdsguard.domain import Action, Mode
from imdsguard.errors import ConfigError
from imdsguard.events import capture as capture_module
from imdsguard.events.attribution import Attribution, Attributor
from imdsguard.events.capture import Capture, CaptureComponent, build_event, rfc3339
from imdsguard.events.event import (
    EVENT_FIELDS,
    FORWARDED_FIELDS,
    OTHER_PROCESS,
    SUMMARY,
    Event,
    ProcessKey,
)
from imdsguard.events.log import EventLog, read_events
from imdsguard.events.nfqueue import QueuedPacket
from imdsguard.events.packet import IPPROTO_TCP, TCP_SYN, Packet
from imdsguard.events.sockdiag import SocketInfo
from imdsguard.netlink import NF_INET_FORWARD, NF_INET_LOCAL_OUT
from imdsguard_testing.fakes import RecordingLogger

#: What every event has; forwarded traffic adds FORWARDED_FIELDS.
CONTRACT_FIELDS = [f for f in EVENT_FIELDS if f not in FORWARDED_FIELDS]

SYN = Packet("ipv4", IPPROTO_TCP, "192.0.2.1", "169.254.169.254", 40000, 80, TCP_SYN)


def test_rfc3339() -> None:
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500Z"


def test_event_has_exactly_the_contract_fields() -> None:
    event = build_event("enforce", SYN, Attribution(uid=1, attributed=False), 1.0)
    assert list(event) == CONTRACT_FIELDS
    assert set(event) == Event.__required_keys__
    assert event["event"] == "imds_access_blocked"
    assert event["cmdline"] == [] and event["ancestors"] == []
    audit = build_event("audit", SYN, Attribution(), 1.0)
    assert audit["event"] == "imds_access_audited"


def test_forwarded_event_adds_src_and_iface() -> None:
    event = build_event("enforce", SYN, Attribution(), 1.0, forwarded=True, iface="docker0")
    assert list(event) == list(EVENT_FIELDS)  # src after family, iface last
    assert (event["src"], event["iface"], event["uid"], event["pid"]) == (
        "192.0.2.1",
        "docker0",
        None,
        None,
    )


def test_bad_mode_is_refused_at_the_config_boundary(tmp_path: Path) -> None:
    """The config validates mode/action once; the capture takes the members it made."""
    with pytest.raises(ConfigError, match="mode"):
        parse_config("mode: block\n")
    component = CaptureComponent(
        parse_config("mode: audit\naction: drop\n"),
        RecordingLogger(),
        event_log=EventLog(str(tmp_path / "e")),
    )
    assert component.capture.mode is Mode.AUDIT and component.capture.action is Action.DROP
    component.reconfigure(parse_config("mode: enforce\n"))
    assert component.capture.mode is Mode.ENFORCE and component.capture.action is Action.REJECT


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
    qp = QueuedPacket(NF_INET_LOCAL_OUT, 0, 1001, 1001, None, 2, _ipv4_syn(40000), packet_id=1)
    assert cap._attribute(qp, 1.0) == []  # drop: folded until idle
    assert cap._attribute(qp, 1.0) == []
    (event,) = cap._flows.flush()
    assert event["attempts"] == 2
    assert (event["uid"], event["user"], event["attributed"]) == (1001, "alice", False)


def test_forwarded_packets_are_not_attributed(tmp_path: Path) -> None:
    cap = _capture(tmp_path)
    cap._attributor = Attributor(Sockets(), str(tmp_path / "noproc"))
    qp = QueuedPacket(NF_INET_FORWARD, 0, None, None, 1, 2, _ipv4_syn(40001), packet_id=1)
    (event,) = cap._attribute(qp, 1.0)
    assert event["src"] == "192.0.2.1" and event["uid"] is None and "iface" in event


def test_garbage_packet_counts_an_error(tmp_path: Path) -> None:
    cap = _capture(tmp_path)
    cap._attributor = Attributor(Sockets(), str(tmp_path / "noproc"))
    assert (
        cap._attribute(QueuedPacket(3, 0, None, None, None, None, b"\x00junk", packet_id=1), 1.0)
        == []
    )
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


def test_per_process_counts_are_tuples_kept_out_of_the_health_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture_module, "MAX_PROCESS_KEYS", 2)
    cap = _capture(tmp_path)
    for user, exe in [("alice", "/usr/bin/curl"), ("alice", "/usr/bin/curl"), (None, None),
                      ("bob", "/bin/sh"), ("carol", "/bin/sh")]:  # fmt: skip
        event = build_event(Mode.ENFORCE, SYN, Attribution(user=user, exe=exe), 1.0)
        cap._write(event, now=0.0)
    assert cap.by_process == {
        ProcessKey("alice", "/usr/bin/curl"): 2,
        ProcessKey("?", "?"): 1,
        OTHER_PROCESS: 2,  # over the cap: bob and carol
    }
    assert ProcessKey("alice", "/usr/bin/curl").user == "alice"
    # What the daemon logs at daemon_stopped and publishes: JSON, no per-process keys.
    health = json.dumps(cap.stats())
    assert "by_process" not in health and "alice" not in health


def test_reconfigure_before_start(tmp_path: Path) -> None:
    cap = _capture(tmp_path)
    cap.reconfigure(mode=Mode.AUDIT, action=Action.DROP)
    assert (cap.stats()["mode"], cap.stats()["action"]) == ("audit", "drop")
    # A bad action never gets here: the config refuses it (test_config, "action: accept").


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
    first = QueuedPacket(NF_INET_LOCAL_OUT, 0, 1001, 1001, None, 2, _ipv4_icmp(), packet_id=1)
    second = QueuedPacket(NF_INET_LOCAL_OUT, 0, 1002, 1002, None, 2, _ipv4_icmp(), packet_id=2)
    (one,) = cap._attribute(first, 1.0)
    (two,) = cap._attribute(second, 1.1)
    assert (one["uid"], two["uid"]) == (1001, 1002)
    assert one["dport"] is None


def test_daemon_metrics_read_the_per_process_counts(tmp_path: Path) -> None:
    from imdsguard.config import Config
    from imdsguard_testing.fakes import fake_daemon

    component = CaptureComponent(
        Config(), RecordingLogger(), event_log=EventLog(str(tmp_path / "e"))
    )
    component.capture._write(
        build_event(Mode.ENFORCE, SYN, Attribution(user="a", exe="/x"), 1.0), 0
    )
    daemon = fake_daemon(Config())
    daemon._components["capture"] = component
    assert daemon.metrics_snapshot()["blocked_by"] == {("a", "/x"): 1}
