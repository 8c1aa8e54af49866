"""Fixtures for real-kernel tests: EC2-like namespaces, test users, a running daemon.

Everything here runs the real daemon against real kernel rules inside
throw-away network namespaces (imdsguard_testing.netns.Topology, which refuses to run
anything outside a namespace it created).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from imdsguard.broker.client import fetch_health
from imdsguard.errors import ImdsGuardError
from imdsguard_testing.netns import Topology, User, ensure_broker_user, scaled, wait_for

USERS = {
    "imdsg-app": [],  # allowed by name
    "imdsg-byuid": [],  # allowed by numeric uid
    "imdsg-member": ["imdsg-readers"],  # allowed through a supplementary group
    "imdsg-denied": [],  # never allowed
}


def _why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces and the firewall)"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"imdsg-probe-{os.getpid()}"
    proc = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return f"'ip netns add' does not work here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Mark everything under tests/integration and skip it only when netns truly cannot work."""
    reason = None
    checked = False
    for item in items:
        if "integration" in item.keywords or "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            if not checked:
                reason, checked = _why_no_netns(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def test_users() -> dict[str, User]:
    """Real system users for clients (created once, idempotently)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create test users")
    for group in {g for groups in USERS.values() for g in groups}:
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", "-r", group], check=True)
    result = {}
    for name, groups in USERS.items():
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", name], check=True)
        for group in groups:
            subprocess.run(["usermod", "-a", "-G", group, name], check=True)
        pw = pwd.getpwnam(name)
        gids = tuple(grp.getgrnam(g).gr_gid for g in groups)
        result[name] = User(pw.pw_uid, pw.pw_gid, gids)
    result["root"] = User(0, 0)
    ensure_broker_user()  # the broker's own system user (the packages' sysusers.d entry)
    return result


@pytest.fixture
def workdir() -> Iterator[str]:
    """A world-readable temp dir (test users cannot enter /root or pytest's 0700 dirs)."""
    path = tempfile.mkdtemp(prefix="imdsg-test-")
    os.chmod(path, 0o755)  # noqa: S103 - test users must read it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def topo(workdir: str) -> Iterator[Topology]:
    """EC2-like HOST/VPC namespaces with the simulated IMDS listening."""
    with Topology() as topology:
        topology.start_imds(workdir, "--request-log", os.path.join(workdir, "imds.log"))
        yield topology


@dataclass
class DaemonHandle:
    """A running ``imdsguard run`` in the HOST namespace, on one firewall backend."""

    topo: Topology
    workdir: str
    config_path: str
    env: dict[str, str]
    backend: str = "iptables"
    proc: subprocess.Popen[Any] | None = None
    log_path: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    wrapper: list[str] = field(default_factory=list)  # e.g. prlimit: the daemon's argv follows

    def write_config(self, text: str) -> None:
        if "firewall:" not in text:
            text = f"firewall:\n  backend: {self.backend}\n" + text
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.config_path)

    def start(self, wait: bool = True) -> DaemonHandle:
        self.log_path = os.path.join(self.workdir, f"daemon-{time.monotonic_ns()}.log")
        state = os.path.join(self.env["IMDSGUARD_RUN_DIR"], "state.json")
        if os.path.exists(state):
            os.unlink(state)
        self.proc = self.topo.popen(
            self.topo.host,
            [*self.wrapper, sys.executable, "-m", "imdsguard", "run", "-c", self.config_path],
            env=self.env,
            stdout=open(self.log_path, "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        if wait:
            try:
                wait_for(lambda: os.path.exists(state), 15, "the daemon to be ready", self.proc)
            except ImdsGuardError as exc:
                with open(self.log_path) as fh:
                    tail = fh.read()[-2000:]
                raise AssertionError(f"{exc}; the daemon said:\n{tail}") from None
        return self

    def start_broker(self, extra: str = "") -> str:
        """Start with the broker on for imdsg-app (nobody allowed directly) plus ``extra``.

        ``extra``: more config (YAML lines); ``wrapper`` and ``extra_env`` apply as to
        ``start``. Returns once the broker serves credentials; its socket's path.
        """
        sock = os.path.join(self.workdir, "run", "broker.sock")
        self.write_config(
            "allow:\n  users: []\n"
            + extra
            + f"broker:\n  enabled: true\n  socket: {sock}\n  clients:\n    users: [imdsg-app]\n"
        )
        self.start()
        wait_for(lambda: os.path.exists(sock), 10, "the broker socket", self.proc)
        wait_for(lambda: fetch_health(sock)[1]["status"] == "ok", 10, "the broker's credentials")
        return sock

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=scaled(15))

    def logs(self) -> list[dict[str, Any]]:
        """Every line the daemon wrote (stdout and stderr), each one JSON object.

        Anything else (a traceback, a C library's warning) is a stray line in
        the journal and fails the test. A last line still being written
        (no newline yet) is left for the next call.
        """
        out = []
        # With journald's priority prefix asked for, every line must carry one.
        prefixed = self.env.get("IMDSGUARD_LOG_PRIORITY_PREFIX") == "yes"
        with open(self.log_path) as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break
                if prefixed:
                    if not re.match(r"<[0-7]>", line):
                        raise AssertionError(f"daemon line without a priority prefix: {line!r}")
                    line = line[3:]  # noqa: PLW2901 - what journald keeps as MESSAGE
                try:
                    doc = json.loads(line)
                except ValueError:
                    doc = None
                if not isinstance(doc, dict):
                    raise AssertionError(f"daemon printed a non-JSON line: {line!r}")
                out.append(doc)
        return out

    def wait_log(self, event: str, count: int = 1, timeout: float = 5) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            nonlocal found
            found = [e for e in self.logs() if e.get("event") == event]
            return len(found) >= count

        wait_for(seen, timeout, f"{count} '{event}' log line(s)", self.proc)
        return found

    def cli_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "imdsguard", *args]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.topo.run(
            self.topo.host, [*self.cli_argv(*args), "-c", self.config_path], env=self.env
        )

    def ruleset_text(self) -> str:
        """Everything in the kernel's firewall of HOST, in save form (both backends)."""
        out = ""
        for argv in (
            ["iptables-legacy-save", "-t", "filter"],
            ["ip6tables-legacy-save", "-t", "filter"],
        ):
            out += self.topo.run(self.topo.host, argv, check=True).stdout
        listing = self.topo.run(self.topo.host, ["nft", "list", "ruleset"], check=True).stdout
        # Tables in name order: a table re-created (our backstop, by a repair) is
        # listed last, and that order means nothing.
        tables = re.split(r"\n(?=table )", "\n" + listing)
        out += "\n".join(sorted(t.strip("\n") for t in tables if t.strip())) + "\n"
        out = re.sub(r"\[\d+:\d+\]", "[0:0]", out)  # packet counters move; rules do not
        return "\n".join(ln for ln in out.splitlines() if not ln.startswith("#"))


BACKENDS = ["iptables", "nftables"]


@pytest.fixture(params=BACKENDS)
def backend(request: Any) -> str:
    """Each firewall backend in turn."""
    return str(request.param)


@pytest.fixture
def daemon(topo: Topology, workdir: str, backend: str) -> Iterator[DaemonHandle]:
    """A daemon handle with its own runtime/state/log dirs (not started yet)."""
    ensure_broker_user()
    env = dict(os.environ)
    for key in ("run", "state", "log"):
        path = os.path.join(workdir, key)
        os.makedirs(path, exist_ok=True)
        env[f"IMDSGUARD_{key.upper()}_DIR"] = path
    handle = DaemonHandle(topo, workdir, os.path.join(workdir, "config.yaml"), env, backend)
    handle.write_config("allow:\n  users: [root]\n")
    yield handle
    if handle.proc is not None and handle.proc.poll() is None:
        handle.proc.kill()
        handle.proc.wait()
