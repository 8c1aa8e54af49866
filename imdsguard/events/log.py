"""The event log: append, rotate, read, follow, count (rendering for people: :mod:`.render`).

File format: one JSON object per line, ``"event"`` first, compact, ASCII
only (``json.dumps`` escapes every control character and non-ASCII code
point, so a hostile command line can neither break a line nor smuggle a
terminal escape into the file).

Writing: ``O_APPEND`` (every line lands whole at the end), ``O_NOFOLLOW``
and a regular-file check (no symlink or device tricks), mode 0640 (command
lines can be sensitive). When the next line would pass ``max_bytes`` the
file is renamed to ``<path>.1`` (``keep`` generations) and a new one
started, so the log never holds more than about ``(keep + 1) * max_bytes``.

History per user: when the oldest generation is dropped, each user's last
``RETAIN_PER_UID`` events in it (for the ``RETAIN_UIDS`` users seen most
recently) are carried over to the front of the generation that becomes the
oldest. One user flooding the log can rotate away only its own history,
never another user's last attempts; what is carried over is bounded
(about 1,000 lines). Chosen over per-user files (one file per uid is a
file-count a local user could grow) and over a separate "retained" file
(every reader would have to merge it).

Counting (``status``'s ``blocked.total``) must survive rotation: when a
generation is deleted, the number of events it held is added to a small
sidecar, ``<path>.rotated``; the total is that number plus the events in
the files still present. No per-event state write, and an operator who
deletes the log resets the count, as they would expect.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from imdsguard import paths
from imdsguard.errors import EventLogError as EventLogError  # noqa: PLC0414 - raised here
from imdsguard.events.event import SUMMARY
from imdsguard.events.render import console_processor as console_processor  # noqa: PLC0414
from imdsguard.events.render import escape as escape  # noqa: PLC0414
from imdsguard.events.render import escape_value as escape_value  # noqa: PLC0414
from imdsguard.events.render import format_console as format_console  # noqa: PLC0414

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP = 1
RETAIN_PER_UID = 10  # events of each user carried over when a generation is dropped
RETAIN_UIDS = 100  # ... for this many users (the most recently seen)
EVENT_PREFIX = b'{"event":"imds_access_'
_CHUNK = 65536


def serialize(event: Mapping[str, Any]) -> str:
    """One log line (without the newline) for ``event``: compact JSON, ``event`` first."""
    ordered = {"event": event.get("event")}
    ordered.update((k, v) for k, v in event.items() if k != "event")
    return json.dumps(ordered, ensure_ascii=True, separators=(",", ":"), default=str)


def _open_append(path: str) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EventLogError(
                exc.errno, f"{path} is a symlink; refusing to write the event log through it"
            ) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise EventLogError(
            errno.EINVAL, f"{path} is not a plain file (or has other hard links); remove it"
        )
    if stat.S_IMODE(st.st_mode) & 0o137:
        os.fchmod(fd, 0o640)
    return fd


def _open_read(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _count_fd(fd: int) -> int:
    """Lines of ours that are blocked/audited events, in the file behind ``fd``."""
    total = 0
    tail = b"\n"
    while True:
        chunk = os.read(fd, 1024 * 1024)
        if not chunk:
            return total
        data = tail + chunk
        total += data.count(b"\n" + EVENT_PREFIX)
        tail = data[-len(EVENT_PREFIX) :]


def _count_file(path: str) -> int:
    fd = _open_read(path)
    if fd is None:
        return 0
    try:
        return _count_fd(fd)
    finally:
        os.close(fd)


def _rotated_path(path: str) -> str:
    return path + ".rotated"


def _read_rotated(path: str) -> int:
    fd = _open_read(_rotated_path(path))
    if fd is None:
        return 0
    try:
        return int(os.read(fd, 64).decode("ascii").strip() or 0)
    except ValueError:
        return 0
    finally:
        os.close(fd)


def _write_rotated(path: str, value: int) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".rotated.", dir=directory)
    try:
        os.write(fd, f"{value}\n".encode("ascii"))
        os.fchmod(fd, 0o644)
        os.close(fd)
        os.replace(tmp, _rotated_path(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _owner(line: bytes) -> Any:
    """Whose event a line is: its uid, or for forwarded traffic its source address."""
    event = _parse(line)
    if event is None:
        return None
    uid = event.get("uid")
    return ("uid", uid) if uid is not None else ("src", event.get("src"))


def _retained(path: str, per_owner: int, owners: int) -> list[bytes]:
    """The lines to carry over when ``path`` is dropped: each owner's last events.

    Per owner (uid, or source address for forwarded traffic) the last
    ``per_owner`` events, for the ``owners`` owners seen most recently, in
    file order. A flood by one user then costs the others nothing: their
    last events move on with the log, whatever the flood rotated away.
    """
    fd = _open_read(path)
    if fd is None or per_owner <= 0:
        if fd is not None:
            os.close(fd)
        return []
    try:
        with os.fdopen(fd, "rb") as fh:
            lines = fh.read().split(b"\n")
    except OSError:
        return []
    last: dict[Any, deque[int]] = {}
    for index, line in enumerate(lines):
        if not line.startswith(EVENT_PREFIX):
            continue
        owner = _owner(line)
        if owner is None:
            continue
        seen = last.pop(owner, None) or deque(maxlen=per_owner)
        seen.append(index)
        last[owner] = seen  # re-inserted: dict order is "most recently seen last"
    chosen = list(last.values())[-owners:]
    return [lines[i] + b"\n" for i in sorted(i for seen in chosen for i in seen)]


def _prepend(path: str, head: bytes) -> None:
    """Put ``head`` (older lines) before what ``path`` holds, atomically."""
    directory = os.path.dirname(path) or "."
    fd = _open_read(path)
    rest = b""
    if fd is not None:
        with os.fdopen(fd, "rb") as fh:
            rest = fh.read()
    tmp_fd, tmp = tempfile.mkstemp(prefix=".events.", dir=directory)
    try:
        with os.fdopen(tmp_fd, "wb") as out:
            out.write(head + rest)
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class EventLog:
    """Append-only, size-capped JSON-lines event log (see the module docstring).

    Thread-safe. The file is opened on first use, so constructing one costs
    nothing and the log directory is created (root-owned, 0755) only when
    an event is written.
    """

    def __init__(
        self,
        path: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        retain_per_uid: int = RETAIN_PER_UID,
        retain_uids: int = RETAIN_UIDS,
    ) -> None:
        self.path = path or paths.events_file()
        self.max_bytes = max_bytes
        self.keep = max(1, keep)
        self.retain_per_uid = retain_per_uid
        self.retain_uids = retain_uids
        self._fd: int | None = None
        self._size = 0
        self._lock = threading.Lock()

    def _ensure_open(self) -> int:
        if self._fd is None:
            directory = os.path.dirname(self.path)
            if directory and not os.path.isdir(directory):
                paths.ensure_dir(directory)
            self._fd = _open_append(self.path)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def append(self, event: Mapping[str, Any]) -> None:
        """Write ``event`` as one line (rotating first if the file would grow too big)."""
        data = (serialize(event) + "\n").encode("ascii")
        with self._lock:
            fd = self._ensure_open()
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
                fd = self._ensure_open()
            os.write(fd, data)
            self._size += len(data)

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        oldest = f"{self.path}.{self.keep}"
        kept = _retained(oldest, self.retain_per_uid, self.retain_uids)
        dropped = _count_file(oldest) - len(kept)
        if dropped > 0:
            _write_rotated(self.path, _read_rotated(self.path) + dropped)
        for gen in range(self.keep, 1, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{gen - 1}", f"{self.path}.{gen}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, f"{self.path}.1")
        if kept:
            _prepend(oldest, b"".join(kept))

    def close(self) -> None:
        """Close the file (the next append reopens it)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _generations(path: str) -> list[str]:
    """Existing files of the log, oldest first."""
    older = []
    gen = 1
    while os.path.lexists(f"{path}.{gen}") and gen < 100:
        older.append(f"{path}.{gen}")
        gen += 1
    return [*reversed(older), path]


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _wanted(event: dict[str, Any], summaries: bool) -> bool:
    name = str(event.get("event", ""))
    return name.startswith("imds_access_") or (summaries and name == SUMMARY)


