"""Real EC2 clients, written elsewhere, against the simulated IMDS and the guard.

The clients are the ones users run, installed from Debian's packages (see the
Makefile's APT_PACKAGES) or the test venv, unmodified:

- cloud-init's EC2 datasource (``cloud-init``): DataSourceEc2.get_data() with
  its own API-version probe, token handling and crawl (clients/cloudinit_ec2.py);
- ``ec2-metadata`` (``amazon-ec2-utils``: bash and curl, no timeouts);
- ``ec2metadata`` (``cloud-guest-utils``: Python, API version 2009-04-04);
- botocore's InstanceMetadataProvider and IMDSRegionProvider, and its whole
  credential chain (clients/botocore_imds.py);
- the AWS CLI (``awscli``): ``aws configure list`` and
  ``aws configure export-credentials``.

Each runs as an allowed user (served, values right), a denied user (refused
fast with ``action: reject``, and the guard logs an event naming that uid and
the client's own executable) and, for the credential consumers, as a broker
client (``credential_process = imdsguard credentials``), on both backends;
then from a container namespace behind HOST's bridge (forwarded traffic) with
``http-put-response-hop-limit`` 1 and 2, ``containers: deny`` and ``allow``.
Everything runs through imdsguard_testing.netns.Topology, which refuses to run
anything outside the namespaces it created.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from imdsguard.errors import ImdsGuardError
from imdsguard_testing.netns import Topology, User, ensure_broker_user, guard_env, wait_for
from tests.integration.conftest import DaemonHandle
from tests.integration.test_broker import _client_recipe, broker_config

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with Debian's cloudinit module
AWS = "/usr/bin/aws"
EC2_METADATA = "/usr/bin/ec2-metadata"
EC2METADATA = "/usr/bin/ec2metadata"
CLIENTS = ("cloud-init", "ec2-metadata", "ec2metadata", "botocore", "aws-cli")
SIM = {
    "instance_id": "i-0123456789abcdef0",
    "region": "us-east-1",
    "zone": "us-east-1a",
    "mac": "0e:12:34:56:78:9a",
    "local_ipv4": "172.31.16.5",
}
# cloud-init waits this long for IMDS (its datasource's max_wait), each try up to
# TIMEOUT. TIMEOUT is longer than MAX_WAIT on purpose: cloud-init 22.4's
# wait_for_url shortens each later try to int(time left) "or None", so a try
# started with less than a second left has no timeout at all, and an
# unanswered token request (hop limit 1 from a container) then waits forever.
# One try longer than max_wait gives up after TIMEOUT instead.
CLOUDINIT_MAX_WAIT = 3
CLOUDINIT_TIMEOUT = 4
# Longest a client may hang on an unanswered token request before the test stops it.
HANG = 4
CLI_HANG = 30


def _missing() -> str | None:
    for path in (AWS, EC2_METADATA, EC2METADATA, "/usr/lib/python3/dist-packages/cloudinit"):
        if not os.path.exists(path):
            return f"{path} is missing: 'make venv' installs the client packages"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@dataclass
class Run:
    """One client run: exit status, output, wall time, and what was parsed from it."""

    rc: int
    stdout: str
    stderr: str
    elapsed: float
    data: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:  # what a failed assertion shows; never a secret (none printed)
        return f"rc={self.rc} {self.elapsed:.2f}s data={self.data} stderr={self.stderr[-800:]!r}"


@dataclass
class Clients:
    """How to run each client in a topology, as a user, from HOST or the container."""

    topo: Topology
    workdir: str
    python: str  # the interpreter for botocore (the venv's, or the system one with a copy)
    env: dict[str, str]  # a clean environment: PATH, HOME, PYTHONPATH when needed
    broker_env: dict[str, str] = field(default_factory=dict)  # plus credential_process config
    drivers: dict[str, str] = field(default_factory=dict)

    def run(
        self, client: str, user: User | None, *, ns: str | None = None, broker: bool = False
    ) -> Run:
        env = self.broker_env if broker else self.env
        if client == "cloud-init":
            argv = [SYSTEM_PYTHON, self.drivers["cloud-init"], "aws"]
            argv += [str(CLOUDINIT_MAX_WAIT), str(CLOUDINIT_TIMEOUT)]
        elif client == "cloud-init-v1":
            argv = [SYSTEM_PYTHON, self.drivers["cloud-init"], "unknown"]
            argv += [str(CLOUDINIT_MAX_WAIT), str(CLOUDINIT_TIMEOUT)]
        elif client == "ec2-metadata":
            argv = [EC2_METADATA]
        elif client == "ec2metadata":
            argv = [EC2METADATA]
        elif client == "botocore":
            argv = [self.python, self.drivers["botocore"]]
        elif client == "aws-cli":
            return self._aws(user, ns, env)
        else:
            raise AssertionError(client)
        # ec2metadata probes with 6 connects 1 s apart before it gives up, and
        # cloud-init waits up to its max_wait: let them.
        hang = {"ec2metadata": 10, "cloud-init": 10, "cloud-init-v1": 10, "botocore": 15}.get(
            client, HANG
        )
        result = self._run(argv, user, ns, env, hang)
        if client.startswith("cloud-init") or client == "botocore":
            with_json(result)
        else:
            result.data = parse_colon_lines(result.stdout)
        return result

    def _run(
        self,
        argv: list[str],
        user: User | None,
        ns: str | None,
        env: dict[str, str],
        hang: float = HANG,
    ) -> Run:
        # timeout(1) signals its whole process group: curl under ec2-metadata too.
        wrapped = ["timeout", "-s", "KILL", str(hang), "env", "-i"]
        wrapped += [f"{k}={v}" for k, v in env.items()]
        start = time.monotonic()
        proc = self.topo.run(ns or self.topo.host, wrapped + argv, user=user, timeout=hang + 30)
        return Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)

    def _aws(self, user: User | None, ns: str | None, env: dict[str, str]) -> Run:
        # The CLI takes seconds just to start on a loaded machine; it has its own timeouts.
        listing = self._run([AWS, "configure", "list"], user, ns, env, CLI_HANG)
        export = self._run(
            [AWS, "configure", "export-credentials", "--format", "process"],
            user,
            ns,
            env,
            CLI_HANG,
        )
        data: dict[str, Any] = {"list": parse_configure_list(listing.stdout)}
        if export.rc == 0:
            doc = json.loads(export.stdout)
            data["access_key"] = doc["AccessKeyId"]
            data["has_secret"] = bool(doc.get("SecretAccessKey") and doc.get("SessionToken"))
        rc = listing.rc or export.rc
        return Run(rc, "", listing.stderr + export.stderr, export.elapsed, data)

    def aws_baseline(self, user: User | None) -> float:
        """Wall time of an AWS CLI run that never asks IMDS (its start-up cost here)."""
        env = {**self.env, "AWS_EC2_METADATA_DISABLED": "true"}
        argv = [AWS, "configure", "export-credentials"]
        return self._run(argv, user, None, env, CLI_HANG).elapsed


def with_json(result: Run) -> None:
    lines = result.stdout.strip().splitlines()
    result.data = json.loads(lines[-1]) if lines else {}


def parse_colon_lines(text: str) -> dict[str, Any]:
    """``name: value`` lines of ec2-metadata / ec2metadata, first value per name."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name and not name.startswith((" ", "\t")):
            out.setdefault(name, value.strip())
    return out


