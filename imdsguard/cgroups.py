"""systemd units as cgroup v2 paths, for ``allow.units`` and ``broker.clients.units``.

The firewall matches a socket by the cgroup v2 directory of the unit that
created it (nftables ``socket cgroupv2 level N "<path>"``, iptables ``-m
cgroup --path <path>``). Both look the path up *when the rule is loaded*:
nftables turns it into the cgroup's id (its inode), x_tables holds a
reference to the cgroup itself. So:

- a unit that is not running has no cgroup, and a rule naming it cannot be
  loaded at all: such units are left out of the rules (their processes, of
  which there are none, would be denied);
- a unit that starts or restarts gets a *new* cgroup that the old rule does
  not match: :class:`Watcher` reports cgroup creation and removal in the
  slice directories (inotify), and the daemon re-resolves and re-applies.

Units are looked up in the system manager's tree only: the root and the
``*.slice`` directories under it, never inside a ``*.service`` or
``*.scope`` (a service with ``Delegate=yes``, such as ``user@1000.service``,
lets its user create directories of any name below it).

Everything takes ``root`` (default ``/sys/fs/cgroup``) so unit tests run
against a temporary tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ROOT = "/sys/fs/cgroup"
MOUNTINFO = "/proc/self/mountinfo"

#: The unit types that have a cgroup of their own.
UNIT_SUFFIXES = (".service", ".scope", ".slice")
#: systemd's unit name rules (unit_name_is_valid): at most 255 characters of
#: ASCII letters, digits and ``:-_.\@``; an ``@`` instance must be non-empty.
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]+)?")
_MAX_UNIT_NAME = 255
#: What a path may contain to be written into a rule (unit names' characters and "/").
_SAFE_PATH = re.compile(r"[A-Za-z0-9:_.\\@/-]+")
#: How deep slices nest before we stop looking (systemd's own trees are 1-4 deep).
_MAX_DEPTH = 16


def unit_name_problem(name: str) -> str | None:
    """Why ``name`` is not a systemd unit with a cgroup (``foo.service``), or None."""
    if not name:
        return "must not be empty"
    if len(name) > _MAX_UNIT_NAME:
        return f"is longer than {_MAX_UNIT_NAME} characters"
    stem, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix}" not in UNIT_SUFFIXES:
        if _UNIT_NAME.fullmatch(name) and "." not in name:
            return f"is not a unit name: did you mean {name}.service?"
        return "must be a unit with a cgroup: NAME.service, NAME.scope or NAME.slice"
    if stem.endswith("@") and _UNIT_NAME.fullmatch(stem[:-1]):
        return "is a template: name an instance (foo@bar.service)"
    if not stem or not _UNIT_NAME.fullmatch(stem):
        return "is not a valid systemd unit name (letters, digits and :-_.\\@ only)"
    if name == "-.slice":
        return "is the root slice: it would allow every process"
    return None


def unified_problem(mountinfo: str = MOUNTINFO, root: str = ROOT) -> str | None:
    """Why ``root`` is not the unified cgroup v2 hierarchy, or None when it is.

    Read from ``mountinfo``: the last mount on ``root`` must be of type
    ``cgroup2``. A hybrid host (cgroup v1 controllers, cgroup2 only at
    ``/sys/fs/cgroup/unified``) or a legacy one does not qualify: nftables
    looks unit paths up under ``/sys/fs/cgroup`` itself.
    """
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        return f"cannot read {mountinfo}: {exc.strerror}"
    fstype = None
    cgroup2_at = None
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        kind = line.split(" - ", 1)[1].split()[0]
        point = fields[4].replace("\\040", " ")
        if point == root:
            fstype = kind
        if kind == "cgroup2" and cgroup2_at is None:
            cgroup2_at = point
    if fstype == "cgroup2":
        return None
    layout = (
        f"a hybrid layout (cgroup v1 controllers; cgroup2 only at {cgroup2_at})"
        if cgroup2_at
        else "no cgroup v2 at all"
    )
    return (
        f"this host does not mount the unified cgroup v2 hierarchy at {root} ({layout}); "
        "matching by unit needs it: boot with systemd.unified_cgroup_hierarchy=1 "
        "(the default since systemd 247; AL2023, RHEL 9, Debian 11+ and Ubuntu 21.10+ have it)"
    )


def _slice_path(name: str) -> str:
    """Where systemd puts slice ``a-b.slice``: ``a.slice/a-b.slice``."""
    stem = name[: -len(".slice")]
    parts = stem.split("-")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def _slices(root: str) -> list[str]:
    """Every slice directory of the system tree, relative to ``root`` ("" is the root)."""
    found = [""]
    i = 0
    while i < len(found):
        rel = found[i]
        i += 1
        if rel.count("/") >= _MAX_DEPTH:
            continue
        try:
            with os.scandir(os.path.join(root, rel) if rel else root) as it:
                for entry in it:
                    if entry.name.endswith(".slice") and entry.is_dir(follow_symlinks=False):
                        found.append(f"{rel}/{entry.name}" if rel else entry.name)
        except OSError:
            continue
    return found


@dataclass(frozen=True)
class UnitCgroup:
    """A running unit's cgroup: the path under the root, its depth and its inode."""

    unit: str
    path: str
    inode: int

    @property
    def level(self) -> int:
        """The depth of ``path`` (``system.slice/foo.service`` is level 2)."""
        return level(self.path)


