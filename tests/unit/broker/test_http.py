"""The non-blocking read and write helpers the broker and the metrics endpoint share."""

from __future__ import annotations

import socket

from imdsguard.broker._http import recv_some, send_some


def test_recv_some_nothing_data_and_closed() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        assert recv_some(a) is None  # nothing yet
        b.sendall(b"GET / HTTP/1.1\r\n")
        assert recv_some(a) == b"GET / HTTP/1.1\r\n"
        b.close()
        assert recv_some(a) == b""  # the peer closed
    finally:
        a.close()


def test_recv_some_on_a_failed_socket_is_empty() -> None:
    a, b = socket.socketpair()
    a.close()
    b.close()
    assert recv_some(a) == b""  # closed fd: OSError, answered like a close


def test_send_some_whole_partial_and_failed() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        assert send_some(a, b"hello") == b""
        assert b.recv(16) == b"hello"
        big = b"x" * (1 << 24)
        left = send_some(a, big)
        assert left is not None and 0 < len(left) < len(big)  # the buffer took a part
        assert send_some(a, left) == left  # full: nothing taken, nothing lost
        b.close()
        while left:  # the peer is gone: a failure, not a hang
            left = send_some(a, left)
        assert left is None
    finally:
        a.close()