def _tail_lines(path: str, n: int, end: int | None = None) -> tuple[list[bytes], bool]:
    """The last ``n`` complete lines of ``path`` before offset ``end`` (reads backwards).

    Also says whether that is the whole file (fewer lines there than asked).
    """
    fd = _open_read(path)
    if fd is None:
        return [], True
    try:
        size = os.fstat(fd).st_size
        pos = size if end is None else min(end, size)
        data = b""
        while pos > 0 and data.count(b"\n") <= n:
            step = min(_CHUNK, pos)
            pos -= step
            data = os.pread(fd, step, pos) + data
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    if pos > 0:
        lines = lines[1:]  # the first one is cut
    lines = [ln for ln in lines if ln.strip()]
    return (lines[-n:] if n > 0 else []), pos == 0 and len(lines) <= n


def read_events(
    path: str | None = None, n: int = 20, summaries: bool = False, end: int | None = None
) -> list[dict[str, Any]]:
    """The last ``n`` events, oldest first (``summaries``: include suppression lines).

    ``end``: ignore what the current file holds past this offset (so that a
    follower can start exactly there).
    """
    path = path or paths.events_file()
    found: deque[dict[str, Any]] = deque(maxlen=max(n, 0))
    for gen in reversed(_generations(path)):
        want = n - len(found)
        if want <= 0:
            break
        ask = want
        while True:  # other kinds of lines take room too: ask for more until enough
            lines, whole = _tail_lines(gen, ask, end if gen == path else None)
            batch = [e for e in map(_parse, lines) if e is not None and _wanted(e, summaries)]
            if len(batch) >= want or whole:
                break
            ask *= 4
        for event in reversed(batch[-want:]):
            found.appendleft(event)
    return list(found)


