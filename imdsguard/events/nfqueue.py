"""A minimal NFQUEUE client: nfnetlink_queue over a raw ``NETLINK_NETFILTER`` socket.

Why hand-written: there is no maintained pure-Python binding. NetfilterQueue
(the usual choice) needs libnetfilter_queue and a Cython build, which would
put a compiler and a C library into the RPM for the dozen messages we use;
scapy is far too big. The protocol is small and stable (``linux/netfilter/
nfnetlink_queue.h``), so it is written here with :mod:`struct`.

What we use:

- config (``NFQNL_MSG_CONFIG``): bind a queue number, copy packets (up to
  ``copy_range`` bytes), flags ``F_UID_GID`` (the socket owner's uid/gid in
  each packet), ``F_GSO`` (no software segmentation for us) and, in audit
  mode only, ``F_FAIL_OPEN`` (a full queue accepts instead of dropping).
  Since Linux 3.8 a queue serves every address family, so one bind covers
  IPv4 and IPv6; the old per-family PF_BIND commands are no-ops.
- packets (``NFQNL_MSG_PACKET``): id, hook, mark, uid, gid, in/out
  interface and the packet bytes.
- verdicts (``NFQNL_MSG_VERDICT``): verdict plus a new mark.

Queue instances belong to a network namespace, so a daemon in a test
namespace never sees or disturbs another's.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from imdsguard import netlink as nl
from imdsguard.errors import CaptureError as CaptureError  # noqa: PLC0414 - imported from here
from imdsguard.errors import PermissionDeniedError
from imdsguard.errors import QueueBusyError as QueueBusyError  # noqa: PLC0414
from imdsguard.netlink import NetfilterPacket, NetfilterSocket

NFNL_SUBSYS_QUEUE = 3

NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2

NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5

NFQA_CFG_F_FAIL_OPEN = 0x01
NFQA_CFG_F_GSO = 0x04
NFQA_CFG_F_UID_GID = 0x08

NFQNL_COPY_PACKET = 2

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_IFINDEX_INDEV = 5
NFQA_IFINDEX_OUTDEV = 6
NFQA_PAYLOAD = 10
NFQA_UID = 16
NFQA_GID = 17

NF_DROP = 0
NF_ACCEPT = 1
NF_REPEAT = 4

_PACKET_HDR = struct.Struct("!IHB")  # packet_id, hw_protocol, hook
_BE32 = struct.Struct("!I")

DEFAULT_COPY_RANGE = 4096
DEFAULT_MAXLEN = 4096

_NFQ_PROC = "/proc/net/netfilter/nfnetlink_queue"


@dataclass(frozen=True)
class QueuedPacket(NetfilterPacket):
    """One packet the kernel holds for us until we give a verdict (for ``packet_id``)."""

    packet_id: int


def _msg_type(msg: int) -> int:
    return (NFNL_SUBSYS_QUEUE << 8) | msg


def build_config(
    queue_num: int,
    seq: int,
    *,
    command: int | None = None,
    copy_range: int | None = None,
    flags: int | None = None,
    flag_mask: int = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO | NFQA_CFG_F_UID_GID,
    maxlen: int | None = None,
) -> bytes:
    """A config message (with an ACK request) for ``queue_num``."""
    attrs = b""
    if command is not None:
        attrs += nl.attr(NFQA_CFG_CMD, struct.pack("!BxH", command, socket.AF_UNSPEC))
    if copy_range is not None:
        attrs += nl.attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))
    if maxlen is not None:
        attrs += nl.attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(maxlen))
    if flags is not None:
        attrs += nl.attr(NFQA_CFG_MASK, _BE32.pack(flag_mask))
        attrs += nl.attr(NFQA_CFG_FLAGS, _BE32.pack(flags))
    return nl.message(
        _msg_type(NFQNL_MSG_CONFIG),
        nl.NLM_F_REQUEST | nl.NLM_F_ACK,
        seq,
        nl.nfgen(queue_num) + attrs,
    )


def build_verdict(queue_num: int, packet_id: int, verdict: int, mark: int | None = None) -> bytes:
    """A verdict for one packet, optionally setting its mark (no ACK: it is hot path)."""
    attrs = nl.attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
    if mark is not None:
        attrs += nl.attr(NFQA_MARK, _BE32.pack(mark & 0xFFFFFFFF))
    return nl.message(
        _msg_type(NFQNL_MSG_VERDICT), nl.NLM_F_REQUEST, 0, nl.nfgen(queue_num) + attrs
    )


def parse_packet_message(msg: nl.Message) -> QueuedPacket | None:
    """The queued packet in a netlink message; None if it is not one."""
    if msg.type != _msg_type(NFQNL_MSG_PACKET) or len(msg.payload) < nl.NFGEN_HDR.size:
        return None
    attrs = nl.parse_attrs(msg.payload, nl.NFGEN_HDR.size)
    hdr = attrs.get(NFQA_PACKET_HDR)
    if hdr is None or len(hdr) < _PACKET_HDR.size:
        return None
    packet_id, _, hook = _PACKET_HDR.unpack_from(hdr)

    return QueuedPacket(
        packet_id=packet_id,
        hook=hook,
        mark=nl.be32(attrs, NFQA_MARK) or 0,
        uid=nl.be32(attrs, NFQA_UID),
        gid=nl.be32(attrs, NFQA_GID),
        indev=nl.be32(attrs, NFQA_IFINDEX_INDEV),
        outdev=nl.be32(attrs, NFQA_IFINDEX_OUTDEV),
        payload=attrs.get(NFQA_PAYLOAD, b""),
    )


def queue_owner(queue_num: int, proc_file: str = _NFQ_PROC) -> int | None:
    """The netlink port id bound to ``queue_num`` in this namespace, if any.

    Lines of ``/proc/net/netfilter/nfnetlink_queue`` start with the queue
    number and the peer port id (normally the binding process's pid).
    """
    try:
        with open(proc_file, encoding="ascii") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == str(queue_num):
                    return int(fields[1])
    except (OSError, ValueError):
        return None
    return None


class NfQueue(NetfilterSocket[QueuedPacket]):
    """One bound NFQUEUE: receive packets, send verdicts. Not thread-safe."""

    def __init__(
        self, queue_num: int, *, fail_open: bool, copy_range: int = DEFAULT_COPY_RANGE
    ) -> None:
        self.queue_num = queue_num
        super().__init__(parse_packet_message)
        try:
            self._bind(fail_open, copy_range)
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def _bind(self, fail_open: bool, copy_range: int) -> None:
        q = self.queue_num
        try:
            self._request(
                build_config(q, next(self._seq), command=NFQNL_CFG_CMD_BIND), f"binding queue {q}"
            )
        except OSError as exc:
            # The kernel says EPERM both for "no CAP_NET_ADMIN" and "bound by another
            # port"; the queue list in /proc tells the two apart.
            owner = queue_owner(q)
            if exc.errno in (errno.EPERM, errno.EBUSY) and owner is not None:
                raise QueueBusyError(
                    f"NFQUEUE {q} is already bound by netlink port {owner} (normally that "
                    f"process's pid): another imdsguard daemon runs in this network "
                    f"namespace; stop it first"
                ) from None
            if exc.errno == errno.EPERM:
                raise PermissionDeniedError(
                    f"cannot bind NFQUEUE {q}: needs root (CAP_NET_ADMIN)"
                ) from None
            raise CaptureError(f"cannot bind NFQUEUE {q}: {exc.strerror}") from None
        self.configure(fail_open, copy_range)

    def configure(self, fail_open: bool, copy_range: int = DEFAULT_COPY_RANGE) -> None:
        """Set copy mode, queue length and flags (fail-open only in audit mode)."""
        flags = NFQA_CFG_F_UID_GID | NFQA_CFG_F_GSO | (NFQA_CFG_F_FAIL_OPEN if fail_open else 0)
        try:
            self._request(
                build_config(
                    self.queue_num,
                    next(self._seq),
                    copy_range=copy_range,
                    maxlen=DEFAULT_MAXLEN,
                    flags=flags,
                ),
                f"configuring queue {self.queue_num}",
            )
        except OSError as exc:
            raise CaptureError(
                f"cannot configure NFQUEUE {self.queue_num} (kernel too old for "
                f"UID/GID reporting?): {exc.strerror}"
            ) from None
        finally:
            self.sock.setblocking(False)

    def verdict(self, packet_id: int, verdict: int, mark: int | None = None) -> None:
        """Release (or drop) one packet."""
        self.sock.send(build_verdict(self.queue_num, packet_id, verdict, mark))

    def close(self) -> None:
        """Unbind (held packets are dropped by the kernel) and close."""
        self._close(build_config(self.queue_num, next(self._seq), command=NFQNL_CFG_CMD_UNBIND))
