"""File locks: serialise firewall changes and tell whether the daemon runs.

``flock`` locks vanish with their holder, so a ``kill -9`` never leaves a
stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator

from imdsguard.errors import ImdsGuardError, LockTimeoutError

#: The lock iptables itself takes (``iptables -w``); holding it keeps our
#: table replacement from racing an ``iptables`` command.
XTABLES_LOCK = "/run/xtables.lock"


def _open_lock(path: str) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:  # ELOOP: a symlink planted in our place; EACCES: not root
        raise ImdsGuardError(
            f"cannot open the lock file {path}: {exc.strerror} "
            "(a symlink or something else planted there? remove it and retry)"
        ) from None


@contextlib.contextmanager
def hold(path: str, timeout: float = 10.0, what: str = "lock") -> Iterator[None]:
    """Hold an exclusive flock on ``path`` for the ``with`` block."""
    fd = _open_lock(path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"another process held {what} {path} for more than {timeout:.0f}s; "
                        "retry, or find it with 'fuser -v " + path + "'"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def try_hold_forever(path: str) -> int | None:
    """Take ``path``'s lock for the life of the process; None when someone else holds it."""
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def is_held(path: str) -> bool:
    """True when another process holds ``path``'s lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
