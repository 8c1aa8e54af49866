"""The credential broker end to end: real uids, real firewall, botocore, IMDS faults.

Layout: the simulated IMDS in VPC (tokens required, a control file for
faults, a request log), the daemon in HOST with ``allow.users: []`` (not
even root reaches IMDS directly) and the broker enabled. The broker gets
through only because it runs as its own system user (``imdsguard-broker``),
whose uid the rules allow; no packet mark grants anything.

Test clients run as unprivileged users, so everything they execute must be
readable by them. When the venv and the repository are world-readable (as
with ``make test`` in a checkout outside /root), the clients use the venv's
python and ``python -m imdsguard credentials`` exactly as a user would.
Otherwise (a checkout under /root, mode 0700) the tests copy the packages
the client side needs (imdsguard, botocore and its dependencies) into the
world-readable work directory and run the system interpreter with
``PYTHONPATH`` pointing there; ``credential_process`` inherits that
environment, so botocore's child finds the same copy.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from imdsguard_testing.netns import Topology, User, scaled, time_scale, wait_for
from tests.integration.conftest import DaemonHandle

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CREDS = "/latest/meta-data/iam/security-credentials/imdsguard-demo-role"

BOTOCORE = """
import json, botocore.session
creds = botocore.session.get_session().get_credentials()
frozen = creds.get_frozen_credentials()
print(json.dumps({"method": creds.method, "access_key": frozen.access_key,
                  "secret_key": frozen.secret_key, "token": frozen.token}))
"""

# Fetches through the broker every 0.1 s for argv[2] seconds; one JSON line per attempt.
FETCH_LOOP = """
import json, sys, time
from imdsguard.broker.client import fetch_credentials
from imdsguard.errors import BrokerError
end = time.time() + float(sys.argv[2])
while time.time() < end:
    t = time.time()
    try:
        d = fetch_credentials(sys.argv[1], timeout=5)
        out = {"t": t, "ok": True, "exp": d["Expiration"], "key": d["AccessKeyId"],
               "secret": d["SecretAccessKey"], "token": d["SessionToken"]}
    except BrokerError as exc:
        out = {"t": t, "ok": False, "error": str(exc)}
    out["ms"] = round((time.time() - t) * 1000, 1)
    print(json.dumps(out), flush=True)
    time.sleep(0.1)
