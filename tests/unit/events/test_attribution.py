"""Attribution from a recorded fake /proc tree, cgroup shapes, cmdline handling, redaction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from imdsguard.events.attribution import Attribution, Attributor, redact_args
from imdsguard.events.packet import IPPROTO_TCP, Packet
from imdsguard.events.procfs import (
    MAX_ARGS,
    TRUNCATED,
    ancestors,
    find_socket_owner,
    parse_cgroup,
    read_process,
    split_cmdline,
)
from imdsguard.events.sockdiag import SocketInfo

D = "4c1e2e5b7a1f0d3c9b8a7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b"  # a 64-hex id

# Recorded /proc/<pid>/cgroup contents (trimmed to the lines that matter), by shape.
CGROUPS = {
    "v2-system-service": ("0::/system.slice/nginx.service\n", "nginx.service", None),
    "v2-user-manager-app": (
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.scope\n",
        "user@1000.service",
        None,
    ),
    "v2-session": ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope", None),
    "v2-init": ("0::/init.scope\n", "init.scope", None),
    "v2-root": ("0::/\n", None, None),
    "v2-docker-systemd": (f"0::/system.slice/docker-{D}.scope\n", f"docker-{D}.scope", D),
    "v1-docker-cgroupfs": (
        f"12:pids:/docker/{D}\n11:memory:/docker/{D}\n1:name=systemd:/docker/{D}\n",
        None,
        D,
    ),
    "v2-containerd-cri": (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod0a1b2c3d_1111_2222_3333_444455556666.slice/cri-containerd-{D}.scope\n",
        f"cri-containerd-{D}.scope",
        D,
    ),
    "v1-kubepods-cgroupfs": (
        f"4:memory:/kubepods/burstable/pod0a1b2c3d-1111-2222-3333-444455556666/{D}\n"
        f"1:name=systemd:/kubepods/burstable/pod0a1b2c3d-1111-2222-3333-444455556666/{D}\n",
        None,
        D,
    ),
    "v1-containerd-systemd-driver": (
        "1:name=systemd:/system.slice/containerd.service/"
        f"kubepods-besteffort-pod0a1b2c3d_1111.slice:cri-containerd:{D}\n",
        "containerd.service",
        D,
    ),
    "v2-crio": (
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice/"
        f"crio-{D}.scope\n",
        f"crio-{D}.scope",
        D,
    ),
    "v2-crio-conmon-is-not-a-container": (
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice/"
        f"crio-conmon-{D}.scope\n",
        f"crio-conmon-{D}.scope",
        None,
    ),
    "v2-podman-rootful": (
        f"0::/machine.slice/libpod-{D}.scope/container\n",
        f"libpod-{D}.scope",
        D,
    ),
    "v2-podman-rootless": (
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{D}.scope/container\n",
        "user@1000.service",
        D,
    ),
    "v1-podman-cgroupfs": (f"1:name=systemd:/libpod_parent/libpod-{D}\n", None, D),
    "v1-hybrid-systemd-line-wins": (
        "12:cpu,cpuacct:/\n1:name=systemd:/system.slice/sshd.service\n0::/system.slice/sshd.service\n",
        "sshd.service",
        None,
    ),
    # On a unified host a v1 hierarchy named systemd is foreign (root makes one, as nspawn
    # does for a legacy container): every other process sits at its root there. The unit
    # is the one cgroup v2 names.
    "v2-foreign-name-systemd-hierarchy": (
        "1:name=systemd:/\n0::/system.slice/my-app.service\n",
        "my-app.service",
        None,
    ),
    "v2-wins-over-a-foreign-name-systemd-path": (
        "1:name=systemd:/system.slice/my-app.service\n0::/user.slice/user-1000.slice/session-3.scope\n",
        "session-3.scope",
        None,
    ),
    # ":" is a valid character of unit names: a v2 directory is the unit's whole name.
    "v2-colon-in-a-unit-name": (
        "0::/system.slice/my-app.service:x.service\n",
        "my-app.service:x.service",
        None,
    ),
    "v1-not-a-container-32hex": (
        "4:memory:/process_api/34a1a6705ff24046c85445446347b2b7\n9:name=systemd:/\n0::/\n",
        None,
        None,
    ),
}


@pytest.mark.parametrize("shape", sorted(CGROUPS))
def test_parse_cgroup(shape: str) -> None:
    text, unit, container = CGROUPS[shape]
    assert parse_cgroup(text) == (unit, container)


def test_parse_cgroup_empty() -> None:
    assert parse_cgroup("") == (None, None)


# --- a recorded /proc tree ------------------------------------------------------------

STATUS = """Name:\t{name}
Umask:\t0022
State:\tS (sleeping)
Tgid:\t{pid}
Ngid:\t0
Pid:\t{pid}
PPid:\t{ppid}
TracerPid:\t0
Uid:\t{uid}\t{uid}\t{uid}\t{uid}
Gid:\t{gid}\t{gid}\t{gid}\t{gid}
FDSize:\t64
Groups:\t{groups}
"""


@dataclass
class FakeProc:
    pid: int
    ppid: int
    uid: int
    gid: int
    comm: str
    exe: str | None
    argv: list[bytes]
    cgroup: str = "0::/user.slice/user-1001.slice/session-2.scope\n"
    fds: tuple[str, ...] = ()
    groups: str = ""
    start: int | None = None  # clock ticks after boot (default 4242 + pid: parents are older)


def make_proc(root: Path, procs: list[FakeProc]) -> str:
    for p in procs:
        d = root / str(p.pid)
        (d / "fd").mkdir(parents=True)
        (d / "status").write_text(
            STATUS.format(
                name=p.comm, pid=p.pid, ppid=p.ppid, uid=p.uid, gid=p.gid, groups=p.groups
            )
        )
        (d / "comm").write_text(p.comm + "\n")
        (d / "cmdline").write_bytes(b"".join(a + b"\0" for a in p.argv))
        (d / "cgroup").write_text(p.cgroup)
        # All 52 fields (psutil parses up to field 40); field 22, the start time, is 4242 + pid.
        start = str(p.start or 4242 + p.pid)
        stat = [str(p.ppid), "1", "1", "0", "-1", "0", *["0"] * 12, start, *["0"] * 32]
        (d / "stat").write_text(f"{p.pid} ({p.comm}) S " + " ".join(stat) + "\n")
        if p.exe is not None:
            os.symlink(p.exe, d / "exe")
        for i, target in enumerate(p.fds):
            os.symlink(target, d / "fd" / str(i))
        if os.geteuid() == 0:
            os.chown(d, p.uid, p.gid)  # find_socket_owner looks at the owner first
    (root / "self").mkdir()  # non-numeric entries are skipped
    (root / "stat").write_text("cpu  0 0 0 0 0 0 0 0 0 0\nbtime 1796000000\n")  # psutil's boot time
    return str(root)


TREE = [
    FakeProc(
        1, 0, 0, 0, "systemd", "/usr/lib/systemd/systemd", [b"/sbin/init"], "0::/init.scope\n"
    ),
    FakeProc(
        812,
        1,
        0,
        0,
        "sshd",
        "/usr/sbin/sshd",
        [b"sshd: /usr/sbin/sshd -D"],
        "0::/system.slice/ssh.service\n",
    ),
    FakeProc(4100, 812, 1001, 1001, "bash", "/usr/bin/bash", [b"-bash"], fds=("/dev/pts/0",)),
    FakeProc(
        4242,
        4100,
        1001,
        1001,
        "curl",
        "/usr/bin/curl",
        [b"curl", b"-s", b"http://169.254.169.254/latest/meta-data/"],
        fds=("/dev/null", "pipe:[99]", "socket:[555]"),
        groups="1001 27",
    ),
    FakeProc(5000, 1, 1002, 1002, "other", "/usr/bin/other", [b"other"], fds=("socket:[556]",)),
]


@pytest.fixture
def proc_root(tmp_path: Path) -> str:
    return make_proc(tmp_path / "proc", TREE)


def test_read_process(proc_root: str) -> None:
    info = read_process(4242, proc_root)
    assert info is not None
    assert (info.pid, info.ppid, info.uid, info.gid) == (4242, 4100, 1001, 1001)
    assert info.groups == (1001, 27)
    assert (info.comm, info.exe) == ("curl", "/usr/bin/curl")
    assert info.cmdline == ("curl", "-s", "http://169.254.169.254/latest/meta-data/")
    assert (info.unit, info.container) == ("session-2.scope", None)
    assert info.start_time == 4242 + 4242
    # psutil's create time: boot time (the tree's /proc/stat btime) + start ticks / CLK_TCK
    assert info.create_time == pytest.approx(1796000000 + 8484 / os.sysconf("SC_CLK_TCK"))
    assert read_process(9999, proc_root) is None


def test_ancestors_up_to_pid_1(proc_root: str) -> None:
    info = read_process(4242, proc_root)
    assert info is not None
    assert [(a.pid, a.comm) for a in ancestors(info, proc_root)] == [
        (4100, "bash"),
        (812, "sshd"),
        (1, "systemd"),
    ]


def test_ancestors_stop_at_a_vanished_parent_and_at_loops(tmp_path: Path) -> None:
    root = make_proc(
        tmp_path / "p",
        [
            FakeProc(10, 11, 0, 0, "a", None, [b"a"], start=100),
            # a loop (cannot happen, must not hang)
            FakeProc(11, 10, 0, 0, "b", None, [b"b"], start=100),
            FakeProc(20, 77, 0, 0, "orphan", None, [b"o"]),
        ],
    )
    a = read_process(10, root)
    assert a is not None
    assert [p.pid for p in ancestors(a, root)] == [11]
    orphan = read_process(20, root)
    assert orphan is not None
    assert ancestors(orphan, root) == []


def test_ancestors_stop_at_a_reused_parent_pid(tmp_path: Path) -> None:
    """A "parent" created after its child is another process that got the dead parent's pid."""
    root = make_proc(
        tmp_path / "p",
        [
            FakeProc(1, 0, 0, 0, "init", None, [b"init"], start=1),
            FakeProc(30, 31, 1001, 1001, "child", None, [b"child"], start=500),
            FakeProc(31, 1, 0, 0, "newcomer", None, [b"newcomer"], start=900),
        ],
    )
    child = read_process(30, root)
    assert child is not None and child.ppid == 31
    assert ancestors(child, root) == []
    newcomer = read_process(31, root)
    assert newcomer is not None
    assert [p.pid for p in ancestors(newcomer, root)] == [1]