def parse_configure_list(text: str) -> dict[str, tuple[str, str]]:
    """``aws configure list``: name -> (value, type)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("access_key", "secret_key", "region"):
            out[parts[0]] = (parts[1], parts[2])
    return out


def _copy_drivers(workdir: str) -> dict[str, str]:
    """The driver scripts, where test users can read them."""
    dest = os.path.join(workdir, "drivers")
    os.makedirs(dest, exist_ok=True)
    os.chmod(dest, 0o755)  # noqa: S103 - test users read it
    out = {}
    for name, script in (("cloud-init", "cloudinit_ec2.py"), ("botocore", "botocore_imds.py")):
        path = os.path.join(dest, script)
        shutil.copy(os.path.join(HERE, "clients", script), path)
        os.chmod(path, 0o644)
        out[name] = path
    return out


def make_clients(topo: Topology, workdir: str, config_path: str, user: User) -> Clients:
    recipe = _client_recipe(workdir, user, config_path)
    home = os.path.join(workdir, "home")
    os.makedirs(home, exist_ok=True)
    os.chmod(home, 0o777)  # noqa: S103 - every test user writes its CLI cache here
    env = {"PATH": "/usr/bin:/bin", "HOME": home}
    if "PYTHONPATH" in recipe.env:
        env["PYTHONPATH"] = recipe.env["PYTHONPATH"]
    # The broker client's own config: credential_process, nothing disabled.
    broker_env = {k: v for k, v in recipe.env.items() if k != "AWS_EC2_METADATA_DISABLED"}
    broker_env["HOME"] = home
    return Clients(topo, workdir, recipe.python, env, broker_env, _copy_drivers(workdir))


# -- what each client must show when served ---------------------------------------


def assert_served(client: str, run: Run, *, imdsv2: bool = True) -> None:
    """The client got the simulated instance's values, the way it asks for them."""
    assert run.rc == 0, run
    data = run.data
    if client in ("cloud-init", "cloud-init-v1"):
        assert data["found"] is True and data["cloud_init"], run
        # Its preferred version: the API-version probe found 2021-03-23.
        assert data["api_version"] == "2021-03-23", run
        assert data["instance_id"] == SIM["instance_id"]
        assert (data["region"], data["availability_zone"]) == (SIM["region"], SIM["zone"])
        assert data["local_hostname"] == "ip-172-31-16-5"
        assert data["public_keys"] and data["public_keys"][0].startswith("ssh-ed25519 ")
        assert {"network", "placement", "block-device-mapping", "services"} <= set(
            data["meta_data_keys"]
        )
        eth0 = data["network"]["ethernets"]["eth0"]
        assert eth0["match"]["macaddress"] == SIM["mac"] and eth0["dhcp4"] is True
        assert eth0["dhcp6"] is True  # from network/interfaces/macs/<mac>/ipv6s
        assert data["imdsv2"] is (client == "cloud-init")
        if client == "cloud-init":
            doc = data["identity"]  # fetched on AWS only
            assert doc["instanceId"] == SIM["instance_id"] and doc["region"] == SIM["region"]
            assert doc["availabilityZone"] == SIM["zone"] and doc["privateIp"] == SIM["local_ipv4"]
    elif client == "ec2-metadata":
        assert data["instance-id"] == SIM["instance_id"], run
        assert data["placement"] == SIM["zone"]
        assert data["local-ipv4"] == SIM["local_ipv4"]
        # Asked as /latest//meta-data/reservation-id: empty segments must not matter.
        assert data["reservation-id"].startswith("r-"), run
        assert data["ramdisk-id"] == "not available"  # an HVM instance has none
        assert data["public-hostname"].endswith(".compute-1.amazonaws.com")
    elif client == "ec2metadata":
        # API version 2009-04-04, hard-coded: what existed then is there, nothing newer.
        assert data["instance-id"] == SIM["instance_id"], run
        assert data["availability-zone"] == SIM["zone"]
        assert data["local-ipv4"] == SIM["local_ipv4"]
        assert data["instance-action"] == "none"
        assert data["reservation-id"].startswith("r-")
        assert data["public-keys"].startswith("['ssh-ed25519 ")
        assert data["region"] == "unavailable"  # placement/region is from 2020-08-24
        assert data["mac"] == "unavailable"  # from 2011-01-01
    elif client == "botocore":
        assert re.fullmatch(r"ASIA[A-Z0-9]{16}", data["imds_access_key"] or ""), run
        assert data["imds_has_token"] is True
        # IMDSRegionProvider asks placement/availability-zone/ (trailing slash).
        assert data["region"] == SIM["region"], run
        assert data["chain_method"] == "iam-role"
    elif client == "aws-cli":
        listing = data["list"]
        assert listing["access_key"][1] == "iam-role", run
        assert listing["region"] == (SIM["region"], "imds"), run
        assert re.fullmatch(r"ASIA[A-Z0-9]{16}", data["access_key"]) and data["has_secret"]
    else:
        raise AssertionError(client)


