"""The broker's socket file: bind it safely, refuse a live one, unlink only our own.

The socket is 0666: access control is by the peer's kernel credentials,
not by file permissions. Its directory must be ours and not writable by
others (it is made searchable for every uid); we refuse to start over a
live socket and never follow a symlink. In the broker process the daemon
binds it (root owns the file, so the broker cannot replace it) and passes
the listening socket; the socket's (dev, inode) lets whoever bound it
unlink it at exit only if it is still the same file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from imdsguard import paths
from imdsguard.errors import BrokerError, ImdsGuardError


def bind_socket(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening, non-blocking Unix socket at ``path`` (mode 0666) and its (dev, inode).

    The directory is created (0755) or must be ours and not writable by
    others. An existing socket that answers means another broker runs: we
    refuse. A stale one is removed. Anything else at ``path`` (a file, a
    symlink) is refused, never followed or deleted.
    """
    directory = os.path.dirname(path) or "."
    try:
        paths.ensure_dir(directory)
    except FileNotFoundError:
        raise BrokerError(
            f"cannot create the broker socket directory {directory}: its parent does not exist"
        ) from None
    except ImdsGuardError as exc:
        raise BrokerError(f"broker socket directory: {exc}") from None
    except OSError as exc:
        raise BrokerError(f"cannot create {directory}: {exc.strerror}") from None
    mode = stat.S_IMODE(os.stat(directory).st_mode)
    if mode & 0o011 != 0o011:  # clients of every uid must be able to reach the socket
        os.chmod(directory, mode | 0o011)  # noqa: S103 - search only, never write
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
            raise BrokerError(f"{path} exists and is {kind}: remove it, then start again")
        if answers(path):
            raise BrokerError(
                f"another broker is already listening on {path} (a second imdsguard daemon?)"
            )
        os.unlink(path)  # stale: its server is gone
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)  # noqa: S103 - access control is by peer credentials, not mode
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        st = os.lstat(path)
    except OSError as exc:
        sock.close()
        raise BrokerError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock, (st.st_dev, st.st_ino)


def answers(path: str) -> bool:
    """Whether a server listens on the Unix socket ``path`` (a full backlog counts)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except socket.timeout:
        return True  # a listener with a full backlog is still a listener
    except OSError as exc:
        raise BrokerError(f"cannot check the existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    return True


def unlink_socket(path: str, expected: tuple[int, int] | None) -> None:
    """Remove ``path`` if it is still the socket we bound (not a successor's)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if expected is None or (st.st_dev, st.st_ino) == expected:
        with contextlib.suppress(OSError):
            os.unlink(path)
