"""Every product path that talks to IMDS, facing each fault the simulator injects.

Faults (the simulator's control file): HTTP 500, timeouts (an answer later
than the client's 2 s), truncated bodies (half of the promised
Content-Length, then a hang-up), connection resets, and revoked session
tokens (``expire-tokens``: the next request with the old token gets 401).

- ``imdsguard audit`` (the main gap): for each fault on every path, on the
  metadata tree only and on user-data only, the audit finishes, exits with
  the contract's code (1 exactly when a finding is high), turns each failed
  request into an info/low finding whose detail is one line naming what went
  wrong, and never prints a user-data secret or a session token. A token
  revoked in the middle of an audit is renewed and the audit completes.
- The broker with nothing cached (the daemon started while IMDS fails):
  ``imdsguard credentials`` exits 1 with one line that says why, health is
  503 ``unavailable``, ``status`` says degraded, the daemon stays up; once
  IMDS is back the next request gets credentials and everything is healthy.

Not repeated here: the broker *with* credentials cached meeting every fault
while it refreshes (keeps serving, health degraded, recovers, 401 renewal,
no secret in any log) is ``test_broker.py::test_imds_faults_do_not_interrupt_service``.
The demo's and the harness's HTTP helpers are not product code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from imdsguard.imds import CREDENTIALS_PATH, TOKEN_PATH
from imdsguard_testing.netns import Topology, User, scaled, wait_for
from tests.integration.test_broker import Env, _broker_env

SECRET_KEY = "AKIA" + "ZXCVBNMASDFGHJKL"  # test data, shaped like an access key id
PASSWORD = "Fault-Injection-Passw0rd"  # noqa: S105 - test data
USER_DATA = f"#!/bin/bash\nexport AWS_ACCESS_KEY_ID={SECRET_KEY}\nDB_PASSWORD={PASSWORD}\n"
TOKEN_RE = re.compile(r"AQAE[A-Za-z0-9+/]{40,}")  # an IMDSv2 session token
CLIENT_TIMEOUT = 2.0  # the audit's IMDS client
LATE = 2.5  # the simulator answers this late for a "timeout": after the client gave up

#: What each fault looks like in a one-line error.
SAYS = {
    "500": "HTTP 500",
    "timeout": f"no answer within {CLIENT_TIMEOUT:g}s",
    "truncate": "cut short",
    "reset": "connection reset",
}


@dataclass
class Sim:
    """The simulated IMDS (tokens required, secrets in user-data) and a guard in place."""

    topo: Topology
    workdir: str
    control: str
    request_log: str
    config: str
    env: dict[str, str]

    def fault(
        self, kind: str | None, paths: list[str] | None = None, delay: float | None = None
    ) -> None:
        tmp = self.control + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"fault": kind, "paths": paths, "delay": delay}, fh)
        os.replace(tmp, self.control)  # a new inode: the simulator notices at its next request

    def audit_argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "imdsguard", "audit", *extra, "-c", self.config]

    def audit(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.topo.run(self.topo.host, self.audit_argv(*extra), env=self.env, timeout=60)

    def records(self) -> list[dict[str, Any]]:
        with open(self.request_log) as fh:
            return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    workdir = tempfile.mkdtemp(prefix="imdsg-faults-")
    os.chmod(workdir, 0o755)  # noqa: S103 - nothing secret; mirrors the workdir fixture
    try:
        user_data = os.path.join(workdir, "user-data")
        with open(user_data, "w") as fh:
            fh.write(USER_DATA)
        control = os.path.join(workdir, "control.json")
        request_log = os.path.join(workdir, "imds.log")
        config = os.path.join(workdir, "config.yaml")
        with open(config, "w") as fh:
            fh.write("firewall:\n  backend: iptables\n")  # root allowlisted (the default)
        os.chmod(config, 0o644)
        env = dict(os.environ)
        for key in ("run", "state", "log"):
            env[f"IMDSGUARD_{key.upper()}_DIR"] = os.path.join(workdir, key)
        with Topology() as topo:
            topo.start_imds(
                workdir,
                "--http-tokens", "required",
                "--user-data-file", user_data,
                "--control-file", control,
                "--request-log", request_log,
            )  # fmt: skip
            # Rules in place without a daemon: guard-state is "low" (degraded), not high,
            # so the exit code says what the IMDS findings are.
            apply = [sys.executable, "-m", "imdsguard", "apply", "-c", config]
            applied = topo.run(topo.host, apply, env=env)
            assert applied.returncode == 0, applied.stderr
            yield Sim(topo, workdir, control, request_log, config, env)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _own_stderr(result: subprocess.CompletedProcess[str]) -> str:
    """What the command wrote on stderr (should be nothing: not even libxtables' warning)."""
    return result.stderr


def _findings(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["id"]: f for f in report["findings"]}


def _check_clean(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The audit's contract whatever IMDS did: JSON, defined exit code, one-line details."""
    assert _own_stderr(result) == "", result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    high = any(f["severity"] == "high" for f in report["findings"])
    # 3 (unknown) when a fault kept a check from running: said in "unchecked", never a pass.
    expected = 1 if high else (3 if report["unchecked"] else 0)
    assert result.returncode == expected, (result.returncode, report["findings"])
    for f in report["findings"]:
        assert set(f) == {"id", "severity", "title", "detail", "remediation"}, f
        assert f["severity"] in ("high", "medium", "low", "info"), f
        for key in ("title", "detail"):
            assert f[key].isprintable() and "\n" not in f[key], f
    for secret in (SECRET_KEY, PASSWORD):
        assert secret not in result.stdout + result.stderr
    assert not TOKEN_RE.search(result.stdout + result.stderr)
    return report


def test_audit_without_faults_is_the_baseline(sim: Sim) -> None:
    sim.fault(None)
    result = sim.audit("--json")
    report = _check_clean(result)
    found = _findings(report)
    assert result.returncode == 1  # the secrets in user-data
    assert found["user-data-secrets"]["severity"] == "high"
    assert found["imdsv1-disabled"]["severity"] == "info"
    assert found["instance-role"]["title"].startswith("instance role attached")
    assert found["guard-state"]["severity"] == "low"


SCOPES = {
    "everything": None,
    "metadata": ["/latest/meta-data/"],  # instance id, the IMDSv1 probe, the role
    "user-data": ["/latest/user-data"],
}


@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("kind", list(SAYS))
def test_audit_under_fault(sim: Sim, kind: str, scope: str) -> None:
    sim.fault(kind, SCOPES[scope], LATE if kind == "timeout" else None)
    started = time.monotonic()
    result = sim.audit("--json")
    took = time.monotonic() - started
    sim.fault(None)
    report = _check_clean(result)
    found = _findings(report)
    says = SAYS[kind]
    if scope == "everything":
        # Not even a token: one info finding that says why; nothing else is claimed.
        assert found["imds-unreachable"]["severity"] == "info"
        assert says in found["imds-unreachable"]["detail"], found["imds-unreachable"]
        assert "imds-ipv6" in found and found["imds-ipv6"]["severity"] == "info"
        assert not {"imdsv1-enabled", "imdsv1-disabled", "user-data-secrets"} & set(found)
        assert result.returncode == 3  # unknown: nothing about IMDS was checked
    elif scope == "metadata":
        assert found["imdsv1-unknown"]["severity"] == "low"
        assert says in found["imdsv1-unknown"]["detail"], found["imdsv1-unknown"]
        role = found["instance-role"]
        assert role["title"] == "could not tell whether an instance role is attached", role
        assert says in role["detail"], role
        assert report["instance_id"] == "<instance-id>"
        assert found["user-data-secrets"]["severity"] == "high"  # still read and scanned
        assert result.returncode == 1
    else:
        unreadable = found["user-data-unreadable"]
        assert unreadable["severity"] == "low" and says in unreadable["detail"], unreadable
        assert "user-data-secrets" not in found  # neither "found" nor "none found"
        assert found["imdsv1-disabled"]["severity"] == "info"
        assert report["unchecked"] and result.returncode == 3  # user-data: not checked
    # Each failed request costs at most the client's timeout: no retry storms, no hang.
    assert took < scaled(20), took
    if kind != "timeout":  # the text report too: no traceback, no secret, same verdict
        sim.fault(kind, SCOPES[scope])
        text = sim.audit()
        sim.fault(None)
        assert text.returncode == result.returncode and _own_stderr(text) == "", text.stderr
        assert says in text.stdout
        assert SECRET_KEY not in text.stdout and PASSWORD not in text.stdout


def test_audit_renews_a_token_revoked_mid_run(sim: Sim) -> None:
    """The token is revoked while the audit waits for the role: one 401, a new token, done."""
    sim.fault(None, ["/latest/meta-data/iam/"], delay=1.5)
    seen = len(sim.records())
    proc = sim.topo.popen(
        sim.topo.host,
        sim.audit_argv("--json"),
        env=sim.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The IMDSv1 probe is answered just before the (delayed) role request goes out.
        wait_for(
            lambda: any(r["path"] == "/latest/meta-data/" for r in sim.records()[seen:]),
            15,
            "the audit's IMDSv1 probe",
            proc,
        )
        sim.fault("expire-tokens")
        out, err = proc.communicate(timeout=scaled(30))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sim.fault(None)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    report = _check_clean(result)
    found = _findings(report)
    assert found["instance-role"]["title"].startswith("instance role attached")
    assert found["user-data-secrets"]["severity"] == "high"
    mine = [r for r in sim.records()[seen:] if r["client"] == "192.0.2.1"]
    refused = [i for i, r in enumerate(mine) if r["status"] == 401 and r["token"]]
    assert refused, mine
    # Right after the 401: a new token, then the same request again, answered.
    after = mine[refused[0] + 1 : refused[0] + 3]
    assert [r["path"] for r in after] == [TOKEN_PATH, mine[refused[0]]["path"]], mine
    assert after[1]["status"] == 200, mine


# -- the broker, nothing cached yet


@pytest.fixture
def broker_env(workdir: str, test_users: dict[str, User]) -> Iterator[Env]:
    """test_broker.py's set-up: tokens required, a control file, the daemon's own broker."""
    yield from _broker_env(workdir, "iptables", test_users)


#: (fault, paths, delay, what the error says). The token-path timeout comes before any
#: step that lets a token through: the broker's client caches its token for hours.
BROKER_STEPS: list[tuple[str, list[str] | None, float | None, str]] = [
    ("500", None, None, "HTTP 500"),
    ("timeout", [TOKEN_PATH], LATE, "no answer within 2s"),
    ("reset", None, None, "connection reset"),
    ("truncate", [CREDENTIALS_PATH + "imdsguard-demo-role"], None, "cut short"),
    ("500", [CREDENTIALS_PATH], None, f"GET {CREDENTIALS_PATH} answered HTTP 500"),
]


def _fault(env: Env, kind: str | None, paths: list[str] | None, delay: float | None) -> None:
    tmp = env.control + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"fault": kind, "paths": paths, "delay": delay}, fh)
    os.replace(tmp, env.control)


def test_broker_started_while_imds_fails(broker_env: Env, test_users: dict[str, User]) -> None:
    env = broker_env
    app = test_users["imdsg-app"]
    assert env.daemon.stop() == 0
    _fault(env, "500", None, None)
    env.daemon.start()  # a new broker: nothing cached, and IMDS failing
    assert env.daemon.proc is not None
    wait_for(lambda: os.path.exists(env.socket), 10, "the broker socket", env.daemon.proc)
    outputs = ""
    for kind, paths, delay, says in BROKER_STEPS:
        _fault(env, kind, paths, delay)
        # Each refused request waits up to request_wait (3 s) for a fetch it triggers;
        # a fetch already under way may still report the previous fault: ask again.
        lines = []
        for _ in range(4):
            result = env.credentials(app)
            outputs += result.stdout + result.stderr
            assert result.returncode == 1 and result.stdout == "", result
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
            assert result.stderr.startswith(
                "imdsguard: the broker cannot serve credentials: no unexpired credentials to "
                "serve: "
            ), result.stderr
            lines.append(result.stderr.strip())
            if says in result.stderr:
                break
        assert says in lines[-1], (kind, paths, lines)
        health = env.health()
        assert health["http_status"] == 503 and health["status"] == "unavailable", health
        assert says in health["last_error"], health
        assert env.daemon.proc.poll() is None
    wait_for(lambda: _published_unhealthy(env), 10, "the daemon to publish the broker's state")
    status = env.daemon.cli("status", "--json")
    doc = json.loads(status.stdout)
    assert status.returncode == 1 and doc["state"] == "degraded", doc
    assert doc["broker"]["healthy"] is False
    assert any(r.startswith("broker is not healthy") for r in doc["reasons"]), doc["reasons"]

    _fault(env, None, None, None)
    result = env.credentials(app)  # triggers a fetch at once and waits for it
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)
    assert served["Version"] == 1
    wait_for(lambda: env.health()["status"] == "ok", 10, "the broker's health to recover")
    assert env.daemon.proc.poll() is None
    logs = env.daemon.logs()
    assert not [
        e for e in logs if e.get("event") in ("broker_loop_error", "broker_refresher_error")
    ]
    failures = [e for e in logs if e.get("event") == "credentials_refresh_failed"]
    assert failures and all("\n" not in e["error"] for e in failures)
    everything = outputs + status.stdout + status.stderr + env.all_log_text()
    for secret in (served["SecretAccessKey"], served["SessionToken"]):
        assert secret not in everything
        assert secret[:16] not in everything
    assert not TOKEN_RE.search(everything)


def _published_unhealthy(env: Env) -> bool:
    path = os.path.join(env.daemon.env["IMDSGUARD_RUN_DIR"], "state.json")
    try:
        with open(path) as fh:
            broker = json.load(fh)["components"]["broker"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(broker.get("status") == "unavailable")