def assert_refused(client: str, run: Run, bound: float) -> None:
    """The client failed, and within ``bound`` seconds of its own IMDS work."""
    data = run.data
    if client.startswith("cloud-init"):
        assert data.get("found") is False, run
        assert data["elapsed"] < bound, run
    elif client == "ec2-metadata":
        assert run.rc == 1 and "Could not get IMDSv2 token" in run.stdout, run
        assert run.elapsed < bound, run
    elif client == "ec2metadata":
        assert run.rc != 0 and "could not establish connection" in run.stderr, run
        assert run.elapsed < bound, run
    elif client == "botocore":
        assert run.rc == 0, run  # the SDK itself does not crash ...
        assert data["imds_access_key"] is None and data["region"] is None, (
            run
        )  # ... it gets nothing
        assert data["imds_seconds"] < bound and data["region_seconds"] < bound, run
        assert data["chain_method"] is None
    elif client == "aws-cli":
        assert run.rc != 0 and "access_key" not in data, run
        assert data["list"].get("access_key", ("<not", ""))[0] == "<not", run
        assert run.elapsed < bound, run
    else:
        raise AssertionError(client)


# Each denied client's own process, as the event must name it: (exe, comm, cmdline piece).
def expected_process(client: str, clients: Clients) -> tuple[str, str, str]:
    python = os.path.realpath(SYSTEM_PYTHON)
    return {
        "cloud-init": (python, "python3", clients.drivers["cloud-init"]),
        "ec2-metadata": ("/usr/bin/curl", "curl", "latest/api/token"),
        "ec2metadata": (python, "ec2metadata", EC2METADATA),
        "botocore": (os.path.realpath(clients.python), "", clients.drivers["botocore"]),
        "aws-cli": (python, "aws", AWS),
    }[client]


