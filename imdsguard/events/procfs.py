"""Read processes: the one place imdsguard looks at another process.

Process identity comes from psutil (the field's library, packaged as
python3-psutil on AL2023, RHEL 9, Debian and Ubuntu): the process itself,
its parent, effective uid and gid, and its create time, which tells a
reused pid apart (an "ancestor" created after its child is not its parent).
Our own bounded readers stay only where psutil has no answer, or none we
can use on the event path, where the client's packet is held meanwhile:

- supplementary groups (``Groups:`` of ``/proc/<pid>/status``; psutil has
  real/effective/saved gids only);
- ``comm``: psutil's ``name()`` replaces a 15-character comm by a name taken
  from the command line, which is not the kernel's comm;
- ``exe``: psutil strips a `` (deleted)`` suffix, which the events and the
  broker's "replaced since it started" check rely on (a plain readlink);
- ``cmdline``: psutil reads the whole argument area (up to ARG_MAX, megabytes
  that the process itself controls) per call; ours reads at most 16 KiB and
  bounds count and size;
- the start time in clock ticks (``stat`` field 22), compared by the broker's
  peer checks with its own reading;
- cgroup → systemd unit and container, sockets held in ``fd/``, and a
  network namespace's addresses: nothing in psutil.

Everything takes ``proc_root`` so unit tests run against a recorded fake
``/proc`` tree (psutil is pointed at it through ``psutil.PROCFS_PATH``).
Every string read here is controlled by the process it describes (a program
can set its own argv, comm and, through the file name, exe): callers treat
them as untrusted, and decoding never fails (invalid UTF-8 shows up as
``\\xNN``).

- :func:`read_process`: identity, comm, exe, cmdline and cgroup of one pid.
- :func:`ancestors`: the parent chain up to PID 1.
- :func:`find_socket_owner`: which process holds ``socket:[inode]``.
- :func:`parse_cgroup`: systemd unit and container id from ``/proc/<pid>/cgroup``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import psutil

#: Bounds on what we copy out of a process (events stay small, memory bounded).
MAX_ARGS = 64
MAX_ARG_CHARS = 1024
MAX_CMDLINE_CHARS = 4096
MAX_ANCESTORS = 32
TRUNCATED = "...[truncated]"


@dataclass(frozen=True)
class ProcessInfo:
    """One process as ``/proc`` shows it (None where it could not be read)."""

    pid: int
    ppid: int | None = None
    uid: int | None = None  # effective
    gid: int | None = None  # effective
    groups: tuple[int, ...] = ()
    comm: str | None = None
    exe: str | None = None
    cmdline: tuple[str, ...] = ()
    cgroup: str = ""
    start_time: int | None = None  # clock ticks after boot: tells a reused pid apart
    create_time: float | None = None  # psutil's (seconds since the epoch), same purpose
    unit: str | None = field(default=None)
    container: str | None = field(default=None)


def _read(path: str, limit: int = 65536) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def split_cmdline(raw: bytes) -> tuple[str, ...]:
    """``/proc/<pid>/cmdline`` as a list of arguments, bounded in count and size."""
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    if not raw:
        return ()
    args: list[str] = []
    total = 0
    for part in raw.split(b"\0"):
        if len(args) >= MAX_ARGS or total >= MAX_CMDLINE_CHARS:
            args.append(TRUNCATED)
            break
        arg = _text(part)
        if len(arg) > MAX_ARG_CHARS:
            arg = arg[:MAX_ARG_CHARS] + TRUNCATED
        args.append(arg)
        total += len(arg)
    return tuple(args)


_PROCFS_LOCK = threading.Lock()


@contextmanager
def _procfs(proc_root: str) -> Iterator[None]:
    """psutil reading ``proc_root`` (a recorded tree in tests; ``/proc`` is psutil's own)."""
    if proc_root == psutil.PROCFS_PATH:
        yield
        return
    with _PROCFS_LOCK:
        saved, psutil.PROCFS_PATH = psutil.PROCFS_PATH, proc_root
        try:
            yield
        finally:
            psutil.PROCFS_PATH = saved


def _groups(raw: bytes | None) -> tuple[int, ...]:
    for line in (raw or b"").split(b"\n"):
        if line.startswith(b"Groups:"):
            return tuple(int(g) for g in line[7:].split() if g.isdigit())
    return ()


def _start_time(raw: bytes | None) -> int | None:
    if not raw:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])  # field 22, starttime
    except (IndexError, ValueError):
        return None


