"""Throw-away network namespaces laid out like EC2, for tests, the demo and benchmarks.

::

    HOST netns                                VPC netns
    eth0 192.0.2.1/30, 2001:db8::1/64  <-->   vpc0 192.0.2.2/30, 2001:db8::2/64
    route 169.254.169.254 via 192.0.2.2       lo 169.254.169.254/32, fd00:ec2::254/128
    route fd00:ec2::254 via 2001:db8::2       (the simulated IMDS listens here)

IMDS sits beyond a route, as on EC2, so the guard's OUTPUT rules in HOST see
only the clients' packets, never the simulated IMDS's replies.

Safety: the real machine's 169.254.169.254 answers from the root namespace.
Every program this module runs inside a namespace (``run``, ``popen``,
``http`` and what is built on them) first checks that the namespace is one
this object created (same inode as at creation) and is not the root
namespace, so a bug fails loudly instead of reaching the real IMDS. Only
``ip -n`` set-up of links and addresses, which sends no packets, runs
without that check.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imdsguard.errors import ImdsGuardError

IMDS_V4 = "169.254.169.254"
IMDS_V6 = "fd00:ec2::254"


#: The source checkout holding ``imdsguard_testing`` (not installed: a child
#: Python started with ``-m imdsguard_testing...`` finds it through PYTHONPATH).
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NO_DAD = ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")


class NamespaceSafetyError(ImdsGuardError):
    """A command was about to run outside a namespace this harness created."""


def _ns_inode(path: str) -> int:
    return os.stat(path).st_ino


@dataclass(frozen=True)
class User:
    """A client identity: uid, primary gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