# Seconds a refused client may take with action: reject. The SDKs give up on the
# first refused connection; cloud-init keeps trying for its max_wait; ec2metadata
# tries to connect 6 times, 1 s apart, by design.
REJECT_BOUND = {
    "cloud-init": CLOUDINIT_MAX_WAIT + 1.5,
    "cloud-init-v1": CLOUDINIT_MAX_WAIT + 1.5,
    "ec2-metadata": 1.0,
    "ec2metadata": 8.0,
    "botocore": 0.5,
}


# -- the guard --------------------------------------------------------------------


@dataclass
class Guarded:
    """Simulated IMDS in VPC, the daemon in HOST, and the clients."""

    topo: Topology
    daemon: DaemonHandle
    clients: Clients
    request_log: str
    container: str | None = None
    containers: str = "deny"  # the guard's containers: setting
    hop_limit: int = 1  # the simulated IMDS's http-put-response-hop-limit

    def records(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.request_log):  # nothing reached IMDS yet
            return []
        with open(self.request_log) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def blocked_events(self) -> list[dict[str, Any]]:
        return [e for e in self.daemon.logs() if e.get("event") == "imds_access_blocked"]


def guarded(
    workdir: str,
    backend: str,
    config: str,
    *imds_args: str,
    container: bool = False,
) -> Iterator[Guarded]:
    request_log = os.path.join(workdir, "imds-requests.log")
    with Topology() as topo:
        ctr = topo.add_container() if container else None
        topo.start_imds(workdir, "--request-log", request_log, *imds_args)
        ensure_broker_user()
        env = guard_env(workdir)
        for key in ("run", "state", "log"):
            os.makedirs(env[f"IMDSGUARD_{key.upper()}_DIR"], exist_ok=True)
        daemon = DaemonHandle(topo, workdir, os.path.join(workdir, "config.yaml"), env, backend)
        daemon.write_config(config)
        app = pwd.getpwnam("imdsg-app")
        clients = make_clients(topo, workdir, daemon.config_path, User(app.pw_uid, app.pw_gid))
        daemon.start()
        try:
            yield Guarded(topo, daemon, clients, request_log, ctr)
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()