def read_process(pid: int, proc_root: str = "/proc", brief: bool = False) -> ProcessInfo | None:
    """Everything we record about ``pid``; None when it does not exist (any more).

    ``brief``: only pid, parent, effective uid and gid, create time, comm and
    exe (what an ancestor entry and the broker's holder scan need); groups,
    cmdline, cgroup and start ticks stay empty. Saves half the reads
    per ancestor while the client's packet is held.
    """
    base = f"{proc_root}/{pid}"
    with _procfs(proc_root):
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                ppid = proc.ppid()
                create_time = proc.create_time()
                # brief callers need the ids too (the broker's holder scan skips
                # processes by effective uid)
                uid = proc.uids().effective
                gid = proc.gids().effective
        except (psutil.Error, OSError, ValueError, IndexError):
            return None  # gone (or never there), or /proc unreadable
    comm_raw = _read(f"{base}/comm", 64)
    comm = _text(comm_raw).rstrip("\n") if comm_raw is not None else None
    try:
        exe: str | None = os.readlink(f"{base}/exe")
    except OSError:
        exe = None  # kernel thread, or the process is gone
    if brief:
        return ProcessInfo(
            pid=pid, ppid=ppid, uid=uid, gid=gid, comm=comm, exe=exe, create_time=create_time
        )
    cgroup = _text(_read(f"{base}/cgroup") or b"")
    unit, container = parse_cgroup(cgroup)
    return ProcessInfo(
        pid=pid,
        ppid=ppid,
        uid=uid,
        gid=gid,
        groups=_groups(_read(f"{base}/status", 4096)),
        comm=comm,
        exe=exe,
        cmdline=split_cmdline(_read(f"{base}/cmdline", MAX_CMDLINE_CHARS * 4) or b""),
        cgroup=cgroup,
        start_time=_start_time(_read(f"{base}/stat")),
        create_time=create_time,
        unit=unit,
        container=container,
    )


def ancestors(info: ProcessInfo, proc_root: str = "/proc") -> list[ProcessInfo]:
    """The parent, grandparent, ... up to and including PID 1 (bounded, loop-safe).

    A "parent" created after its child is a reused pid (the real parent
    died and the number came round again): the chain stops there.
    """
    chain: list[ProcessInfo] = []
    seen = {info.pid}
    ppid = info.ppid
    child_created = info.create_time
    while ppid and ppid not in seen and len(chain) < MAX_ANCESTORS:
        parent = read_process(ppid, proc_root, brief=True)
        if parent is None:
            break
        if (
            child_created is not None
            and parent.create_time is not None
            and parent.create_time > child_created
        ):
            break
        chain.append(parent)
        seen.add(ppid)
        ppid = parent.ppid
        child_created = parent.create_time
    return chain


def _pids(proc_root: str) -> list[int]:
    try:
        names = os.listdir(proc_root)
    except OSError:
        return []
    return [int(n) for n in names if n.isdigit()]


def _holds(proc_root: str, pid: int, target: str) -> bool:
    fd_dir = f"{proc_root}/{pid}/fd"
    try:
        with os.scandir(fd_dir) as entries:
            for entry in entries:
                try:
                    if os.readlink(entry.path) == target:
                        return True
                except OSError:
                    continue
    except OSError:
        return False
    return False