def test_find_socket_owner(proc_root: str) -> None:
    assert find_socket_owner(555, 1001, proc_root) == 4242
    assert find_socket_owner(556, 1002, proc_root) == 5000
    # A wrong uid hint only costs time: the other processes are scanned too.
    assert find_socket_owner(555, 0, proc_root) == 4242
    assert find_socket_owner(555, None, proc_root, hints=[9999, 5000]) == 4242
    assert find_socket_owner(12345, 1001, proc_root) is None


class FakeSockets:
    def __init__(self, table: dict[tuple[str, int], SocketInfo]) -> None:
        self.table = table
        self.calls: list[tuple[str, int, tuple[str, int], tuple[str, int]]] = []

    def lookup(
        self, family: str, proto: int, local: tuple[str, int], remote: tuple[str, int]
    ) -> SocketInfo | None:
        self.calls.append((family, proto, local, remote))
        return self.table.get(local)


def _names(uid: int) -> str | None:
    return {1001: "alice", 0: "root"}.get(uid)


SYN = Packet("ipv4", IPPROTO_TCP, "192.0.2.1", "169.254.169.254", 40000, 80, 0x02)


def test_attribute_from_fake_proc(proc_root: str) -> None:
    sockets = FakeSockets({("192.0.2.1", 40000): SocketInfo(inode=555, uid=1001, state=2)})
    attributor = Attributor(sockets, proc_root, user_name=_names)
    sock = attributor.lookup_socket(SYN)
    assert sockets.calls == [("ipv4", 6, ("192.0.2.1", 40000), ("169.254.169.254", 80))]
    who = attributor.attribute(sock, uid=1001, gid=1001)
    assert who.attributed
    fields = who.fields()
    assert fields == {
        "uid": 1001,
        "user": "alice",
        "gid": 1001,
        "pid": 4242,
        "ppid": 4100,
        "exe": "/usr/bin/curl",
        "cmdline": ["curl", "-s", "http://169.254.169.254/latest/meta-data/"],
        "comm": "curl",
        "ancestors": [
            {"pid": 4100, "comm": "bash", "exe": "/usr/bin/bash"},
            {"pid": 812, "comm": "sshd", "exe": "/usr/sbin/sshd"},
            {"pid": 1, "comm": "systemd", "exe": "/usr/lib/systemd/systemd"},
        ],
        "unit": "session-2.scope",
        "container": None,
        "attributed": True,
    }