@pytest.fixture
def host_guard(workdir: str, backend: str, test_users: dict[str, User]) -> Iterator[Guarded]:
    """imdsg-app allowed; imdsg-readers (imdsg-member) a broker client only; reject."""
    sock = os.path.join(workdir, "run", "broker.sock")
    config = "action: reject\nallow:\n  users: [imdsg-app]\n" + broker_config(sock)
    for setup in guarded(workdir, backend, config):
        wait_for(lambda: os.path.exists(sock), 10, "the broker socket", setup.daemon.proc)
        yield setup


def wait_event(setup: Guarded, uid: int | None, exe: str, timeout: float = 5) -> dict[str, Any]:
    """The first blocked event for ``uid`` naming ``exe``.

    iptables queues the denied packet and finds its process every time. On
    nftables without nft_queue (this kernel) the NFLOG copy names the uid
    only; the process is found only while it still holds its socket, rarely
    with ``reject`` (see test_events). There an unattributed event of the
    uid is accepted, and its process checked whenever it was found.
    """
    found: list[dict[str, Any]] = []
    queue = setup.daemon.backend == "iptables"

    def seen() -> bool:
        mine = [e for e in setup.blocked_events() if e.get("uid") == uid]
        found[:] = [e for e in mine if e.get("exe") == exe] or (
            [] if queue else [e for e in mine if not e["attributed"]]
        )
        return bool(found)

    try:
        wait_for(seen, timeout, f"a blocked event for uid {uid}, exe {exe}", setup.daemon.proc)
    except ImdsGuardError:
        raise AssertionError(
            f"no event for uid {uid} exe {exe}: {setup.blocked_events()}"
        ) from None
    return found[0]


@pytest.mark.parametrize("client", CLIENTS)
def test_client_allowed_denied_and_through_the_broker(
    host_guard: Guarded, client: str, test_users: dict[str, User]
) -> None:
    setup, clients = host_guard, host_guard.clients
    app, denied, member = (test_users[n] for n in ("imdsg-app", "imdsg-denied", "imdsg-member"))

    served = clients.run(client, app)
    assert_served(client, served)
    if client != "ec2metadata":  # ec2metadata's connectivity probe is a bare connect()
        mine = [r for r in setup.records() if r["method"] == "GET"]
        assert mine and all(r["token"] for r in mine), "every GET carried an IMDSv2 token"

    refused = clients.run(client, denied)
    bound = REJECT_BOUND.get(client)
    if client == "aws-cli":
        bound = clients.aws_baseline(denied) + 1.5  # the CLI's start-up, plus a refusal
    assert bound is not None
    assert_refused(client, refused, bound)
    exe, comm, piece = expected_process(client, clients)
    event = wait_event(setup, denied.uid, exe)
    assert event["user"] == "imdsg-denied" and event["gid"] == denied.gid, event
    if event["attributed"]:
        assert event["exe"] == exe, event
        if comm:
            assert event["comm"] == comm, event
        assert any(piece in arg for arg in event["cmdline"]), event
        if client == "ec2-metadata":  # curl's parent is the script the user ran
            assert any(a["comm"] == "ec2-metadata" for a in event["ancestors"]), event

    if client in ("botocore", "aws-cli"):
        # A broker client: direct IMDS is refused, credential_process serves it.
        through = clients.run(client, member, broker=True)
        assert through.rc == 0, through
        if client == "botocore":
            assert through.data["imds_access_key"] is None, through
            assert through.data["chain_method"] == "custom-process", through
            assert re.fullmatch(r"ASIA[A-Z0-9]{16}", through.data["chain_access_key"])
        else:
            assert through.data["list"]["access_key"][1] == "custom-process", through
            assert re.fullmatch(r"ASIA[A-Z0-9]{16}", through.data["access_key"])
            assert through.data["has_secret"]
        if client == "botocore":  # its InstanceMetadataProvider asked IMDS itself
            assert wait_event(setup, member.uid, exe)["user"] == "imdsg-member"