def find_socket_owner(
    inode: int, uid: int | None, proc_root: str = "/proc", hints: Iterable[int] = ()
) -> int | None:
    """The pid of a process holding ``socket:[inode]`` open, or None.

    Scans ``/proc/<pid>/fd``, cheapest candidates first: ``hints`` (pids
    that recently owned sockets), then processes whose ``/proc/<pid>``
    belongs to ``uid`` (its effective uid), newest (highest pid) first, then
    the rest (a non-dumpable process's directory belongs to root).
    """
    target = f"socket:[{inode}]"
    tried: set[int] = set()
    for pid in hints:
        if pid not in tried:
            tried.add(pid)
            if _holds(proc_root, pid, target):
                return pid
    pids = sorted(_pids(proc_root), reverse=True)
    rest: list[int] = []
    for pid in pids:
        if pid in tried:
            continue
        if uid is not None:
            try:
                owner = os.stat(f"{proc_root}/{pid}").st_uid
            except OSError:
                continue
            if owner != uid:
                rest.append(pid)
                continue
        if _holds(proc_root, pid, target):
            return pid
    for pid in rest:
        if _holds(proc_root, pid, target):
            return pid
    return None


@dataclass(frozen=True)
class Holder:
    """A process that holds a socket open: which fd, and whether it is close-on-exec."""

    pid: int
    fd: int
    cloexec: bool


def _fd_cloexec(proc_root: str, pid: int, fd: int) -> bool:
    raw = _read(f"{proc_root}/{pid}/fdinfo/{fd}", 4096) or b""
    for line in raw.split(b"\n"):
        if line.startswith(b"flags:"):
            try:
                return bool(int(line.split()[1], 8) & os.O_CLOEXEC)
            except (IndexError, ValueError):
                return False
    return False


def socket_holders(
    inode: int,
    proc_root: str = "/proc",
    pids: Iterable[int] | None = None,
    skip: Callable[[int], bool] | None = None,
) -> list[Holder]:
    """Every process (thread group) holding ``socket:[inode]`` open, one entry per fd.

    Reads every ``/proc/<pid>/fd`` (or those of ``pids``): a full scan, which
    root, or CAP_SYS_PTRACE with CAP_DAC_READ_SEARCH, sees whole; its cost
    grows with the number of open files on the host (about 10 ms for 700
    fds on a loaded 2-vCPU VM). What it cannot see: a socket held only in
    flight (inside an ``SCM_RIGHTS`` message not yet received) or as an
    io_uring registered file. ``skip(pid)``: a process not worth scanning
    (the caller knows it would pass whatever it holds).
    """
    target = f"socket:[{inode}]"
    found: list[Holder] = []
    for pid in _pids(proc_root) if pids is None else pids:
        if skip is not None and skip(pid):
            continue
        try:
            fd_dir = os.open(f"{proc_root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for name in os.listdir(fd_dir):
                try:
                    if os.readlink(name, dir_fd=fd_dir) != target:
                        continue
                    fd = int(name)
                except (OSError, ValueError):
                    continue
                found.append(Holder(pid, fd, _fd_cloexec(proc_root, pid, fd)))
        except OSError:
            continue
        finally:
            os.close(fd_dir)
    return found


# --- cgroups ----------------------------------------------------------------------

_HEX64 = r"[0-9a-f]{64}"
#: Container runtimes' scope names (systemd cgroup driver) and cgroupfs path parts.
_CONTAINER_PATTERNS = (
    re.compile(rf"(?:^|/)(?:docker|cri-containerd|crio|libpod)-({_HEX64})\.scope(?:/|$)"),
    re.compile(rf":(?:cri-containerd|crio|docker):({_HEX64})(?:/|$)"),  # containerd, systemd v1
    re.compile(rf"(?:^|/)(?:libpod-)?({_HEX64})(?:/|$)"),  # /docker/<id>, /kubepods/.../<id>
)
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".target")


