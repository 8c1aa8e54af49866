"""A cheap fingerprint of an x_tables (legacy iptables) table, straight from the kernel.

The daemon checks the iptables rules four times a second because x_tables
has no change notification. Reading and parsing every rule through
python-iptables costs about 5 ms a check (2 % of a core when idle), so the
backend first asks the kernel for the table's raw blob, the same two
``getsockopt`` calls ``iptables-save`` makes (``IPT_SO_GET_INFO``, then
``IPT_SO_GET_ENTRIES``), and only parses the rules when the blob differs from
the one it last found in order. The blob holds every rule of the table,
matches and targets included, so any edit changes it; the packet and byte
counters in each entry move with traffic and are zeroed before hashing.

Layout (``linux/netfilter_ipv4/ip_tables.h``, ``linux/netfilter_ipv6/ip6_tables.h``,
identical on every 64-bit and 32-bit Linux ABI we ship for):

- ``struct ipt_getinfo``: name[32], valid_hooks, hook_entry[5], underflow[5],
  num_entries, size (all u32): 84 bytes.
- ``struct ipt_get_entries``: name[32], size (u32), then the entries from
  offset 40 (``struct ipt_entry`` is 8-byte aligned).
- each entry: ``next_offset`` (u16) and ``counters`` (two u64) at fixed
  offsets: 90 and 96 in ``ipt_entry``, 142 and 152 in ``ip6t_entry``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import socket
import struct

from imdsguard.errors import BlobError as BlobError  # noqa: PLC0414 - raised and caught here

SO_GET_INFO = 64  # IPT_SO_GET_INFO == IP6T_SO_GET_INFO
SO_GET_ENTRIES = 65
NAME_LEN = 32
INFO = struct.Struct("=32sI5I5III")
ENTRIES_HEAD = 40  # name[32] + size, padded to the entries' 8-byte alignment

#: family -> (socket family, getsockopt level, next_offset offset, counters offset)
LAYOUT = {
    "ipv4": (socket.AF_INET, socket.IPPROTO_IP, 90, 96),
    "ipv6": (socket.AF_INET6, socket.IPPROTO_IPV6, 142, 152),
}
COUNTERS_SIZE = 16
_ZEROS = bytes(COUNTERS_SIZE)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]
_libc.getsockopt.restype = ctypes.c_int


def strip_counters(family: str, entries: bytes) -> bytes:
    """``entries`` (a table's rules, back to back) with every entry's counters zeroed."""
    _, _, next_at, counters_at = LAYOUT[family]
    out = bytearray(entries)
    at = 0
    while at < len(out):
        if at + counters_at + COUNTERS_SIZE > len(out):
            raise BlobError(0, f"truncated {family} table entry at offset {at}")
        (step,) = struct.unpack_from("=H", out, at + next_at)
        if step < counters_at + COUNTERS_SIZE or at + step > len(out):
            raise BlobError(0, f"malformed {family} table entry at offset {at}")
        out[at + counters_at : at + counters_at + COUNTERS_SIZE] = _ZEROS
        at += step
    return bytes(out)


class TableReader:
    """Reads one family's table blob; one raw socket, kept open."""

    def __init__(self, family: str, table: str = "filter") -> None:
        self.family = family
        self.table = table.encode()
        sock_family, self._level, self._next_at, self._counters_at = LAYOUT[family]
        self._sock = socket.socket(sock_family, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def close(self) -> None:
        self._sock.close()

    def _get(self, optname: int, buf: ctypes.Array[ctypes.c_char]) -> None:
        size = ctypes.c_uint32(len(buf))
        if _libc.getsockopt(self._sock.fileno(), self._level, optname, buf, ctypes.byref(size)):
            err = ctypes.get_errno()
            raise BlobError(err, f"{self.family} table: getsockopt({optname}): {os.strerror(err)}")

    def info(self) -> bytes:
        """The table's header alone (hooks, entry count, size): one cheap getsockopt.

        Any replace that drops or adds a rule changes it (a table restored
        without our chain has fewer entries); only a same-size edit does not,
        which :meth:`fingerprint` sees.
        """
        info = ctypes.create_string_buffer(self.table, INFO.size)
        self._get(SO_GET_INFO, info)
        return info.raw[NAME_LEN:]

    def blob(self) -> bytes:
        """The table's info and entries with the counters zeroed."""
        for _ in range(5):  # the table may be replaced between the two calls
            info = ctypes.create_string_buffer(self.table, INFO.size)
            self._get(SO_GET_INFO, info)
            size = INFO.unpack(info.raw)[-1]
            entries = ctypes.create_string_buffer(ENTRIES_HEAD + size)
            struct.pack_into(f"={NAME_LEN}sI", entries, 0, self.table, size)
            try:
                self._get(SO_GET_ENTRIES, entries)
            except BlobError as exc:
                if exc.errno == 11:  # EAGAIN: the size changed under us
                    continue
                raise
            entries_raw = entries.raw[ENTRIES_HEAD : ENTRIES_HEAD + size]
            return info.raw[NAME_LEN:] + strip_counters(self.family, entries_raw)
        raise BlobError(11, f"the {self.family} table kept changing while being read")

    def fingerprint(self) -> bytes:
        """A digest that changes whenever any rule of the table does."""
        return hashlib.blake2b(self.blob(), digest_size=16).digest()