def test_cloud_init_imdsv1_platform_allowed_and_denied(
    host_guard: Guarded, test_users: dict[str, User]
) -> None:
    """cloud-init on a platform it does not identify as AWS speaks IMDSv1 only."""
    clients = host_guard.clients
    assert_served("cloud-init-v1", clients.run("cloud-init-v1", test_users["imdsg-app"]))
    denied = test_users["imdsg-denied"]
    refused = clients.run("cloud-init-v1", denied)
    assert_refused("cloud-init-v1", refused, REJECT_BOUND["cloud-init-v1"])
    wait_event(host_guard, denied.uid, os.path.realpath(SYSTEM_PYTHON))


# -- the containers path ----------------------------------------------------------


@pytest.fixture
def container_guard(
    workdir: str, backend: str, request: pytest.FixtureRequest
) -> Iterator[Guarded]:
    mode, hops = request.param
    config = f"action: reject\ncontainers: {mode}\nallow:\n  users: [root]\n"
    hop_limit = ("--http-put-response-hop-limit", str(hops))
    for setup in guarded(workdir, backend, config, *hop_limit, container=True):
        setup.containers, setup.hop_limit = mode, hops
        assert setup.container is not None
        # A resolver inside the container, as Docker gives one, answering nothing:
        # ip netns exec binds /etc/netns/NS/resolv.conf over /etc/resolv.conf.
        # Without it cloud-init's DNS-redirection probe waits on the host's
        # nameserver, unreachable from here, for 5 s a name.
        etc = f"/etc/netns/{setup.container}"
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "resolv.conf"), "w") as fh:
            fh.write("nameserver 127.0.0.1\n")
        try:
            yield setup
        finally:
            shutil.rmtree(etc, ignore_errors=True)


def _killed(run: Run) -> bool:
    """Still waiting when timeout(1) killed it (the client has no timeout of its own)."""
    return run.rc in (-9, 124, 137) and run.elapsed >= HANG - 0.5


@pytest.mark.parametrize(
    "container_guard",
    [("deny", 1), ("deny", 2), ("allow", 1), ("allow", 2)],
    ids=["deny-hop1", "deny-hop2", "allow-hop1", "allow-hop2"],
    indirect=True,
)
def test_clients_in_a_container_behind_the_bridge(
    container_guard: Guarded, test_users: dict[str, User]
) -> None:
    setup, clients = container_guard, container_guard.clients
    ctr = setup.container
    assert ctr is not None
    mode = setup.containers
    records_before = 0
    for client in (*CLIENTS, "cloud-init-v1"):
        run = clients.run(client, None, ns=ctr)
        new = setup.records()[records_before:]
        records_before += len(new)
        if mode == "deny":
            bound = REJECT_BOUND.get(client) or clients.aws_baseline(None) + 1.5
            assert_refused(client, run, bound)
            assert not new, new  # nothing reached IMDS
            continue
        if setup.hop_limit >= 2:  # one forwarding hop: the token reply arrives
            assert_served(client, run, imdsv2=client != "cloud-init-v1")
            continue
        # Hop limit 1: IMDS answered each token request, HOST's forwarding dropped the
        # answer (TTL exceeded), as on EC2. What each client makes of that:
        puts = [r for r in new if r["method"] == "PUT"]
        if client != "cloud-init-v1":
            assert puts and all(r["status"] == 200 for r in puts), new
        if client == "cloud-init":  # waits for a token for max_wait, then gives up
            assert run.data["found"] is False and run.data["imdsv2"] is False, run
            assert run.data["elapsed"] >= CLOUDINIT_TIMEOUT - 0.5, run
        elif client in ("ec2-metadata", "ec2metadata"):  # no timeout: waits forever
            assert _killed(run), run
        else:  # the SDKs wait 1 s for the token, then fall back to IMDSv1
            assert_served(client, run)
            if client == "botocore":
                assert run.data["imds_seconds"] >= 1.0, run
    if mode == "deny":
        events = setup.blocked_events()
        assert events, "forwarded attempts are logged"
        assert all(e["src"] == "198.51.100.2" and e["iface"] == "docker0" for e in events)
        assert all(e["uid"] is None for e in events), events


