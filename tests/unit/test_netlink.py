"""Netlink message building and parsing: nlmsg/nlattr, NFQUEUE config/verdict/packet, sock_diag."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

from imdsguard import netlink as nl
from imdsguard.events import nflog
from imdsguard.events import nfqueue as nfq
from imdsguard.events import sockdiag as sd
from imdsguard.events.packet import IPPROTO_TCP, IPPROTO_UDP


def test_attr_padding_and_round_trip() -> None:
    data = nl.attr(1, b"abc") + nl.attr(2, b"") + nl.attr(3 | nl.NLA_F_NESTED, b"12345")
    assert len(data) == 8 + 4 + 12
    assert nl.parse_attrs(data) == {1: b"abc", 2: b"", 3: b"12345"}


def test_attr_parser_stops_at_truncation() -> None:
    data = nl.attr(1, b"abcd") + struct.pack("=HH", 200, 2) + b"xx"
    assert nl.parse_attrs(data) == {1: b"abcd"}


def test_message_round_trip_several_per_datagram() -> None:
    one = nl.message(17, nl.NLM_F_REQUEST, 5, b"hello")
    two = nl.message(18, 0, 6, b"")
    msgs = list(nl.parse_messages(one + b"\0" * (nl.align4(len(one)) - len(one)) + two))
    assert [(m.type, m.flags, m.seq, m.payload) for m in msgs] == [
        (17, nl.NLM_F_REQUEST, 5, b"hello"),
        (18, 0, 6, b""),
    ]


def test_error_code() -> None:
    ack = nl.Message(nl.NLMSG_ERROR, 0, 1, 0, struct.pack("=i", 0) + b"\0" * 16)
    err = nl.Message(nl.NLMSG_ERROR, 0, 1, 0, struct.pack("=i", -1) + b"\0" * 16)
    assert nl.error_code(ack) == 0
    assert nl.error_code(err) == 1


def test_nfqueue_bind_message() -> None:
    data = nfq.build_config(5421, 7, command=nfq.NFQNL_CFG_CMD_BIND)
    (msg,) = nl.parse_messages(data)
    assert msg.type == (3 << 8) | 2
    assert msg.flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK
    assert msg.seq == 7
    family, version, res_id = nl.NFGEN_HDR.unpack_from(msg.payload)
    assert (family, version, res_id) == (socket.AF_UNSPEC, 0, 5421)
    attrs = nl.parse_attrs(msg.payload, 4)
    assert attrs == {nfq.NFQA_CFG_CMD: struct.pack("!BxH", 1, 0)}


def test_nfqueue_params_message_flags() -> None:
    data = nfq.build_config(1, 2, copy_range=4096, maxlen=100, flags=nfq.NFQA_CFG_F_UID_GID)
    (msg,) = nl.parse_messages(data)
    attrs = nl.parse_attrs(msg.payload, 4)
    assert attrs[nfq.NFQA_CFG_PARAMS] == struct.pack("!IB", 4096, nfq.NFQNL_COPY_PACKET)
    assert attrs[nfq.NFQA_CFG_QUEUE_MAXLEN] == struct.pack("!I", 100)
    assert struct.unpack("!I", attrs[nfq.NFQA_CFG_FLAGS])[0] == nfq.NFQA_CFG_F_UID_GID
    mask = struct.unpack("!I", attrs[nfq.NFQA_CFG_MASK])[0]
    assert mask & nfq.NFQA_CFG_F_FAIL_OPEN  # so switching back from audit clears it


def test_nfqueue_verdict_message() -> None:
    (msg,) = nl.parse_messages(nfq.build_verdict(5421, 99, nfq.NF_REPEAT, 0x1234 | 0x1000))
    assert msg.type == (3 << 8) | 1
    assert msg.flags & nl.NLM_F_ACK == 0
    attrs = nl.parse_attrs(msg.payload, 4)
    assert struct.unpack("!II", attrs[nfq.NFQA_VERDICT_HDR]) == (nfq.NF_REPEAT, 99)
    assert struct.unpack("!I", attrs[nfq.NFQA_MARK]) == (0x1234 | 0x1000,)
    (no_mark,) = nl.parse_messages(nfq.build_verdict(1, 2, nfq.NF_DROP))
    assert nfq.NFQA_MARK not in nl.parse_attrs(no_mark.payload, 4)


def _kernel_packet(attrs: bytes, kind: int = (3 << 8) | 0) -> nl.Message:
    data = nl.message(kind, 0, 0, nl.NFGEN_HDR.pack(socket.AF_INET, 0, 5421) + attrs)
    (msg,) = nl.parse_messages(data)
    return msg


def test_nfqueue_packet_parse() -> None:
    attrs = (
        nl.attr(nfq.NFQA_PACKET_HDR, struct.pack("!IHB", 42, 0x0800, nl.NF_INET_LOCAL_OUT))
        + nl.attr(nfq.NFQA_MARK, struct.pack("!I", 0x20))
        + nl.attr(nfq.NFQA_IFINDEX_OUTDEV, struct.pack("!I", 2))
        + nl.attr(nfq.NFQA_UID, struct.pack("!I", 1001))
        + nl.attr(nfq.NFQA_GID, struct.pack("!I", 1002))
        + nl.attr(nfq.NFQA_PAYLOAD, b"\x45packet")
    )
    pkt = nfq.parse_packet_message(_kernel_packet(attrs))
    assert pkt == nfq.QueuedPacket(
        packet_id=42,
        hook=nl.NF_INET_LOCAL_OUT,
        mark=0x20,
        uid=1001,
        gid=1002,
        indev=None,
        outdev=2,
        payload=b"\x45packet",
    )


def test_nfqueue_packet_without_owner() -> None:
    attrs = nl.attr(nfq.NFQA_PACKET_HDR, struct.pack("!IHB", 1, 0x86DD, nl.NF_INET_FORWARD))
    pkt = nfq.parse_packet_message(_kernel_packet(attrs))
    assert pkt is not None
    assert (pkt.uid, pkt.gid, pkt.mark, pkt.hook) == (None, None, 0, nl.NF_INET_FORWARD)


def test_nfqueue_non_packet_messages_are_ignored() -> None:
    assert nfq.parse_packet_message(_kernel_packet(b"", kind=nl.NLMSG_ERROR)) is None
    assert nfq.parse_packet_message(_kernel_packet(nl.attr(nfq.NFQA_MARK, b"\0" * 4))) is None


def test_queue_owner_from_proc(tmp_path: Path) -> None:
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text(
        "    1  12345     0 2  4096     0     0        0  1\n"
        " 5421   4711     0 2  4096     0     0       10  1\n"
    )
    assert nfq.queue_owner(5421, str(proc)) == 4711
    assert nfq.queue_owner(7, str(proc)) is None
    assert nfq.queue_owner(5421, str(tmp_path / "missing")) is None


def test_sockdiag_tcp_request_layout() -> None:
    data = sd.build_request("ipv4", IPPROTO_TCP, ("192.0.2.1", 40000), ("169.254.169.254", 80), 9)
    (msg,) = nl.parse_messages(data)
    assert (msg.type, msg.flags, msg.seq) == (nl.SOCK_DIAG_BY_FAMILY, nl.NLM_F_REQUEST, 9)
    family, proto, _ext, states = struct.unpack_from("=BBBxI", msg.payload)
    assert (family, proto, states) == (socket.AF_INET, IPPROTO_TCP, 0xFFFFFFFF)
    sport, dport = struct.unpack_from("!HH", msg.payload, 8)
    assert (sport, dport) == (40000, 80)  # TCP: src is the local end
    assert msg.payload[12:16] == ipaddress.IPv4Address("192.0.2.1").packed
    assert msg.payload[28:32] == ipaddress.IPv4Address("169.254.169.254").packed
    assert struct.unpack_from("=III", msg.payload, 44) == (0, 0xFFFFFFFF, 0xFFFFFFFF)
    assert len(msg.payload) == 8 + sd.SOCKID_SIZE


def test_sockdiag_udp_request_swaps_ends() -> None:
    data = sd.build_request("ipv6", IPPROTO_UDP, ("2001:db8::1", 5000), ("fd00:ec2::254", 80))
    (msg,) = nl.parse_messages(data)
    assert struct.unpack_from("!HH", msg.payload, 8) == (80, 5000)
    assert msg.payload[12:28] == ipaddress.IPv6Address("fd00:ec2::254").packed


def _diag_answer(seq: int, uid: int, inode: int, state: int = 2) -> bytes:
    body = (
        struct.pack("=BBBB", socket.AF_INET, state, 0, 0)
        + b"\0" * sd.SOCKID_SIZE
        + struct.pack("=IIIII", 0, 0, 0, uid, inode)
    )
    return nl.message(nl.SOCK_DIAG_BY_FAMILY, 0, seq, body)


def test_sockdiag_response_round_trip() -> None:
    assert sd.parse_response(_diag_answer(3, 1001, 777), 3) == sd.SocketInfo(777, 1001, 2)
    assert sd.parse_response(_diag_answer(2, 1001, 777), 3) is None  # stale answer
    error = nl.message(nl.NLMSG_ERROR, 0, 3, struct.pack("=i", -2) + b"\0" * 16)
    assert sd.parse_response(error, 3) is None


# --- NFLOG (nftables without nft_queue) ------------------------------------------------


def _kernel_log(attrs: bytes, group: int = 5421) -> nl.Message:
    body = nl.NFGEN_HDR.pack(socket.AF_INET, 0, group) + attrs
    data = nl.message((nflog.NFNL_SUBSYS_ULOG << 8) | nflog.NFULNL_MSG_PACKET, 0, 0, body)
    return next(nl.parse_messages(data))


def test_nflog_bind_and_mode_messages() -> None:
    bind = next(nl.parse_messages(nflog.build_config(5421, 7, command=nflog.NFULNL_CFG_CMD_BIND)))
    assert bind.type == (4 << 8) | 1 and bind.seq == 7
    assert bind.flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK
    assert nl.NFGEN_HDR.unpack_from(bind.payload) == (socket.AF_UNSPEC, 0, 5421)
    attrs = nl.parse_attrs(bind.payload, nl.NFGEN_HDR.size)
    assert attrs == {nflog.NFULA_CFG_CMD: bytes([nflog.NFULNL_CFG_CMD_BIND])}
    mode = next(
        nl.parse_messages(nflog.build_config(5421, 8, copy_range=4096, qthresh=1, timeout_cs=1))
    )
    attrs = nl.parse_attrs(mode.payload, nl.NFGEN_HDR.size)
    # struct nfulnl_msg_config_mode: __be32 copy_range, __u8 copy_mode, __u8 pad (packed).
    assert attrs[nflog.NFULA_CFG_MODE] == struct.pack("!IBx", 4096, nflog.NFULNL_COPY_PACKET)
    assert attrs[nflog.NFULA_CFG_QTHRESH] == struct.pack("!I", 1)
    assert attrs[nflog.NFULA_CFG_TIMEOUT] == struct.pack("!I", 1)


def test_nflog_packet_parse() -> None:
    attrs = (
        nl.attr(nflog.NFULA_PACKET_HDR, struct.pack("!HBx", 0x0800, nl.NF_INET_LOCAL_OUT))
        + nl.attr(nflog.NFULA_MARK, struct.pack("!I", 0x20))
        + nl.attr(nflog.NFULA_IFINDEX_OUTDEV, struct.pack("!I", 2))
        + nl.attr(nflog.NFULA_PAYLOAD, b"\x45packet")
        + nl.attr(nflog.NFULA_UID, struct.pack("!I", 1001))
        + nl.attr(nflog.NFULA_GID, struct.pack("!I", 1002))
    )
    pkt = nflog.parse_log_message(_kernel_log(attrs))
    assert pkt == nflog.LoggedPacket(
        hook=nl.NF_INET_LOCAL_OUT,
        mark=0x20,
        uid=1001,
        gid=1002,
        indev=None,
        outdev=2,
        payload=b"\x45packet",
        seq=0,
    )
    assert not isinstance(pkt, nfq.QueuedPacket)  # nothing to answer for a logged copy
    forwarded = nl.attr(nflog.NFULA_PACKET_HDR, struct.pack("!HBx", 0x86DD, nl.NF_INET_FORWARD))
    pkt = nflog.parse_log_message(_kernel_log(forwarded))
    assert pkt is not None and (pkt.uid, pkt.hook) == (None, nl.NF_INET_FORWARD)
    # A queue packet is not a log packet, and a log message without its header is nothing.
    queued = nl.attr(nfq.NFQA_PACKET_HDR, struct.pack("!IHB", 1, 0x0800, 3))
    assert nflog.parse_log_message(_kernel_packet(queued)) is None
    assert nflog.parse_log_message(_kernel_log(nl.attr(nflog.NFULA_MARK, b"\0" * 4))) is None