def count_events(path: str | None = None) -> int:
    """How many blocked/audited events were ever logged (survives rotation)."""
    path = path or paths.events_file()
    return _read_rotated(path) + sum(_count_file(p) for p in _generations(path))


def follow(
    path: str | None = None,
    *,
    poll: float = 0.2,
    stop: Callable[[], bool] | None = None,
    summaries: bool = False,
    start: tuple[int, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield events appended from now on, across rotations, until ``stop()`` is true.

    ``start``: (inode, offset) to begin at instead of "now" (see :func:`event_lines`).
    """
    path = path or paths.events_file()
    fd = _open_read(path)
    ino = os.fstat(fd).st_ino if fd is not None else None
    pos = os.fstat(fd).st_size if fd is not None else 0
    if start is not None and start[0] == ino:
        pos = start[1]
    partial = b""
    try:
        while stop is None or not stop():
            if fd is not None:
                chunk = os.pread(fd, _CHUNK, pos)
                if chunk:
                    pos += len(chunk)
                    lines = (partial + chunk).split(b"\n")
                    partial = lines.pop()
                    for line in lines:
                        event = _parse(line)
                        if event is not None and _wanted(event, summaries):
                            yield event
                    continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_ino != ino or (fd is not None and st.st_size < pos)):
                # Rotated (or truncated): the old file is drained above; go on in the new one.
                if fd is not None:
                    os.close(fd)
                fd = _open_read(path)
                ino = os.fstat(fd).st_ino if fd is not None else None
                pos, partial = 0, b""
                continue
            time.sleep(poll)
    finally:
        if fd is not None:
            os.close(fd)


def event_lines(
    path: str | None = None,
    n: int = 20,
    *,
    as_json: bool = False,
    follow_new: bool = False,
    poll: float = 0.2,
    stop: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """What ``imdsguard events [--json] [-n N] [--follow]`` prints, line by line.

    The last ``n`` events (suppression summaries included), newest last,
    then with ``follow_new`` every new one, with nothing lost or repeated in
    between. Raises PermissionError when the log is not readable (0640).
    """
    path = path or paths.events_file()
    try:
        st = os.stat(path)
        start: tuple[int, int] | None = (st.st_ino, st.st_size)
    except FileNotFoundError:
        start = None
    render = serialize if as_json else format_console
    for event in read_events(path, n, summaries=True, end=start[1] if start else None):
        yield render(event)
    if follow_new:
        for event in follow(path, poll=poll, stop=stop, summaries=True, start=start):
            yield render(event)