def test_attribute_uses_socket_uid_when_kernel_gave_none(proc_root: str) -> None:
    attributor = Attributor(None, proc_root, user_name=_names)
    who = attributor.attribute(SocketInfo(inode=555, uid=1001, state=2))
    assert (who.uid, who.user, who.gid, who.pid) == (1001, "alice", 1001, 4242)


def test_missing_pid_is_not_attributed(proc_root: str) -> None:
    attributor = Attributor(FakeSockets({}), proc_root, user_name=_names)
    assert attributor.lookup_socket(SYN) is None
    who = attributor.attribute(None, uid=1001, gid=1001)
    assert who == Attribution(uid=1001, user="alice", gid=1001)
    assert who.fields()["attributed"] is False
    # Socket found, but no process holds it any more (exited between the two lookups).
    gone = attributor.attribute(SocketInfo(inode=999, uid=1001, state=7), uid=1001)
    assert (gone.attributed, gone.pid, gone.uid) == (False, None, 1001)


def test_unknown_uid_has_no_user_name(proc_root: str) -> None:
    attributor = Attributor(None, proc_root, user_name=_names)
    assert attributor.attribute(None, uid=4321).user is None
    assert attributor.attribute(None).fields()["uid"] is None


def test_attribution_redacts_secrets_in_cmdline(tmp_path: Path) -> None:
    root = make_proc(
        tmp_path / "p",
        [
            FakeProc(
                7,
                1,
                1001,
                1001,
                "curl",
                "/usr/bin/curl",
                [b"curl", b"-H", b"X-aws-ec2-metadata-token: AQAEAsecret==", b"http://x/"],
                fds=("socket:[31]",),
            )
        ],
    )
    who = Attributor(None, root, user_name=_names).attribute(SocketInfo(31, 1001, 2))
    assert who.cmdline == ("curl", "-H", "X-aws-ec2-metadata-token: [redacted]", "http://x/")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["-H", "X-aws-ec2-metadata-token: AQAE=="],
            ["-H", "X-aws-ec2-metadata-token: [redacted]"],
        ),
        (["-H", "X-aws-ec2-metadata-token-ttl-seconds: 21600"], None),
        (["-H", "Authorization: Bearer abc"], ["-H", "Authorization: [redacted]"]),
        (["--password", "hunter2", "x"], ["--password", "[redacted]", "x"]),
        (["--token=abc"], ["--token=[redacted]"]),
        (["AWS_SECRET_ACCESS_KEY=abc", "AWS_REGION=x"], ["AWS_SECRET_ACCESS_KEY=[redacted]", None]),
        (["https://bob:pw@example.com/x"], ["https://bob:[redacted]@example.com/x"]),
        (["python3", "-c", "import socket"], None),
    ],
)
def test_redact_args(args: list[str], expected: list[str | None] | None) -> None:
    want = args if expected is None else [a if e is None else e for a, e in zip(args, expected)]
    assert list(redact_args(args)) == want