def parse_cgroup(text: str) -> tuple[str | None, str | None]:
    """(systemd unit, container id) from the text of ``/proc/<pid>/cgroup``.

    The unit is what ``systemctl status <pid>`` names: the first path
    component after the leading slices (``system.slice/nginx.service`` ->
    ``nginx.service``; ``user.slice/user-1000.slice/user@1000.service/...``
    -> ``user@1000.service``). The cgroup v2 ``0::`` line tells it when it
    names a unit (the firewall's ``allow.units`` matches that hierarchy, and
    the broker's ``broker.clients.units`` must agree); else (cgroup v1, where
    v2 is not systemd's) the ``name=systemd`` hierarchy. On a unified host a
    ``name=systemd`` hierarchy is not systemd's (root makes one, as nspawn
    does for a legacy container; the kernel creates hierarchies only from
    the initial cgroup namespace), and every other process sits at its
    ``/``. The container id is the
    64-hex id docker, containerd/CRI, cri-o and podman put in the path
    (their ``conmon`` helper scopes are not containers).
    """
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.setdefault(parts[1], parts[2])
    systemd_path = paths.get("name=systemd", paths.get(""))
    if systemd_path is None and paths:
        systemd_path = next(iter(paths.values()))
    unit = _unit(paths.get("", ""), v2=True) or _unit(systemd_path or "")
    container = None
    for path in [systemd_path or "", *paths.values()]:
        container = _container(path)
        if container:
            break
    return unit, container


def _unit(path: str, v2: bool = False) -> str | None:
    """The first component after the leading slices, if it is a unit.

    On cgroup v1 containerd's ``<pod>.slice:cri-containerd:<id>`` (its
    cgroupsPath spelled out as a directory) counts as that slice. On v2 a
    component is a whole name: ``:`` is valid in unit names, so
    ``app.service:x.service`` is that unit, never ``app.service``.
    """
    for component in path.split("/"):
        part = component if v2 else component.split(":", 1)[0]
        if not part or part.endswith(".slice"):
            continue
        return part if part.endswith(_UNIT_SUFFIXES) else None
    return None


def _container(path: str) -> str | None:
    if "conmon" in path:
        path = "/".join(p for p in path.split("/") if "conmon" not in p)
    for pattern in _CONTAINER_PATTERNS:
        found = pattern.findall(path)
        if found:
            return str(found[-1])
    return None


def _has_local_address(proc_root: str, pid: int, address: str) -> bool:
    """True when ``address`` is assigned in the network namespace ``pid`` lives in."""
    addr = ipaddress.ip_address(address)
    if addr.version == 6:
        raw = _read(f"{proc_root}/{pid}/net/if_inet6")
        wanted = addr.exploded.replace(":", "")
        return raw is not None and any(
            line.split()[0] == wanted for line in _text(raw).splitlines() if line.strip()
        )
    raw = _read(f"{proc_root}/{pid}/net/fib_trie", limit=4 << 20)
    if raw is None:
        return False
    lines = _text(raw).splitlines()
    for i, line in enumerate(lines[:-1]):
        # "|-- 198.51.100.2" followed by "/32 host LOCAL": an address of this netns.
        if line.strip() == f"|-- {address}" and "host LOCAL" in lines[i + 1]:
            return True
    return False


def container_for_address(address: str, proc_root: str = "/proc") -> str | None:
    """The container id of the network namespace that owns ``address``, if any.

    Forwarded (container) traffic has no local socket, so the source address
    is the only clue: find a process whose network namespace has that
    address, then read the container id from its cgroup. Each namespace is
    checked once, through its first process.
    """
    seen: set[str] = set()
    for pid in _pids(proc_root):
        try:
            netns = os.readlink(f"{proc_root}/{pid}/ns/net")
        except OSError:
            continue
        if netns in seen:
            continue
        seen.add(netns)
        if _has_local_address(proc_root, pid, address):
            raw = _read(f"{proc_root}/{pid}/cgroup")
            return parse_cgroup(_text(raw))[1] if raw is not None else None
    return None
