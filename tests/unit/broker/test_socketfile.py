"""The broker's socket file, without a broker: bind, refuse, unlink only our own."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from imdsguard.broker.socketfile import answers, bind_socket, unlink_socket
from imdsguard.errors import BrokerError


def test_bind_makes_a_0666_listening_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "b.sock")
    sock, ident = bind_socket(path)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o666
        assert ident == (st.st_dev, st.st_ino)
        assert not sock.getblocking()
        assert answers(path)
    finally:
        sock.close()
        unlink_socket(path, ident)
    assert not os.path.exists(path)
    assert not answers(path)


def test_refuses_a_live_socket_and_replaces_a_stale_one(tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    sock, _ = bind_socket(path)
    with pytest.raises(BrokerError, match="already listening"):
        bind_socket(path)
    sock.close()  # stale now: the file stays, nobody listens
    assert os.path.exists(path) and not answers(path)
    again, ident2 = bind_socket(path)
    try:
        assert answers(path)
    finally:
        again.close()
        unlink_socket(path, ident2)
    assert not os.path.exists(path)


def test_never_follows_or_removes_what_is_not_a_socket(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "link.sock"
    link.symlink_to(target)
    with pytest.raises(BrokerError, match="a symlink"):
        bind_socket(str(link))
    plain = tmp_path / "plain.sock"
    plain.write_text("keep")
    with pytest.raises(BrokerError, match="not a socket"):
        bind_socket(str(plain))
    assert target.read_text() == "keep" and plain.read_text() == "keep"


def test_unlink_leaves_a_successors_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    first, ident = bind_socket(path)
    os.unlink(path)  # (first stays open, so its inode number is not reused at once)
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    successor.bind(path)
    try:
        unlink_socket(path, ident)
        assert os.path.exists(path)
    finally:
        successor.close()
        first.close()
    unlink_socket(path, None)  # None: whatever is there
    assert not os.path.exists(path)
    unlink_socket(path, None)  # already gone: no error