class Topology:
    """HOST and VPC namespaces (and optionally a container behind HOST)."""

    def __init__(self, prefix: str = "imdsg") -> None:
        tag = secrets.token_hex(3)
        self.host = f"{prefix}-{tag}-host"
        self.vpc = f"{prefix}-{tag}-vpc"
        self.container: str | None = None
        self._inodes: dict[str, int] = {}
        self._procs: list[subprocess.Popen[Any]] = []

    # -- lifecycle

    def create(self) -> Topology:
        """Build the namespaces and links (needs root)."""
        try:
            for ns in (self.host, self.vpc):
                _ip("netns", "add", ns)
                self._inodes[ns] = _ns_inode(f"/run/netns/{ns}")
                self.check(ns)
            h, v = self.host, self.vpc
            for ns in (h, v):
                # No duplicate address detection: links are usable at once, no 1 s stall.
                self.run(ns, ["sysctl", "-qw", *_NO_DAD], check=True)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", v, "addr", "add", f"{IMDS_V4}/32", "dev", "lo")
            _ip("-n", v, "-6", "addr", "add", f"{IMDS_V6}/128", "dev", "lo", "nodad")
            _ip("-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", "vpc0", "netns", v)
            _ip("-n", h, "addr", "add", "192.0.2.1/30", "dev", "eth0")
            _ip("-n", h, "-6", "addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad")
            _ip("-n", v, "addr", "add", "192.0.2.2/30", "dev", "vpc0")
            _ip("-n", v, "-6", "addr", "add", "2001:db8::2/64", "dev", "vpc0", "nodad")
            _ip("-n", h, "link", "set", "eth0", "up")
            _ip("-n", v, "link", "set", "vpc0", "up")
            # Static neighbours: the first IPv6 packet would otherwise wait ~1 s for ND.
            mac_h, mac_v = _mac(h, "eth0"), _mac(v, "vpc0")
            for ns, addr, mac, dev in (
                (h, "192.0.2.2", mac_v, "eth0"),
                (h, "2001:db8::2", mac_v, "eth0"),
                (v, "192.0.2.1", mac_h, "vpc0"),
                (v, "2001:db8::1", mac_h, "vpc0"),
            ):
                _ip(
                    "-n",
                    ns,
                    "neigh",
                    "replace",
                    addr,
                    "lladdr",
                    mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                )
            _ip("-n", h, "route", "add", f"{IMDS_V4}/32", "via", "192.0.2.2")
            _ip("-n", h, "-6", "route", "add", f"{IMDS_V6}/128", "via", "2001:db8::2")
        except BaseException:
            self.destroy()
            raise
        return self

    def add_container(self) -> str:
        """A third namespace behind a bridge in HOST, forwarded like Docker's."""
        ns = self.host.replace("-host", "-ctr")
        _ip("netns", "add", ns)
        self._inodes[ns] = _ns_inode(f"/run/netns/{ns}")
        self.container = ns
        h = self.host
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", h, "link", "add", "docker0", "type", "bridge")
        _ip("-n", h, "addr", "add", "198.51.100.1/24", "dev", "docker0")
        _ip("-n", h, "link", "set", "docker0", "up")
        _ip("-n", h, "link", "add", "veth0ctr", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", h, "link", "set", "veth0ctr", "master", "docker0", "up")
        _ip("-n", ns, "addr", "add", "198.51.100.2/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", "198.51.100.1")
        _ip("-n", self.vpc, "route", "add", "198.51.100.0/24", "via", "192.0.2.1")
        self.run(h, ["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        return ns

    def destroy(self) -> None:
        """Stop what we started and delete the namespaces (safe to call twice)."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=scaled(5))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        for ns in (self.container, self.host, self.vpc):
            if ns and os.path.exists(f"/run/netns/{ns}"):
                # Leftover processes keep a namespace alive; kill them first.
                pids = subprocess.run(
                    ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
                ).stdout.split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), 9)
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self._inodes.clear()

    def __enter__(self) -> Topology:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- safety

    def check(self, ns: str) -> None:
        """Raise unless ``ns`` is a namespace this object created and not the root one."""
        expected = self._inodes.get(ns)
        if expected is None:
            raise NamespaceSafetyError(f"namespace {ns!r} was not created by this harness")
        current = _ns_inode(f"/run/netns/{ns}")
        forbidden = {_ns_inode("/proc/self/ns/net")}
        # PID 1 may live in another user namespace; our own namespace still counts.
        with contextlib.suppress(PermissionError):
            forbidden.add(_ns_inode("/proc/1/ns/net"))
        if current != expected or current in forbidden:
            raise NamespaceSafetyError(
                f"namespace {ns!r} (inode {current}) is not the one created (inode {expected}) "
                f"or is the root/current namespace; refusing to run anything in it"
            )

    # -- running things

    def command(self, ns: str, argv: Sequence[str], user: User | None = None) -> list[str]:
        """The argv that runs ``argv`` in ``ns`` (as ``user`` when given)."""
        self.check(ns)
        prefix = ["ip", "netns", "exec", ns]
        if user is not None:
            groups = ",".join(str(g) for g in user.groups)
            prefix += ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}"]
            prefix += [f"--groups={groups}"] if groups else ["--clear-groups"]
        return prefix + list(argv)

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        user: User | None = None,
        timeout: float = 30,
        check: bool = False,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion in ``ns``, capturing text output (``timeout``: native seconds)."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(
            self.command(ns, argv, user), text=True, timeout=scaled(timeout), check=check, **kwargs
        )

    def popen(
        self, ns: str, argv: Sequence[str], user: User | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start in the background in ``ns``; stopped by :meth:`destroy`."""
        proc = subprocess.Popen(self.command(ns, argv, user), **kwargs)
        self._procs.append(proc)
        return proc

    def start_guard(
        self, config: str, env: dict[str, str], log: Any = subprocess.DEVNULL
    ) -> subprocess.Popen[Any]:
        """``imdsguard run -c config`` in HOST, its output (stdout and stderr) to ``log``.

        Returns once the daemon is ready (its state file exists, rules in place).
        ``env`` is usually :func:`guard_env`'s.
        """
        state = os.path.join(env["IMDSGUARD_RUN_DIR"], "state.json")
        proc = self.popen(
            self.host,
            [sys.executable, "-m", "imdsguard", "run", "-c", config],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: os.path.exists(state), 15, "the daemon", proc)
        return proc

    def start_imds(self, workdir: str, *extra: str) -> subprocess.Popen[Any]:
        """Start the simulated IMDS in VPC on both IMDS addresses; wait until it listens."""
        ready = os.path.join(workdir, f"imds-{self.vpc}.ready")
        if os.path.exists(ready):
            os.unlink(ready)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_ROOT, env.get("PYTHONPATH")]))
        proc = self.popen(
            self.vpc,
            [
                sys.executable, "-m", "imdsguard_testing.imds_sim",
                "--listen", f"{IMDS_V4}:80", "--listen", f"[{IMDS_V6}]:80",
                "--ready-file", ready, *extra,
            ],
            env=env,
        )  # fmt: skip
        wait_for(lambda: os.path.exists(ready), 10, "the simulated IMDS to listen", proc)
        return proc

    def http(
        self,
        user: User | None,
        url: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        timeout: float = 5,
        ns: str | None = None,
    ) -> HttpResult:
        """One HTTP request from HOST (or ``ns``) as ``user`` with /usr/bin/curl.

        ``timeout`` is curl's own ``--max-time``, not scaled: it is how long the
        client waits (a dropped connection times out after it), and the network
        path is the kernel's, as fast emulated as native. Starting curl is not.
        """
        argv = ["/usr/bin/curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method]
        argv += ["--max-time", str(timeout), "--noproxy", "*"]
        for key, value in (headers or {}).items():
            argv += ["-H", f"{key}: {value}"]
        start = time.monotonic()
        proc = self.run(ns or self.host, [*argv, url], user=user, timeout=timeout + 10)
        elapsed = time.monotonic() - start
        body, _, code = proc.stdout.rpartition("\n")
        return HttpResult(proc.returncode, int(code or 0), body, proc.stderr.strip(), elapsed)

    def imds_get(self, user: User | None, path: str, *, v2: bool, v6: bool = False) -> HttpResult:
        """GET an IMDS path as ``user``, with a token first when ``v2``."""
        base = f"http://[{IMDS_V6}]" if v6 else f"http://{IMDS_V4}"
        headers: dict[str, str] = {}
        if v2:
            tok = self.http(
                user,
                f"{base}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
            )
            if not tok.ok:
                return tok
            headers["X-aws-ec2-metadata-token"] = tok.body
        return self.http(user, f"{base}{path}", headers=headers)


@dataclass(frozen=True)
class HttpResult:
    """What curl reported: exit code, HTTP status, body, stderr and wall time."""

    rc: int
    status: int
    body: str
    stderr: str
    elapsed: float

    @property
    def ok(self) -> bool:
        """True for a completed request with a 2xx answer."""
        return self.rc == 0 and 200 <= self.status < 300

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def ensure_broker_user() -> None:
    """Create the broker's system user, as the packages' sysusers.d entry would (idempotent).

    Another process may be creating it at the same moment: "already exists"
    (useradd exit 9) is success.
    """
    from imdsguard.identity import broker_account, broker_user_name  # noqa: PLC0415

    name = broker_user_name()
    with contextlib.suppress(ImdsGuardError):
        broker_account()
        return
    proc = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode not in (0, 9):
        raise ImdsGuardError(f"useradd {name} failed: {proc.stderr.strip()}")
    broker_account()  # raises if it still does not exist


def guard_env(workdir: str) -> dict[str, str]:
    """This process's environment with imdsguard's run, state and log directories in ``workdir``."""
    env = dict(os.environ)
    for key in ("run", "state", "log"):
        env[f"IMDSGUARD_{key.upper()}_DIR"] = os.path.join(workdir, key)
    return env


def time_scale() -> float:
    """How many times slower than native this machine runs: ``IMDSGUARD_TIME_SCALE`` (default 1).

    ``make test-vm`` sets it: the stock-kernel VM runs under software
    emulation, 10-20x slower. Every time limit of the harness and of the
    tests goes through :func:`scaled`, so the same limits hold in both places.
    """
    raw = os.environ.get("IMDSGUARD_TIME_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = 0.0
    if not scale > 0:
        raise ImdsGuardError(f"IMDSGUARD_TIME_SCALE={raw!r}: expected a number above 0")
    return scale


def scaled(seconds: float) -> float:
    """``seconds`` of native time on this machine (see :func:`time_scale`)."""
    return seconds * time_scale()


def wait_for(
    cond: Any, timeout: float, what: str, proc: subprocess.Popen[Any] | None = None
) -> None:
    """Poll ``cond()`` until true; fail with ``what`` after ``timeout`` or if ``proc`` dies.

    ``timeout`` is in native seconds: it is :func:`scaled` here, callers pass it plain.
    """
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise ImdsGuardError(f"gave up waiting for {what}: process exited {proc.returncode}")
        if time.monotonic() > deadline:
            raise ImdsGuardError(f"gave up waiting for {what} after {limit:.0f}s")
        time.sleep(0.02)


def _mac(ns: str, dev: str) -> str:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show", dev], capture_output=True, text=True, check=True
    ).stdout
    return str(json.loads(out)[0]["address"])


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImdsGuardError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
