"""Whether only root can change what a path names: one answer for config and broker.

The configuration (:func:`imdsguard.config.check_trust`) and the broker's
allowed executables (:func:`imdsguard.broker.peer.exe_trust_problem`) both
need "nobody but root can change, swap or redirect this file". Both ask
:func:`untrusted`, which resolves the path the way the kernel does, one
component and one symlink hop at a time, and checks everything the lookup
passes; they differ only in how they word the answer and in whether a
sticky directory (such as ``/tmp``) may hold the final entry.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

GO_WRITE = stat.S_IWGRP | stat.S_IWOTH
_MAX_HOPS = 40  # the kernel's own limit on symlinks followed in one lookup


@dataclass(frozen=True)
class Untrusted:
    """Why a path is not root's alone.

    ``kind``: ``file`` (the final file is not root's, or is writable by
    others), ``directory`` (a directory looked in), ``symlink`` (a symlink
    followed is not root's), ``lookup`` (a component cannot be read, e.g.
    it does not exist), ``shape`` (not a directory or regular file where
    one is needed, or too many symlinks). ``entry`` is the path at fault;
    ``st`` its ``lstat`` for ``file``, ``directory`` and ``symlink``;
    ``message`` one line for a log or an error.
    """

    kind: str
    entry: str
    message: str
    st: os.stat_result | None = None
    strerror: str | None = None  # for ``lookup``


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def _open_to_others(st: os.stat_result, *, sticky_ok: bool) -> bool:
    """Whether someone other than root could swap entries of this directory."""
    writable = bool(st.st_mode & GO_WRITE)
    return st.st_uid != 0 or (writable and not (sticky_ok and st.st_mode & stat.S_ISVTX))


def untrusted(
    path: str, *, sticky_own_dir: bool = True
) -> tuple[Untrusted | None, os.stat_result | None]:
    """Why someone other than root could change what ``path`` names, or None.

    Resolves ``path`` the way the kernel does, one component and one symlink
    hop at a time (no lexical ``..``, at most 40 symlinks), and checks
    everything the lookup passes: every directory looked in is root's and
    not writable by group or others unless sticky; every symlink followed,
    every directory and the final file are root's; the file is a regular
    file that group and others cannot write. Then nobody but root can swap
    any link or entry on the way, so the path names the same file until root
    changes it. With ``sticky_own_dir`` false, a directory that holds the
    final file or a symlink at the end of a lookup must not be writable by
    others even if sticky. Also returns the file's stat (None with a
    problem), for comparing with an open descriptor.
    """
    if not path.startswith("/"):
        path = os.path.join(os.getcwd(), path)  # getcwd() has no symlinks in it
    todo = _components(path)[::-1]  # a stack: the next component last
    current, hops = "/", 0
    dirs: dict[str, os.stat_result] = {}
    try:
        st = dirs["/"] = os.lstat("/")
        if _open_to_others(st, sticky_ok=True):
            return _untrusted("directory", "directory /", "/", st), None
        while todo:
            name = todo.pop()
            if name == "..":
                current = os.path.dirname(current)  # already checked on the way down
                continue
            if not todo and not sticky_own_dir:  # the entry a lookup ends at
                held_in = dirs.get(current) or os.lstat(current)
                if _open_to_others(held_in, sticky_ok=False):
                    what = f"directory {current} (holding {os.path.join(current, name)})"
                    return _untrusted("directory", what, current, held_in), None
            entry = os.path.join(current, name)
            st = os.lstat(entry)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_HOPS:
                    return Untrusted(
                        "shape", entry, f"too many symlinks on the way to {path}"
                    ), None
                if st.st_uid != 0:
                    message = (
                        f"symlink {entry} (on the way to {path}) is owned by uid {st.st_uid}: "
                        f"run 'chown -h root: {entry}'"
                    )
                    return Untrusted("symlink", entry, message, st), None
                target = os.readlink(entry)
                if target.startswith("/"):
                    current = "/"
                todo.extend(_components(target)[::-1])
                continue
            if todo:  # a directory to look further in
                if not stat.S_ISDIR(st.st_mode):
                    message = f"{entry} (on the way to {path}) is not a directory"
                    return Untrusted("shape", entry, message), None
                # sticky: then only root may swap root's entries
                if _open_to_others(st, sticky_ok=True):
                    what = f"directory {entry} (on the way to {path})"
                    return _untrusted("directory", what, entry, st), None
                dirs[entry] = st
                current = entry
                continue
            if not stat.S_ISREG(st.st_mode):
                return Untrusted("shape", entry, f"{entry} is not a regular file"), None
            if st.st_uid != 0 or st.st_mode & GO_WRITE:
                return _untrusted("file", entry, entry, st), None
            return None, st
    except OSError as exc:
        where = exc.filename or path
        message = f"cannot check {where}: {exc.strerror}"
        return Untrusted("lookup", where, message, strerror=exc.strerror), None
    return Untrusted("shape", current, f"{current} is not a regular file"), None


def root_only_problem(path: str) -> tuple[str | None, os.stat_result | None]:
    """:func:`untrusted` as a message: why others could change ``path``, or None; its stat."""
    problem, st = untrusted(path)
    return (problem.message if problem else None), st


def _untrusted(kind: str, what: str, entry: str, st: os.stat_result) -> Untrusted:
    return Untrusted(kind, entry, owner_problem(what, entry, st), st)


def owner_problem(what: str, entry: str, st: os.stat_result) -> str:
    """One line: ``what`` (``entry``, stat ``st``) is not root's alone, and the fix."""
    return (
        f"{what} is not owned by root or is writable by others "
        f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): "
        f"run 'chown root: {entry} && chmod go-w {entry}'"
    )
