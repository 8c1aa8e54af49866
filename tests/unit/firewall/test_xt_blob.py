"""Counters are zeroed in an x_tables blob, nothing else; malformed blobs are refused."""

from __future__ import annotations

import struct

import pytest

from imdsguard.firewall._xt_blob import LAYOUT, BlobError, strip_counters


def entry(family: str, size: int, fill: int, counters: tuple[int, int]) -> bytes:
    """One entry of ``size`` bytes filled with ``fill``, its next_offset and counters set."""
    _, _, next_at, counters_at = LAYOUT[family]
    data = bytearray([fill]) * size
    struct.pack_into("=H", data, next_at, size)
    struct.pack_into("=QQ", data, counters_at, *counters)
    return bytes(data)


@pytest.mark.parametrize(("family", "size"), [("ipv4", 152), ("ipv6", 200)])
def test_only_counters_change(family: str, size: int) -> None:
    blob = entry(family, size, 7, (123, 45678)) + entry(family, size + 8, 9, (1, 2))
    quiet = entry(family, size, 7, (0, 0)) + entry(family, size + 8, 9, (0, 0))
    assert strip_counters(family, blob) == quiet
    # The same rules with other counters fingerprint alike; another fill does not.
    busier = entry(family, size, 7, (999, 1)) + entry(family, size + 8, 9, (5, 5))
    assert strip_counters(family, busier) == strip_counters(family, blob)
    edited = entry(family, size, 8, (123, 45678)) + entry(family, size + 8, 9, (1, 2))
    assert strip_counters(family, edited) != strip_counters(family, blob)


def test_empty_table_is_empty() -> None:
    assert strip_counters("ipv4", b"") == b""


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (entry("ipv4", 152, 1, (1, 1))[:100], "truncated"),
        (entry("ipv4", 152, 1, (1, 1)) + b"\0" * 20, "truncated"),
    ],
)
def test_truncated_blob_is_refused(blob: bytes, why: str) -> None:
    with pytest.raises(BlobError, match=why):
        strip_counters("ipv4", blob)


@pytest.mark.parametrize("next_offset", [0, 50, 4096])
def test_bad_next_offset_is_refused(next_offset: int) -> None:
    data = bytearray(entry("ipv4", 152, 1, (1, 1)))
    struct.pack_into("=H", data, LAYOUT["ipv4"][2], next_offset)
    with pytest.raises(BlobError, match="malformed"):
        strip_counters("ipv4", bytes(data))