"""


@dataclass
class Client:
    """How a test user runs Python: interpreter, environment, credential command."""

    python: str
    env: dict[str, str]
    credentials_argv: list[str] = field(default_factory=list)


def _readable_by(user: User, path: str) -> bool:
    """Whether ``user`` can traverse to and read ``path`` (checked as that user)."""
    probe = subprocess.run(
        ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
         "test", "-r", path],
        check=False,
    )  # fmt: skip
    return probe.returncode == 0


def _copy_client_packages(dest: str) -> None:
    """World-readable copies of what the client side imports."""
    for name in ("imdsguard", "botocore", "dateutil", "jmespath", "urllib3", "six"):
        module = importlib.import_module(name)
        origin = module.__file__
        assert origin is not None
        if os.path.basename(origin) == "__init__.py":
            shutil.copytree(os.path.dirname(origin), os.path.join(dest, name))
        else:
            shutil.copy2(origin, dest)
    for root, dirs, files in os.walk(dest):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)  # noqa: S103 - test users read it
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    os.chmod(dest, 0o755)  # noqa: S103 - test users read it


@dataclass
class Env:
    """One broker set-up: topology, daemon, paths and the client recipe."""

    topo: Topology
    daemon: DaemonHandle
    workdir: str
    socket: str
    control: str
    request_log: str
    client: Client

    def as_user(
        self, user: User, argv: list[str], timeout: float = 60, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return self.topo.run(
            self.topo.host,
            ["env", "-i", *(f"{k}={v}" for k, v in {**self.client.env, **env}.items()), *argv],
            user=user,
            timeout=timeout,
        )

    def botocore(self, user: User) -> subprocess.CompletedProcess[str]:
        return self.as_user(user, [self.client.python, "-c", BOTOCORE])

    def credentials(self, user: User) -> subprocess.CompletedProcess[str]:
        return self.as_user(user, self.client.credentials_argv)

    def fault(self, kind: str | None, delay: float | None = None) -> None:
        tmp = self.control + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"fault": kind, "delay": delay}, fh)
        os.replace(tmp, self.control)

    def poke_imds(self) -> None:
        """A request from inside VPC, so the simulator reads its control file now."""
        self.topo.run(
            self.topo.vpc,
            ["/usr/bin/curl", "-s", "-o", "/dev/null", "--max-time", "2",
             "http://169.254.169.254/latest/meta-data/"],
        )  # fmt: skip

    def imds_records(self) -> list[dict[str, Any]]:
        with open(self.request_log) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def log_lines(self) -> list[dict[str, Any]]:
        return self.daemon.logs()

    def all_log_text(self) -> str:
        """Everything the guard wrote: daemon output, event log, state."""
        text = ""
        for root, _, files in os.walk(self.workdir):
            for name in files:
                if name.endswith((".log", ".jsonl", ".json")) and "site" not in root:
                    with open(os.path.join(root, name), errors="replace") as fh:
                        text += fh.read()
        return text

    def health(self) -> dict[str, Any]:
        from imdsguard.broker.client import fetch_health

        status, doc = fetch_health(self.socket, 5)
        doc["http_status"] = status
        return doc


def _client_recipe(workdir: str, user: User, config_path: str) -> Client:
    """How ``user`` runs Python here, with an AWS config whose credential_process is imdsguard."""
    python = sys.executable
    env = {"HOME": workdir, "PATH": "/usr/bin:/bin", "AWS_EC2_METADATA_DISABLED": "true"}
    import botocore

    needed = (python, os.path.join(REPO, "imdsguard"), os.path.dirname(botocore.__file__))
    if not all(_readable_by(user, path) for path in needed):
        site = os.path.join(workdir, "site")
        _copy_client_packages(site)
        python = os.path.realpath(
            sys.executable
        )  # the interpreter itself, e.g. /usr/bin/python3.11
        env["PYTHONPATH"] = site
    # The real command, as users put it in their AWS config: no stand-in.
    argv = [python, "-m", "imdsguard", "credentials", "-c", config_path]
    aws = os.path.join(workdir, "aws")
    os.makedirs(aws, exist_ok=True)
    os.chmod(aws, 0o755)  # noqa: S103 - test users read it
    with open(os.path.join(aws, "config"), "w") as fh:
        command = " ".join(f'"{a}"' if " " in a or ";" in a else a for a in argv)
        fh.write(f"[default]\nregion = us-east-1\ncredential_process = {command}\n")
    os.chmod(os.path.join(aws, "config"), 0o644)
    env["AWS_CONFIG_FILE"] = os.path.join(aws, "config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(aws, "none")
    return Client(python, env, argv)


def broker_config(sock: str) -> str:
    """The ``broker:`` section of these tests: on at ``sock`` for imdsg-app and imdsg-readers."""
    return textwrap.dedent(
        f"""\
        broker:
          enabled: true
          socket: {sock}
          clients:
            users: [imdsg-app]
            groups: [imdsg-readers]
        """
    )


def _broker_env(
    workdir: str,
    backend: str,
    users: dict[str, User],
    lifetime: float = 3600,
    unit: bool = False,
) -> Iterator[Env]:
    """``unit``: the broker as imdsguard-broker.service runs it (``imdsguard broker-serve``
    as the broker's user, connecting to the daemon), started here instead of systemd."""
    control = os.path.join(workdir, "control.json")
    request_log = os.path.join(workdir, "imds-requests.log")
    with Topology() as topo:
        topo.start_imds(
            workdir,
            "--http-tokens", "required",
            "--credential-lifetime", str(lifetime),
            "--control-file", control,
            "--request-log", request_log,
        )  # fmt: skip
        env = dict(os.environ)
        for key in ("run", "state", "log"):
            path = os.path.join(workdir, key)
            os.makedirs(path, exist_ok=True)
            env[f"IMDSGUARD_{key.upper()}_DIR"] = path
        sock = os.path.join(workdir, "run", "broker.sock")
        daemon = DaemonHandle(topo, workdir, os.path.join(workdir, "config.yaml"), env, backend)
        daemon.write_config("allow:\n  users: []\n" + broker_config(sock))
        if unit:
            env["IMDSGUARD_BROKER_UNIT"] = "imdsguard-broker.service"
        daemon.start()
        if unit:
            start_broker_unit(topo, daemon)
        setup = Env(
            topo,
            daemon,
            workdir,
            sock,
            control,
            request_log,
            _client_recipe(workdir, users["imdsg-app"], daemon.config_path),
        )
        try:
            wait_for(lambda: os.path.exists(sock), 10, "the broker socket", daemon.proc)
            wait_for(lambda: setup.health()["status"] == "ok", 10, "the broker's first credentials")
            yield setup
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()


@pytest.fixture
def backend() -> str:
    """iptables unless a test asks for both (the broker's mark rule differs per backend)."""
    return "iptables"


@pytest.fixture
def env(workdir: str, backend: str, test_users: dict[str, User]) -> Iterator[Env]:
    yield from _broker_env(workdir, backend, test_users)


def start_broker_unit(topo: Topology, daemon: DaemonHandle) -> subprocess.Popen[Any]:
    """``imdsguard broker-serve`` as the broker's user, as imdsguard-broker.service runs it."""
    from imdsguard.identity import broker_account

    account = broker_account()
    return topo.popen(
        topo.host,
        daemon.cli_argv("broker-serve"),
        user=User(account.uid, account.gid),
        env=daemon.env,
        # Its own log (journald keeps the units apart too); appending to the
        # daemon's file would interleave partial lines.
        stdout=open(os.path.join(daemon.workdir, "broker-unit.log"), "a"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def short_lived(workdir: str, test_users: dict[str, User]) -> Iterator[Env]:
    """Credentials that live 40 s: the broker refreshes at 20 s, stops serving at 36 s."""
    yield from _broker_env(workdir, "iptables", test_users, lifetime=40)


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_botocore_gets_credentials_through_the_broker(
    env: Env, test_users: dict[str, User]
) -> None:
    app, member = test_users["imdsg-app"], test_users["imdsg-member"]
    # Nobody reaches IMDS directly, root included ...
    for user in (app, None):
        assert env.topo.imds_get(user, CREDS, v2=True).rc != 0
    # ... but the broker fetched credentials with IMDSv2, as its own allowed uid.
    records = env.imds_records()
    assert [r["path"] for r in records][:3] == [
        "/latest/api/token",
        "/latest/meta-data/iam/security-credentials/",
        CREDS,
    ]
    assert all(r["token"] for r in records if r["method"] == "GET")
    for user in (app, member):  # allowed as a user, and through a group
        result = env.botocore(user)
        assert result.returncode == 0, result.stderr
        creds = json.loads(result.stdout)
        assert creds["method"] == "custom-process"
        assert re.fullmatch(r"ASIA[A-Z0-9]{16}", creds["access_key"])
        assert creds["secret_key"]
        assert creds["token"].startswith("IQoJb3JpZ2luX2Vj")
    served = [e for e in env.log_lines() if e.get("event") == "broker_request"]
    assert {(e["uid"], e["status"]) for e in served} >= {(app.uid, 200), (member.uid, 200)}
    assert all(e["exe"] for e in served)
    assert len(env.imds_records()) == 3  # every client was served from the cache


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_the_broker_starts_only_once_its_mark_may_pass(env: Env) -> None:
    """Over rules of a policy without the broker (left by ``apply`` or an earlier daemon),
    the broker's first IMDS request must not be denied: it starts after the rules that
    let its uid through, at start and on a reload that turns it on."""
    daemon = env.daemon

    def blocked_root() -> list[dict[str, Any]]:
        return [
            e for e in daemon.logs() if e.get("event") == "imds_access_blocked" and e["uid"] == 0
        ]

    def served_at_once() -> None:
        wait_for(lambda: env.health()["status"] == "ok", 10, "the broker's credentials")
        started = [e for e in daemon.logs() if e.get("event") == "broker_started"]
        fetched = [e for e in daemon.logs() if e.get("event") == "credentials_refreshed"]
        assert started and fetched, daemon.logs()
        assert not blocked_root(), blocked_root()
        failed = [e for e in daemon.logs() if e.get("event") == "credentials_refresh_failed"]
        assert not failed, failed

    broker = daemon.config_path + ".broker"
    shutil.copy(daemon.config_path, broker)
    assert daemon.stop() == 0
    daemon.write_config("allow:\n  users: []\n")
    assert daemon.cli("apply").returncode == 0  # no allowance for the broker's mark
    os.replace(broker, daemon.config_path)
    daemon.start()
    served_at_once()
    # The same on a reload: broker off (its allowance goes), then on again.
    shutil.copy(daemon.config_path, broker)
    daemon.write_config("allow:\n  users: []\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("config_reloaded")
    os.replace(broker, daemon.config_path)
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("config_reloaded", count=2)
    served_at_once()


def test_non_client_gets_a_clear_refusal(env: Env, test_users: dict[str, User]) -> None:
    denied = test_users["imdsg-denied"]
    assert env.topo.imds_get(denied, CREDS, v2=True).rc != 0
    result = env.credentials(denied)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"imdsguard: the broker refused: uid {denied.uid} is not an allowed broker client"
    )
    boto = env.botocore(denied)
    assert boto.returncode != 0
    assert "is not an allowed broker client" in boto.stderr
    refused = [e for e in env.log_lines() if e.get("event") == "broker_refused"]
    assert refused, env.log_lines()
    first = refused[0]
    assert first["uid"] == denied.uid
    assert first["user"] == "imdsg-denied"
    assert first["attributed"] is True
    assert first["exe"] == os.path.realpath(env.client.python)
    # The peer was the real `imdsguard credentials` (botocore runs the same command).
    assert first["cmdline"] == env.client.credentials_argv
    assert first["cmdline"][1:4] == ["-m", "imdsguard", "credentials"]
    assert first["ancestors"]


def test_imds_faults_do_not_interrupt_service(
    short_lived: Env, test_users: dict[str, User]
) -> None:
    env = short_lived
    app = test_users["imdsg-app"]
    first = json.loads(env.credentials(app).stdout)
    expires = datetime_epoch(first["Expiration"])
    serve_until = expires - 4  # 10% of the 40 s lifetime
    out: list[dict[str, Any]] = []
    duration = str(round(expires - time.time() + 5, 1))  # through expiry and recovery
    loop = threading.Thread(
        target=lambda: out.extend(
            json.loads(line)
            for line in env.as_user(
                app, [env.client.python, "-c", FETCH_LOOP, env.socket, duration], timeout=90
            ).stdout.splitlines()
        )
    )
    loop.start()
    # The broker's token is revoked: its first request after the outage gets a 401.
    env.fault("expire-tokens")
    env.poke_imds()
    # From the refresh point (20 s) on, every attempt of the broker meets a fault:
    # each kind in turn until the broker has met it, then 500s until shortly
    # before the cached set must be withdrawn.
    degraded_seen = False
    for kind in ("500", "truncate", "reset", "timeout", "500"):
        env.fault(kind, delay=3.0 if kind == "timeout" else None)
        seen = sum(1 for r in env.imds_records() if r.get("fault") == kind)
        while time.time() < serve_until - 1:
            if sum(1 for r in env.imds_records() if r.get("fault") == kind) > seen:
                break
            time.sleep(0.05)
        degraded_seen = degraded_seen or env.health()["status"] == "degraded"
    while time.time() < serve_until - 1:
        time.sleep(0.05)
    env.fault(None)
    loop.join()
    records = env.imds_records()
    faulted = {r.get("fault") for r in records}
    assert {"500", "truncate", "reset", "timeout"} <= faulted, faulted
    assert any(r["status"] == 401 and r["client"] == "192.0.2.1" for r in records), records
    assert degraded_seen
    while_valid = [r for r in out if r["t"] < serve_until - 0.5]
    assert len(while_valid) > 100 / time_scale()  # one fetch every 0.1 s plus its time
    assert all(r["ok"] for r in while_valid), [r for r in while_valid if not r["ok"]][:3]
    # Served from the cache, never waiting on IMDS: a fetch that waited on the broker's
    # refresh would take the 3 s timeout fault. The typical fetch is fast; the slowest
    # is allowed a loaded machine's scheduling hiccup (282 ms seen at load 4), not a wait.
    took = sorted(r["ms"] for r in while_valid)
    assert took[int(0.95 * len(took))] < scaled(200), took[-10:]
    assert took[-1] < scaled(1000), took[-10:]
    for r in out:  # never a set about to expire
        if r["ok"]:
            assert datetime_epoch(r["exp"]) - r["t"] > 3, r
    # Once IMDS is back, fresh credentials.
    assert out[-1]["ok"], out[-5:]
    assert datetime_epoch(out[-1]["exp"]) > expires
    assert env.health()["status"] == "ok"
    _assert_no_secrets(env, out)


def _assert_no_secrets(env: Env, served: list[dict[str, Any]]) -> None:
    secrets = {r["secret"] for r in served if r["ok"]} | {r["token"] for r in served if r["ok"]}
    assert len(secrets) >= 4  # at least two sets of credentials were served
    text = env.all_log_text()
    assert "broker_request" in text
    for secret in secrets:
        assert secret not in text
        assert secret[:16] not in text
    # IMDSv2 session tokens (56 base64 characters starting AQAE) never appear either.
    assert not re.search(r"AQAE[A-Za-z0-9+/]{40,}", text)
    assert "IQoJb3JpZ2luX2Vj" not in text


def test_no_secret_in_any_log(env: Env, test_users: dict[str, User]) -> None:
    app = test_users["imdsg-app"]
    served = []
    for _ in range(3):
        result = env.as_user(app, [env.client.python, "-c", FETCH_LOOP, env.socket, "0.2"])
        served += [json.loads(line) for line in result.stdout.splitlines()]
    env.credentials(test_users["imdsg-denied"])
    env.fault("500")
    time.sleep(scaled(0.3))
    env.fault(None)
    env.daemon.signal(signal.SIGHUP)
    env.daemon.wait_log("config_reloaded")
    status = env.daemon.cli("status", "--json")
    secrets = {r["secret"] for r in served} | {r["token"] for r in served}
    for secret in secrets:
        assert secret not in status.stdout + status.stderr
    text = env.all_log_text()
    for secret in secrets:
        assert secret not in text
    assert not re.search(r"AQAE[A-Za-z0-9+/]{40,}", text)


def datetime_epoch(text: str) -> float:
    from imdsguard.imds import parse_time

    return parse_time(text)


# -- privilege separation: the broker's own process, user and checks

# Connects as the user it runs as, forks; the parent becomes an allowed program
# (exec of argv[2]) while the child, still this denied program, sends the request
# on the shared connection. Prints the status the child got.
CONNECT_FORK_EXEC = """
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
os.set_inheritable(s.fileno(), True)
r, w = os.pipe()
if os.fork() == 0:
    os.close(w)
    os.read(r, 1)  # EOF: the parent has exec'd (the pipe was close-on-exec there)
    time.sleep(0.2)
    s.sendall(b"GET /v1/credentials HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    print(reply.split(b"\\r\\n", 1)[0].decode(), flush=True)
    os._exit(0)
os.close(r)
os.set_inheritable(w, False)
os.execv(sys.argv[2], [sys.argv[2], "3"])
"""


def _broker_process(env: Env) -> dict[str, Any]:
    state = os.path.join(env.daemon.env["IMDSGUARD_RUN_DIR"], "state.json")

    def published() -> bool:
        if not os.path.exists(state):
            return False
        with open(state) as fh:
            return bool(json.load(fh)["components"]["broker"]["process"]["pid"])

    wait_for(published, 15, "the broker's process in state.json", env.daemon.proc)
    with open(state) as fh:
        doc: dict[str, Any] = json.load(fh)["components"]["broker"]
    return doc


def _status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


def test_connect_then_exec_does_not_borrow_an_allowed_exe(
    env: Env, test_users: dict[str, User]
) -> None:
    """issue 14 item 5: a denied uid connects, forks, the parent execs the allowed
    /usr/bin/sleep and the child sends the request: refused, and logged."""
    sleep = os.path.realpath(shutil.which("sleep") or "/usr/bin/sleep")
    with open(env.daemon.config_path) as fh:
        text = fh.read()
    env.daemon.write_config(text.replace("groups: [imdsg-readers]", f"exes: [{sleep}]"))
    env.daemon.signal(signal.SIGHUP)
    env.daemon.wait_log("config_reloaded")
    denied = test_users["imdsg-denied"]
    result = env.as_user(denied, [env.client.python, "-c", CONNECT_FORK_EXEC, env.socket, sleep])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "HTTP/1.1 403 Forbidden", result.stdout
    refused = [e for e in env.log_lines() if e.get("event") == "broker_refused"]
    assert refused and refused[-1]["uid"] == denied.uid, refused
    assert "also holds this connection" in refused[-1]["reason"] or "connect, then exec" in str(
        refused[-1]["exe_problem"]
    ), refused[-1]
    served = [e for e in env.log_lines() if e.get("event") == "broker_request"]
    assert not [e for e in served if e["uid"] == denied.uid and e["status"] == 200]


def test_the_broker_runs_as_its_own_user_without_capabilities(env: Env) -> None:
    from imdsguard.identity import broker_account

    account = broker_account()
    doc = _broker_process(env)
    pid = doc["process"]["pid"]
    assert doc["process"]["uid"] == account.uid and doc["process"]["user"] == account.name
    fields = _status_fields(pid)
    assert fields["Uid"].split() == [str(account.uid)] * 4
    assert fields["Gid"].split() == [str(account.gid)] * 4
    assert fields["Groups"].strip() == ""
    net_admin, net_raw = 1 << 12, 1 << 13
    for key in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
        caps = int(fields[key], 16)
        assert caps & (net_admin | net_raw) == 0, (key, fields[key])
        assert caps == 0, (key, fields[key])
    assert fields["NoNewPrivs"].strip() == "1"
    # The daemon bound the socket: root owns it (and its directory), clients can connect.
    st = os.lstat(env.socket)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o666)
    assert os.stat(os.path.dirname(env.socket)).st_uid == 0
    # It reaches IMDS as its own uid: every IMDS request came from it, none was blocked.
    assert env.health()["status"] == "ok"
    blocked = [e for e in env.log_lines() if e.get("event") == "imds_access_blocked"]
    assert not [e for e in blocked if e["uid"] == account.uid], blocked


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_killed_broker_is_restarted_and_healthy_again(
    env: Env, test_users: dict[str, User]
) -> None:
    first = _broker_process(env)["process"]["pid"]
    os.kill(first, signal.SIGKILL)
    exited = env.daemon.wait_log("broker_process_exited", timeout=10)
    assert exited[0]["returncode"] == -9 and exited[0]["pid"] == first
    env.daemon.wait_log("broker_process_started", count=2, timeout=10)
    wait_for(lambda: env.health()["status"] == "ok", 15, "the restarted broker's credentials")
    result = env.credentials(test_users["imdsg-app"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Version"] == 1

    def restarted() -> bool:
        doc = json.loads(env.daemon.cli("status", "--json").stdout)["broker"]
        return bool(doc["healthy"] and doc["process"]["restarts"] == 1)

    wait_for(restarted, 15, "status to show a healthy broker restarted once")
    assert _broker_process(env)["process"]["pid"] != first


def test_a_missing_broker_account_is_a_clear_error_at_start(daemon: DaemonHandle) -> None:
    daemon.write_config("allow:\n  users: []\n" + broker_config(daemon.workdir + "/b.sock"))
    daemon.env["IMDSGUARD_BROKER_USER"] = "imdsg-no-such-user"
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=30) != 0
    with open(daemon.log_path) as fh:
        out = fh.read()
    assert "imdsg-no-such-user" in out
    assert "useradd --system --no-create-home --shell /usr/sbin/nologin imdsg-no-such-user" in out


def test_unit_mode_broker_connects_serves_and_comes_back(
    workdir: str, test_users: dict[str, User]
) -> None:
    """What imdsguard-broker.service does: the daemon switches no user; the broker, started
    apart as its own user, connects to the control socket and serves; a uid other than
    the broker's is refused there; a broker that dies and comes back is served again."""
    from imdsguard.identity import broker_account

    account = broker_account()
    setup = _broker_env(workdir, "iptables", test_users, unit=True)
    env = next(setup)
    try:
        doc = _broker_process(env)
        assert doc["process"]["unit"] == "imdsguard-broker.service"
        pid = doc["process"]["pid"]
        assert _status_fields(pid)["Uid"].split() == [str(account.uid)] * 4
        result = env.credentials(test_users["imdsg-app"])
        assert result.returncode == 0, result.stderr
        # Only the broker's uid may take the listening socket.
        control = os.path.join(env.daemon.env["IMDSGUARD_RUN_DIR"], "broker-control.sock")
        grab = (
            "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
            "s.connect(sys.argv[1]); d, fds, _, _ = socket.recv_fds(s, 65536, 1); "
            "print(len(d), len(fds))"
        )
        denied = test_users["imdsg-denied"]
        out = env.as_user(denied, [env.client.python, "-c", grab, control])
        assert out.stdout.split() == ["0", "0"], (out.stdout, out.stderr)
        refused = env.daemon.wait_log("broker_control_refused")
        assert refused[0]["uid"] == denied.uid
        # The broker dies (systemd would restart it): it is served again when it comes back.
        os.kill(pid, signal.SIGKILL)
        env.daemon.wait_log("broker_disconnected")
        start_broker_unit(env.topo, env.daemon)
        wait_for(lambda: env.health()["status"] == "ok", 15, "the broker's second session")

        def restarted() -> bool:
            broker = json.loads(env.daemon.cli("status", "--json").stdout)["broker"]
            return bool(broker["healthy"] and broker["process"]["restarts"] == 1)

        wait_for(restarted, 15, "status to show the second session")
        assert env.credentials(test_users["imdsg-app"]).returncode == 0
    finally:
        setup.close()