def test_split_cmdline_bounds_and_decoding() -> None:
    assert split_cmdline(b"") == ()
    assert split_cmdline(b"a\0b\0") == ("a", "b")
    assert split_cmdline(b"bad\xff\0") == ("bad\\xff",)
    many = split_cmdline(b"x\0" * (MAX_ARGS + 10))
    assert len(many) == MAX_ARGS + 1 and many[-1] == TRUNCATED
    long_arg = split_cmdline(b"y" * 5000)
    assert long_arg[0].endswith(TRUNCATED) and len(long_arg[0]) < 1100


def test_container_for_address_from_a_recorded_proc(tmp_path: Path) -> None:
    from imdsguard.events.procfs import container_for_address

    cid = "ab" * 32
    host, ctr = tmp_path / "100", tmp_path / "200"
    local = "     |-- {}\n        /32 host LOCAL\n"
    for pid_dir, netns, trie, cgroup in (
        (host, "net:[4026531840]", local.format("10.0.0.5"), "0::/\n"),
        (ctr, "net:[4026532999]", local.format("198.51.100.2"), f"0::/docker-{cid}.scope\n"),
    ):
        (pid_dir / "ns").mkdir(parents=True)
        (pid_dir / "net").mkdir()
        (pid_dir / "ns" / "net").symlink_to(netns)
        (pid_dir / "net" / "fib_trie").write_text(trie)
        (pid_dir / "net" / "if_inet6").write_text("")
        (pid_dir / "cgroup").write_text(cgroup)
    assert container_for_address("198.51.100.2", str(tmp_path)) == cid
    assert container_for_address("10.0.0.5", str(tmp_path)) is None  # the host itself
    assert container_for_address("203.0.113.9", str(tmp_path)) is None


def test_brief_read_keeps_the_ids(proc_root: str) -> None:
    """The broker's holder scan skips root's processes by a brief read's effective uid."""
    info = read_process(4242, proc_root, brief=True)
    assert info is not None
    assert (info.uid, info.gid, info.comm, info.exe) == (1001, 1001, "curl", "/usr/bin/curl")
    assert info.cmdline == () and info.groups == ()
