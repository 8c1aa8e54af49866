"""Whether only root can change what a path names: one answer for config and broker."""

from __future__ import annotations

import os
import stat

GO_WRITE = stat.S_IWGRP | stat.S_IWOTH
_MAX_HOPS = 40  # the kernel's own limit on symlinks followed in one lookup


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def root_only_problem(path: str) -> tuple[str | None, os.stat_result | None]:
    """Why someone other than root could change what ``path`` names, or None.

    Resolves ``path`` the way the kernel does, one component and one symlink
    hop at a time (no lexical ``..``), and checks everything the lookup
    passes: every directory looked in is root's and not writable by group or
    others unless sticky; every symlink followed, every directory and the
    final file are root's; the file is a regular file that group and others
    cannot write. Then nobody but root can swap any link or entry on the way,
    so the path names the same file until root changes it. Also returns the
    file's stat (None with a problem), for comparing with an open descriptor.
    """
    if not path.startswith("/"):
        path = os.path.join(os.getcwd(), path)  # getcwd() has no symlinks in it
    todo = _components(path)[::-1]  # a stack: the next component last
    current, hops = "/", 0
    try:
        st = os.lstat("/")
        if st.st_uid != 0 or (st.st_mode & GO_WRITE and not st.st_mode & stat.S_ISVTX):
            return owner_problem("directory /", "/", st), None
        while todo:
            name = todo.pop()
            if name == "..":
                current = os.path.dirname(current)  # already checked on the way down
                continue
            entry = os.path.join(current, name)
            st = os.lstat(entry)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_HOPS:
                    return f"too many symlinks on the way to {path}", None
                if st.st_uid != 0:
                    return (
                        f"symlink {entry} (on the way to {path}) is owned by uid {st.st_uid}: "
                        f"run 'chown -h root: {entry}'"
                    ), None
                target = os.readlink(entry)
                if target.startswith("/"):
                    current = "/"
                todo.extend(_components(target)[::-1])
                continue
            if todo:  # a directory to look further in
                if not stat.S_ISDIR(st.st_mode):
                    return f"{entry} (on the way to {path}) is not a directory", None
                sticky = st.st_mode & stat.S_ISVTX  # then only root may swap root's entries
                if st.st_uid != 0 or (st.st_mode & GO_WRITE and not sticky):
                    what = f"directory {entry} (on the way to {path})"
                    return owner_problem(what, entry, st), None
                current = entry
                continue
            if not stat.S_ISREG(st.st_mode):
                return f"{entry} is not a regular file", None
            if st.st_uid != 0 or st.st_mode & GO_WRITE:
                return owner_problem(entry, entry, st), None
            return None, st
    except OSError as exc:
        return f"cannot check {exc.filename or path}: {exc.strerror}", None
    return f"{current} is not a regular file", None


def owner_problem(what: str, entry: str, st: os.stat_result) -> str:
    return (
        f"{what} is not owned by root or is writable by others "
        f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): "
        f"run 'chown root: {entry} && chmod go-w {entry}'"
    )