# -- the simulator alone: IMDSv2 required, endpoint disabled ------------------------


@pytest.fixture
def bare_imds(workdir: str, request: pytest.FixtureRequest) -> Iterator[Guarded]:
    """The simulated IMDS with ``request.param`` options, no guard; clients as imdsg-app."""
    request_log = os.path.join(workdir, "imds-requests.log")
    with Topology() as topo:
        topo.start_imds(workdir, "--request-log", request_log, *request.param)
        app = pwd.getpwnam("imdsg-app")
        config = os.path.join(workdir, "config.yaml")  # credential_process's; unused here
        clients = make_clients(topo, workdir, config, User(app.pw_uid, app.pw_gid))
        yield Guarded(topo, None, clients, request_log)  # type: ignore[arg-type]


@pytest.mark.parametrize("bare_imds", [("--http-tokens", "required")], indirect=True)
def test_clients_with_imdsv2_required(bare_imds: Guarded, test_users: dict[str, User]) -> None:
    app = test_users["imdsg-app"]
    for client in CLIENTS:
        assert_served(client, bare_imds.clients.run(client, app))
    served = bare_imds.records()
    gets = [r for r in served if r["method"] == "GET"]
    assert gets and all(r["token"] and r["status"] in (200, 404) for r in gets), gets
    # cloud-init on a platform it does not know as AWS asks with IMDSv1 only: 401.
    refused = bare_imds.clients.run("cloud-init-v1", app)
    assert refused.data["found"] is False, refused
    assert {r["status"] for r in bare_imds.records()[len(served) :]} == {401}


@pytest.mark.parametrize("bare_imds", [("--http-endpoint", "disabled")], indirect=True)
def test_clients_with_the_endpoint_disabled(
    bare_imds: Guarded, test_users: dict[str, User]
) -> None:
    app = test_users["imdsg-app"]
    clients = bare_imds.clients
    # cloud-init takes a 403 to its token request as "disabled" and stops at once.
    run = clients.run("cloud-init", app)
    assert run.data["found"] is False and run.data["elapsed"] < 1.0, run
    run = clients.run("ec2-metadata", app)
    assert run.rc == 1 and "Could not get IMDSv2 token" in run.stdout, run
    run = clients.run("ec2metadata", app)
    assert run.rc != 0 and "403" in run.stderr, run
    run = clients.run("botocore", app)
    assert run.data["imds_access_key"] is None and run.data["region"] is None, run
    assert {r["status"] for r in bare_imds.records()} == {403}


# -- action: drop -----------------------------------------------------------------


@pytest.fixture
def drop_guard(workdir: str, backend: str) -> Iterator[Guarded]:
    yield from guarded(workdir, backend, "action: drop\nallow:\n  users: [imdsg-app]\n")


@pytest.mark.parametrize("backend", ["iptables"])
def test_drop_keeps_clients_waiting(drop_guard: Guarded, test_users: dict[str, User]) -> None:
    """What README says next to ``action``: with drop, clients wait out their own timeouts."""
    denied, clients = test_users["imdsg-denied"], drop_guard.clients
    run = clients.run("botocore", denied)
    # Token PUT and IMDSv1 fallback each wait botocore's 1 s timeout.
    assert run.data["imds_access_key"] is None, run
    assert 1.0 <= run.data["imds_seconds"] < 5.0, run
    assert 1.0 <= run.data["region_seconds"] < 5.0, run
    print(
        f"\n[drop] botocore credentials {run.data['imds_seconds']:.2f}s, "
        f"region {run.data['region_seconds']:.2f}s"
    )
    run = clients.run("ec2-metadata", denied)
    assert _killed(run), run  # curl without a timeout: still waiting when stopped
    assert wait_event(drop_guard, denied.uid, "/usr/bin/curl")["attributed"] is True