def level(path: str) -> int:
    """How many directories below the cgroup root ``path`` is."""
    return len([p for p in path.strip("/").split("/") if p])


def _stat_dir(root: str, rel: str) -> int | None:
    try:
        st = os.stat(os.path.join(root, rel), follow_symlinks=False)
    except OSError:
        return None
    return st.st_ino if stat.S_ISDIR(st.st_mode) else None


def resolve(
    units: Iterable[str],
    root: str = ROOT,
    known: Mapping[str, UnitCgroup | None] | None = None,
    search: bool = True,
) -> dict[str, UnitCgroup | None]:
    """Each unit's current cgroup, or None when it has none (not running).

    ``known`` (the last answer) is tried first, by one stat per unit; only
    units not found there cost a walk of the slices, and only with
    ``search`` (without it, a unit not where it was counts as not running).
    """
    result: dict[str, UnitCgroup | None] = {}
    slices: list[str] | None = None
    for unit in units:
        candidates: list[str] = []
        old = (known or {}).get(unit)
        if old is not None:
            candidates.append(old.path)
        if unit.endswith(".slice"):
            candidates.append(_slice_path(unit))
        elif search:
            if slices is None:
                slices = _slices(root)
            candidates += [f"{s}/{unit}" if s else unit for s in slices]
        result[unit] = None
        for rel in dict.fromkeys(candidates):
            if not _SAFE_PATH.fullmatch(rel):
                continue  # a slice named so that no rule could quote it
            inode = _stat_dir(root, rel)
            if inode is not None:
                result[unit] = UnitCgroup(unit, rel, inode)
                break
    return result


def own_path(proc_self: str = "/proc/self/cgroup") -> str:
    """This process's cgroup v2 path, relative to the root we see ("" at the root)."""
    try:
        with open(proc_self, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("0::"):
                    return line[3:].strip().strip("/")
    except OSError:
        pass
    return ""


def own_cgroup_ns_is_initial() -> bool:
    """True in the initial cgroup namespace, where cgroup paths and levels are absolute.

    The kernel's ``socket cgroupv2 level`` counts from the real root; inside
    a cgroup namespace (a container) ``/sys/fs/cgroup`` starts lower down.
    The initial namespace has the fixed inode PROC_CGROUP_INIT_INO.
    """
    try:
        return os.stat("/proc/self/ns/cgroup").st_ino == 0xEFFFFFFB
    except OSError:
        return True  # no cgroup namespaces in this kernel: everything is the initial one


# --- inotify -------------------------------------------------------------------

_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_Q_OVERFLOW = 0x00004000
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_MASK = _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_DELETE_SELF | _IN_ONLYDIR
_EVENT = struct.Struct("iIII")

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc  # noqa: PLW0603 - loaded once per process
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


class Watcher:
    """Reports when a cgroup directory appears or goes in the system tree's slices.

    :meth:`fileno` becomes readable on a change; :meth:`changed` drains it
    and says whether anything relevant (a watched unit's name, a slice)
    moved, adding watches for new slices. Cheap: one inotify watch per
    slice directory.
    """

    def __init__(self, units: Iterable[str], root: str = ROOT) -> None:
        self.root = root
        self.units = frozenset(units)
        fd = _lib().inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        self._watched: dict[int, str] = {}
        self._rescan()

    def fileno(self) -> int:
        """The inotify descriptor, for select()."""
        return int(self._fd)

    def _rescan(self) -> None:
        for rel in _slices(self.root):
            path = os.path.join(self.root, rel) if rel else self.root
            wd = _lib().inotify_add_watch(self._fd, os.fsencode(path), _MASK)
            if wd >= 0:
                self._watched[wd] = rel

    def changed(self) -> bool:
        """Drain pending events; True when a watched unit or a slice appeared or went."""
        relevant = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                break
            if not data:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
                if mask & (_IN_Q_OVERFLOW | _IN_DELETE_SELF):
                    relevant = True
                    if mask & _IN_DELETE_SELF:
                        self._watched.pop(wd, None)
                elif name in self.units or name.endswith(".slice"):
                    relevant = True
        if relevant:
            self._rescan()
        return relevant

    def close(self) -> None:
        """Release the descriptor."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
