"""A minimal NFLOG client: nfnetlink_log over a raw ``NETLINK_NETFILTER`` socket.

Where it is used: on an nftables host whose kernel has no ``nft_queue``
(``CONFIG_NFT_QUEUE``), the denied packet cannot be held for attribution.
The rules then put a ``log group`` statement in front of the deny (it never
changes a verdict: the packet goes on to the reject or drop), and the
capture reads copies of the packets here. The kernel fills in the socket
owner's uid and gid itself, so the user is always known; the process is
looked up while its socket still exists (with ``action: drop`` the client
waits in ``connect()``; with ``reject`` a process that exits within a
fraction of a millisecond can be gone).

Same framing and socket (:class:`~imdsguard.netlink.NetfilterSocket`) as the
queue client; a :class:`LoggedPacket` is a
:class:`~imdsguard.netlink.NetfilterPacket` like a queued one, so the capture
attributes both alike, but it has no packet id: nothing ever answers it.

Protocol (``linux/netfilter/nfnetlink_log.h``): config messages bind a group,
set the copy mode (``NFULNL_COPY_PACKET`` with a range) and a queue
threshold of 1 (each packet is sent at once, not batched for up to a
second); packet messages carry ``NFULA_PACKET_HDR``, mark, interfaces,
payload, uid and gid.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from imdsguard import netlink as nl
from imdsguard.errors import CaptureError, PermissionDeniedError
from imdsguard.netlink import NetfilterPacket, NetfilterSocket

NFNL_SUBSYS_ULOG = 4

NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1

NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2

NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5

NFULNL_COPY_PACKET = 2

NFULA_PACKET_HDR = 1
NFULA_MARK = 2
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_UID = 11
NFULA_SEQ = 12
NFULA_GID = 14

_PACKET_HDR = struct.Struct("!HBx")  # hw_protocol, hook, pad
_BE32 = struct.Struct("!I")

DEFAULT_COPY_RANGE = 4096


@dataclass(frozen=True)
class LoggedPacket(NetfilterPacket):
    """A copy of a packet the rules logged; ``seq`` is the group's sequence number."""

    seq: int


def _msg_type(msg: int) -> int:
    return (NFNL_SUBSYS_ULOG << 8) | msg


def build_config(
    group: int,
    seq: int,
    *,
    command: int | None = None,
    copy_range: int | None = None,
    qthresh: int | None = None,
    timeout_cs: int | None = None,
) -> bytes:
    """A config message (with an ACK request) for log ``group``."""
    attrs = b""
    if command is not None:
        attrs += nl.attr(NFULA_CFG_CMD, struct.pack("!B", command))
    if copy_range is not None:
        attrs += nl.attr(NFULA_CFG_MODE, struct.pack("!IBx", copy_range, NFULNL_COPY_PACKET))
    if qthresh is not None:
        attrs += nl.attr(NFULA_CFG_QTHRESH, _BE32.pack(qthresh))
    if timeout_cs is not None:
        attrs += nl.attr(NFULA_CFG_TIMEOUT, _BE32.pack(timeout_cs))
    return nl.message(
        _msg_type(NFULNL_MSG_CONFIG), nl.NLM_F_REQUEST | nl.NLM_F_ACK, seq, nl.nfgen(group) + attrs
    )


def parse_log_message(msg: nl.Message) -> LoggedPacket | None:
    """The logged packet in a netlink message; None if it is not one."""
    if msg.type != _msg_type(NFULNL_MSG_PACKET) or len(msg.payload) < nl.NFGEN_HDR.size:
        return None
    attrs = nl.parse_attrs(msg.payload, nl.NFGEN_HDR.size)
    hdr = attrs.get(NFULA_PACKET_HDR)
    if hdr is None or len(hdr) < _PACKET_HDR.size:
        return None
    _, hook = _PACKET_HDR.unpack_from(hdr)

    return LoggedPacket(
        hook=hook,
        mark=nl.be32(attrs, NFULA_MARK) or 0,
        uid=nl.be32(attrs, NFULA_UID),
        gid=nl.be32(attrs, NFULA_GID),
        indev=nl.be32(attrs, NFULA_IFINDEX_INDEV),
        outdev=nl.be32(attrs, NFULA_IFINDEX_OUTDEV),
        payload=attrs.get(NFULA_PAYLOAD, b""),
        seq=nl.be32(attrs, NFULA_SEQ) or 0,
    )


class NfLog(NetfilterSocket[LoggedPacket]):
    """One bound NFLOG group: receive copies of packets. Not thread-safe.

    The same surface as :class:`~imdsguard.events.nfqueue.NfQueue` (``fileno``,
    ``receive``, ``configure``, ``close``) so the capture can use either; there
    is no ``verdict``: the kernel never waits for one.
    """

    def __init__(self, group: int, *, copy_range: int = DEFAULT_COPY_RANGE) -> None:
        self.group = group
        super().__init__(parse_log_message)
        try:
            self._bind(copy_range)
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def _bind(self, copy_range: int) -> None:
        group = self.group
        try:
            self._request(
                build_config(group, next(self._seq), command=NFULNL_CFG_CMD_BIND),
                f"binding log group {group}",
            )
            self._request(
                build_config(
                    group, next(self._seq), copy_range=copy_range, qthresh=1, timeout_cs=1
                ),
                f"configuring log group {group}",
            )
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise PermissionDeniedError(
                    f"cannot bind NFLOG group {group}: needs root (CAP_NET_ADMIN)"
                ) from None
            if exc.errno == errno.EBUSY:
                raise CaptureError(
                    f"NFLOG group {group} is already bound: another imdsguard daemon runs "
                    f"in this network namespace; stop it first"
                ) from None
            raise CaptureError(f"cannot bind NFLOG group {group}: {exc.strerror}") from None

    def configure(self, fail_open: bool, copy_range: int = DEFAULT_COPY_RANGE) -> None:
        """Nothing to change with the mode: a log never blocks (``fail_open`` is moot)."""

    def close(self) -> None:
        """Unbind and close."""
        self._close(build_config(self.group, next(self._seq), command=NFULNL_CFG_CMD_UNBIND))
