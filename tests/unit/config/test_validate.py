"""imdsguard.config: defaults, every key, one-line errors with file, key and line, trust."""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import re
import stat
from pathlib import Path

import pytest
import yaml

from imdsguard import cgroups, config
from imdsguard.config import (
    LIMIT_RANGES,
    BrokerLimits,
    Config,
    Principal,
    check_trust,
    load_config,
    model,
    parse_config,
)
from imdsguard.domain import Action, BackendName, Containers, LogFormat, Mode
from imdsguard.errors import ConfigError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="trust checks only apply as root")


@pytest.fixture
def unified(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a host whose /sys/fs/cgroup is cgroup v2 (this test VM mounts a hybrid tree)."""
    monkeypatch.setattr(cgroups, "unified_problem", lambda: None)


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "cfg.yaml")
    assert info.value.exit_code == 2
    return info.value


def _unused_id(taken: set[int]) -> int:
    return next(i for i in range(4242, 1 << 31) if i not in taken)


def _other_user() -> pwd.struct_passwd:
    """A local user other than root (every system has a few: daemon, nobody...)."""
    return min((p for p in pwd.getpwall() if p.pw_uid != 0), key=lambda p: p.pw_uid)


def _other_group() -> grp.struct_group:
    return min((g for g in grp.getgrall() if g.gr_gid != 0), key=lambda g: g.gr_gid)


# --- defaults -----------------------------------------------------------------------


def _assert_defaults(cfg: Config) -> None:
    assert cfg.mode == "enforce"
    assert cfg.action == "reject"
    assert cfg.endpoints == (
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
    )
    assert cfg.backend == "auto"
    assert cfg.allow.users == (Principal("root", 0),)
    assert cfg.allow.groups == ()
    assert cfg.containers == "deny"
    assert not cfg.broker.enabled
    assert cfg.broker.socket == "/run/imdsguard/broker.sock"
    assert cfg.broker.clients.users == cfg.broker.clients.groups == ()
    assert cfg.broker.clients.exes == ()
    assert cfg.imds_url == "http://169.254.169.254"
    assert cfg.log_format == "json"
    assert cfg.metrics.textfile is None
    assert cfg.metrics.listen is None


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "---\n# mode: audit\n"])
def test_empty_file_gives_defaults(text: str) -> None:
    cfg = parse_config(text, "cfg.yaml")
    _assert_defaults(cfg)
    assert cfg.path == "cfg.yaml"


def test_missing_default_file_gives_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(tmp_path / "config.yaml")
    monkeypatch.setattr(config, "DEFAULT_PATH", missing)
    cfg = load_config()
    _assert_defaults(cfg)
    assert cfg.path == missing


def test_empty_sections_give_defaults() -> None:
    text = "firewall:\nallow:\nbroker:\n  clients:\nimds:\nlogging:\nmetrics:\n"
    _assert_defaults(parse_config(text, "cfg.yaml"))


def test_defaults_to_dict() -> None:
    assert Config().to_dict() == {
        "mode": "enforce",
        "action": "reject",
        "endpoints": ["169.254.169.254", "fd00:ec2::254"],
        "firewall": {"backend": "auto"},
        "allow": {"users": ["root (0)"], "groups": [], "units": []},
        "containers": "deny",
        "broker": {
            "enabled": False,
            "socket": "/run/imdsguard/broker.sock",
            "clients": {"users": [], "groups": [], "exes": [], "units": []},
            "limits": {
                "max_connections": 512,
                "max_per_uid": 64,
                "read_timeout": 3.0,
                "write_timeout": 5.0,
                "max_waiting": 256,
                "max_header_bytes": 8192,
            },
        },
        "imds": {"url": "http://169.254.169.254"},
        "logging": {"format": "json"},
        "metrics": {"textfile": None, "listen": None},
    }


SHIPPED = Path(__file__).resolve().parents[3] / "packaging" / "config.yaml"


def _uncommented(text: str) -> str:
    """The shipped file with its commented-out settings switched on.

    A setting starts with ``#`` and a key (``#broker:``) and goes on with
    ``#  `` lines right after it; prose (``# ...``) and the examples inside
    it stay comments.
    """
    out, in_setting = [], False
    for line in text.splitlines():
        in_setting = bool(re.match(r"#[a-z]", line) or (in_setting and line.startswith("#  ")))
        out.append(line[1:] if in_setting else line)
    return "\n".join(out) + "\n"


def _shape(doc: object) -> object:
    return {k: _shape(v) for k, v in doc.items()} if isinstance(doc, dict) else None


def test_shipped_config_documents_every_key_with_its_default() -> None:
    text = SHIPPED.read_text()
    assert parse_config(text, str(SHIPPED)).to_dict() == Config().to_dict()  # all comments
    switched_on = _uncommented(text)
    # Every key of the file's shape is there (broker.limits included) ...
    assert _shape(yaml.safe_load(switched_on)) == _shape(Config().to_dict())
    # ... with the value it has when left out.
    assert parse_config(switched_on, str(SHIPPED)).to_dict() == Config().to_dict()


# --- every key ----------------------------------------------------------------------


FULL = """\
mode: audit
action: drop
endpoints: ["169.254.169.254", "fd00:ec2::254", "169.254.170.2", "169.254.169.254"]
firewall:
  backend: nftables
allow:
  users: [root, 4242]
  groups: [0, 4343]
  units: [amazon-ssm-agent.service, foo@bar.service, amazon-ssm-agent.service]
containers: allow
broker:
  enabled: true
  socket: /run/imdsguard//other.sock
  clients:
    users: [4242]
    groups: [root]
    exes: [/usr/bin/aws, /opt/app/../bin/app]
    units: [app.service]
  limits:
    max_connections: 100
    max_per_uid: 100
    read_timeout: 1
    write_timeout: 0.5
    max_waiting: 10
    max_header_bytes: 4096
imds:
  url: http://127.0.0.1:8080/
logging:
  format: console
metrics:
  textfile: /var/lib/node_exporter/imdsguard.prom
  listen: "[::1]:9721"
"""


def test_every_key_accepted(unified: None) -> None:
    cfg = parse_config(FULL, "cfg.yaml")
    assert cfg.mode == "audit"
    assert cfg.action == "drop"
    assert [str(e) for e in cfg.endpoints] == ["169.254.169.254", "fd00:ec2::254", "169.254.170.2"]
    assert cfg.backend == "nftables"
    assert [p.id for p in cfg.allow.users] == [0, 4242]
    assert [p.id for p in cfg.allow.groups] == [0, 4343]
    assert cfg.allow.units == ("amazon-ssm-agent.service", "foo@bar.service")
    assert cfg.containers == "allow"
    assert cfg.broker.enabled
    assert cfg.broker.socket == "/run/imdsguard/other.sock"
    assert [p.id for p in cfg.broker.clients.users] == [4242]
    assert cfg.broker.clients.groups == (Principal("root", 0),)
    assert cfg.broker.clients.exes == ("/usr/bin/aws", "/opt/bin/app")
    assert cfg.broker.clients.units == ("app.service",)
    assert cfg.broker.limits == BrokerLimits(100, 100, 1.0, 0.5, 10, 4096)
    assert cfg.imds_url == "http://127.0.0.1:8080"
    assert cfg.log_format == "console"
    assert cfg.metrics.textfile == "/var/lib/node_exporter/imdsguard.prom"
    assert cfg.metrics.listen == ("::1", 9721)


def test_every_key_to_dict(unified: None) -> None:
    assert parse_config(FULL, "cfg.yaml").to_dict() == {
        "mode": "audit",
        "action": "drop",
        "endpoints": ["169.254.169.254", "fd00:ec2::254", "169.254.170.2"],
        "firewall": {"backend": "nftables"},
        "allow": {
            "users": ["root (0)", "4242"],
            "groups": ["root (0)", "4343"],
            "units": ["amazon-ssm-agent.service", "foo@bar.service"],
        },
        "containers": "allow",
        "broker": {
            "enabled": True,
            "socket": "/run/imdsguard/other.sock",
            "clients": {
                "users": ["4242"],
                "groups": ["root (0)"],
                "exes": ["/usr/bin/aws", "/opt/bin/app"],
                "units": ["app.service"],
            },
            "limits": {
                "max_connections": 100,
                "max_per_uid": 100,
                "read_timeout": 1.0,
                "write_timeout": 0.5,
                "max_waiting": 10,
                "max_header_bytes": 4096,
            },
        },
        "imds": {"url": "http://127.0.0.1:8080"},
        "logging": {"format": "console"},
        "metrics": {"textfile": "/var/lib/node_exporter/imdsguard.prom", "listen": "[::1]:9721"},
    }


def _leaves(instance: object, prefix: str = "") -> dict[str, object]:
    """Every leaf field of a model dataclass (dotted) and its value."""
    result: dict[str, object] = {}
    for f in dataclasses.fields(instance):  # type: ignore[arg-type]
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            result.update(_leaves(value, f"{prefix}{f.name}."))
        else:
            result[prefix + f.name] = value
    return result


def _dotted(doc: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(doc, dict):
        return {prefix: doc}
    result: dict[str, object] = {}
    for name, value in doc.items():
        result.update(_dotted(value, f"{prefix}{name}" if not prefix else f"{prefix}.{name}"))
    return result


def test_every_model_field_is_a_key_that_is_read_and_shown(unified: None) -> None:
    """A new field without a file key, a validator or a ``to_dict`` entry fails here.

    FULL sets every key to a value other than its default: each field must
    then differ from its default (the validator read it) and show in
    ``to_dict`` under its key, differently from the default's.
    """
    assert {"path", "broker.limits.workers"} == model.NOT_IN_FILE  # add a key, not an exception
    full = FULL + "endpoints_acknowledged: true\n"
    keys = model.file_keys()  # file key -> field
    assert set(_dotted(yaml.safe_load(full))) == set(keys), "FULL must set every key"
    cfg, default = parse_config(full, "cfg.yaml"), Config()
    fields, defaults = _leaves(cfg), _leaves(default)
    shown, shown_default = _dotted(cfg.to_dict()), _dotted(default.to_dict())
    assert set(keys.values()) == set(fields) - model.NOT_IN_FILE
    assert set(shown) == set(keys)
    for key, field in keys.items():
        assert fields[field] != defaults[field], f"{key} is not read into Config.{field}"
        assert shown[key] != shown_default.get(key), f"{key} does not show Config.{field}"
    assert model.section_keys()["broker.limits"] == tuple(LIMIT_RANGES)


def test_choices_are_domain_enums_and_to_dict_is_plain_yaml(unified: None) -> None:
    """Checked once here: past the config, code compares members."""
    cfg = parse_config(FULL, "cfg.yaml")
    assert (cfg.mode, cfg.action, cfg.containers) == (Mode.AUDIT, Action.DROP, Containers.ALLOW)
    assert (cfg.backend, cfg.log_format) == (BackendName.NFTABLES, LogFormat.CONSOLE)
    assert type(Config().mode) is Mode and type(Config().backend) is BackendName
    for doc in (cfg.to_dict(), Config().to_dict()):
        for value in _dotted(doc).values():
            items = value if isinstance(value, list) else [value]
            assert all(type(v) in (str, int, float, bool, type(None)) for v in items), value
        assert yaml.safe_load(yaml.safe_dump(doc)) == doc  # safe_dump refuses an Enum


@pytest.mark.parametrize(
    ("text", "attr", "value"),
    [
        ("mode: enforce", "mode", "enforce"),
        ("mode: audit", "mode", "audit"),
        ("action: reject", "action", "reject"),
        ("action: drop", "action", "drop"),
        ("firewall: {backend: auto}", "backend", "auto"),
        ("firewall: {backend: iptables}", "backend", "iptables"),
        ("firewall: {backend: nftables}", "backend", "nftables"),
        ("containers: deny", "containers", "deny"),
        ("containers: allow", "containers", "allow"),
        ("logging: {format: json}", "log_format", "json"),
        ("logging: {format: console}", "log_format", "console"),
        ("imds: {url: 'http://169.254.169.254'}", "imds_url", "http://169.254.169.254"),
        ("imds: {url: 'http://[fd00:ec2::254]'}", "imds_url", "http://[fd00:ec2::254]"),
    ],
)
def test_choice_values(text: str, attr: str, value: str) -> None:
    assert getattr(parse_config(text + "\n", "cfg.yaml"), attr) == value


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9721", ("127.0.0.1", 9721)),
        ("127.0.0.2:65535", ("127.0.0.2", 65535)),
        ("'[::1]:1'", ("::1", 1)),
    ],
)
def test_metrics_listen(listen: str, expected: tuple[str, int]) -> None:
    cfg = parse_config(f"metrics:\n  listen: {listen}\n", "cfg.yaml")
    assert cfg.metrics.listen == expected


def test_ipv6_only_endpoint() -> None:
    cfg = parse_config("endpoints: ['fd00:ec2::254']\nendpoints_acknowledged: true\n", "cfg.yaml")
    assert cfg.endpoints == (ipaddress.ip_address("fd00:ec2::254"),)


# --- users and groups ----------------------------------------------------------------


def test_users_and_groups_by_name() -> None:
    user, group = _other_user(), _other_group()
    cfg = parse_config(
        f"allow:\n  users: [root, {user.pw_name}]\n  groups: [root, {group.gr_name}]\n",
        "cfg.yaml",
    )
    assert cfg.allow.users == (Principal("root", 0), Principal(user.pw_name, user.pw_uid))
    assert cfg.allow.groups == (Principal("root", 0), Principal(group.gr_name, group.gr_gid))


def test_numeric_ids_are_looked_up_when_they_exist() -> None:
    user, group = _other_user(), _other_group()
    cfg = parse_config(
        f"allow:\n  users: [{user.pw_uid}]\n  groups: ['{group.gr_gid}']\n", "cfg.yaml"
    )
    assert cfg.allow.users == (Principal(user.pw_name, user.pw_uid),)
    assert cfg.allow.groups == (Principal(group.gr_name, group.gr_gid),)


def test_numeric_ids_need_not_exist() -> None:
    uid = _unused_id({p.pw_uid for p in pwd.getpwall()})
    gid = _unused_id({g.gr_gid for g in grp.getgrall()})
    cfg = parse_config(
        f"allow:\n  users: [{uid}]\n  groups: [{gid}]\n"
        f"broker:\n  clients: {{users: [{uid}], groups: [{gid}]}}\n",
        "cfg.yaml",
    )
    assert cfg.allow.users == (Principal(str(uid), uid),)
    assert cfg.allow.groups == (Principal(str(gid), gid),)
    assert cfg.broker.clients.users == cfg.allow.users
    assert cfg.broker.clients.groups == cfg.allow.groups
    assert cfg.to_dict()["allow"]["users"] == [str(uid)]


def test_duplicates_are_dropped_by_id() -> None:
    cfg = parse_config(
        "allow:\n  users: [root, 0, '0', 4242, 4242]\n  groups: [root, 0, 17, 17]\n", "cfg.yaml"
    )
    assert [p.id for p in cfg.allow.users] == [0, 4242]
    assert cfg.allow.users[0] == Principal("root", 0)
    assert [p.id for p in cfg.allow.groups] == [0, 17]


def test_empty_user_list_allows_nobody_not_even_root() -> None:
    cfg = parse_config("allow: {users: []}\n", "cfg.yaml")
    assert cfg.allow.users == ()
    assert cfg.to_dict()["allow"]["users"] == []


def test_groups_alone_keep_root_allowed() -> None:
    cfg = parse_config("allow: {groups: [4242]}\n", "cfg.yaml")
    assert cfg.allow.users == (Principal("root", 0),)


@pytest.mark.parametrize("name", ["\u00b2", "\u0663", "a\\0b"])
def test_odd_names_are_unknown_users_not_crashes(name: str) -> None:
    # "²" passes str.isdigit() but not int(); a NUL makes getpwnam raise ValueError.
    err = _error(f'allow:\n  users: ["{name}"]\n  groups: ["{name}"]\n')
    assert str(err).startswith("cfg.yaml:2: allow.users[0]: unknown user ")


# --- errors -------------------------------------------------------------------------

UNKNOWN_USER = "mode: audit\nallow:\n  users:\n    - root\n    - nosuchuser\n"

ERRORS = [
    # (text, line, dotted key, part of the message)
    ("mode: enforce\nbogus: 1\n", 2, "bogus", "unknown key (expected one of: mode, action"),
    ("allow:\n  users: [root]\n  others: [1]\n", 3, "allow.others", "unknown key"),
    (
        "broker:\n  enabled: true\n  clients:\n    users: [root]\n    pids: [1]\n",
        5,
        "broker.clients.pids",
        "unknown key (expected one of: users, groups, exes, units)",
    ),
    ("firewall:\n  backend: auto\n  table: x\n", 3, "firewall.table", "unknown key"),
    ("imds:\n  host: x\n", 2, "imds.host", "unknown key"),
    ("logging:\n  level: debug\n", 2, "logging.level", "unknown key"),
    ("metrics:\n  port: 1\n", 2, "metrics.port", "unknown key"),
    # wrong types
    ("mode: enforce\nallow: [root]\n", 2, "allow", "must be a mapping with keys users, groups"),
    ("broker: true\n", 1, "broker", "must be a mapping"),
    ("broker:\n  clients: [root]\n", 2, "broker.clients", "must be a mapping"),
    ("allow:\n  users: root\n", 2, "allow.users", "must be a list of user names"),
    ("allow:\n  groups: 7\n", 2, "allow.groups", "must be a list of group names"),
    ("endpoints: 169.254.169.254\n", 1, "endpoints", "must be a list of IP addresses"),
    ("broker:\n  clients:\n    exes: /usr/bin/aws\n", 3, "broker.clients.exes", "must be a list"),
    ("allow:\n  users:\n    - root\n    - {a: 1}\n", 4, "allow.users[1]", "must be a user"),
    ("allow:\n  users: [1.5]\n", 2, "allow.users[0]", "must be a user name or numeric id"),
    ("allow:\n  groups: [true]\n", 2, "allow.groups[0]", "must be a group name or numeric id"),
    ("broker:\n  enabled: maybe\n", 2, "broker.enabled", "must be true or false, got 'maybe'"),
    ("broker:\n  enabled: 1\n", 2, "broker.enabled", "must be true or false"),
    # broker.limits
    ("broker:\n  limits:\n    backlog: 5\n", 3, "broker.limits.backlog", "unknown key"),
    ("broker:\n  limits: 5\n", 2, "broker.limits", "must be a mapping"),
    (
        "broker:\n  limits:\n    max_connections: 0\n",
        3,
        "broker.limits.max_connections",
        "must be a whole number from 1 to 65536, got 0",
    ),
    ("broker:\n  limits: {max_per_uid: 2.5}\n", 2, "broker.limits.max_per_uid", "whole number"),
    ("broker:\n  limits: {max_waiting: true}\n", 2, "broker.limits.max_waiting", "whole number"),
    (
        "broker:\n  limits:\n    read_timeout: '3s'\n",
        3,
        "broker.limits.read_timeout",
        "must be a number of seconds from 0.05 to 300, got '3s'",
    ),
    ("broker:\n  limits: {write_timeout: 0}\n", 2, "broker.limits.write_timeout", "seconds"),
    ("broker:\n  limits: {max_header_bytes: 100}\n", 2, "broker.limits.max_header_bytes", "256"),
    (
        "broker:\n  limits:\n    max_connections: 10\n    max_per_uid: 20\n",
        4,
        "broker.limits.max_per_uid",
        "must not exceed broker.limits.max_connections (10), got 20",
    ),
    # bad choices
    ("\nmode: block\n", 2, "mode", "must be one of enforce | audit, got 'block'"),
    ("mode: 1\n", 1, "mode", "must be one of enforce | audit, got 1"),
    ("mode: [audit]\n", 1, "mode", "must be one of enforce | audit"),
    ("mode: audit\naction: accept\n", 2, "action", "must be one of reject | drop"),
    ("firewall:\n  backend: pf\n", 2, "firewall.backend", "auto | iptables | nftables"),
    ("containers: block\n", 1, "containers", "must be one of deny | allow"),
    ("logging:\n  format: xml\n", 2, "logging.format", "must be one of json | console"),
    # users and groups
    (UNKNOWN_USER, 5, "allow.users[1]", "unknown user 'nosuchuser': create it first"),
    ("allow:\n  groups: [root, nosuchgroup]\n", 2, "allow.groups[1]", "unknown group 'nosuchgr"),
    (
        "broker:\n  clients:\n    users: [nosuchuser]\n",
        3,
        "broker.clients.users[0]",
        "unknown user",
    ),
    ("broker:\n  clients:\n    groups: [nosuchgroup]\n", 3, "broker.clients.groups[0]", "group"),
    ("allow:\n  users: [-1]\n", 2, "allow.users[0]", "unknown user '-1'"),
    ("allow:\n  users: [4294967295]\n", 2, "allow.users[0]", "user id 4294967295 is out of range"),
    # endpoints
    (
        "endpoints:\n  - 169.254.169.254\n  - 169.254.169.300\n",
        3,
        "endpoints[1]",
        "'169.254.169.300' is not an IPv4 or IPv6 address",
    ),
    ("endpoints: [imds.local]\n", 1, "endpoints[0]", "is not an IPv4 or IPv6 address"),
    ("endpoints: [224.0.0.1]\n", 1, "endpoints[0]", "224.0.0.1 cannot be an IMDS endpoint"),
    ("endpoints: ['::']\n", 1, "endpoints[0]", "cannot be an IMDS endpoint"),
    ("mode: audit\nendpoints: []\n", 2, "endpoints", "must name at least one IMDS address"),
    # paths
    ("broker:\n  socket: run/broker.sock\n", 2, "broker.socket", "must be an absolute path"),
    (
        "broker:\n  clients:\n    exes:\n      - /usr/bin/aws\n      - bin/app\n",
        5,
        "broker.clients.exes[1]",
        "must be an absolute path, got 'bin/app'",
    ),
    ("metrics:\n  textfile: imdsguard.prom\n", 2, "metrics.textfile", "absolute path"),
    # imds.url
    ("imds:\n  url: https://169.254.169.254\n", 2, "imds.url", "must be http://HOST[:PORT]"),
    ("imds:\n  url: http://169.254.169.254/latest\n", 2, "imds.url", "http://HOST[:PORT]"),
    ("imds:\n  url: http://169.254.169.254:99999\n", 2, "imds.url", "http://HOST[:PORT]"),
    ("imds:\n  url: 169.254.169.254\n", 2, "imds.url", "http://HOST[:PORT]"),
    ("imds:\n  url: 5\n", 2, "imds.url", "must be a URL like http://169.254.169.254"),
    # metrics.listen
    ("metrics:\n  listen: localhost:9721\n", 2, "metrics.listen", "must be ADDRESS:PORT"),
    ("metrics:\n  listen: 127.0.0.1\n", 2, "metrics.listen", "must be ADDRESS:PORT"),
    ("metrics:\n  listen: 127.0.0.1:0\n", 2, "metrics.listen", "must be ADDRESS:PORT"),
    ("metrics:\n  listen: 127.0.0.1:65536\n", 2, "metrics.listen", "must be ADDRESS:PORT"),
    ("metrics:\n  listen: 9721\n", 2, "metrics.listen", "must be ADDRESS:PORT"),
    # every local user can reach the endpoint: it must not face the network too
    ("metrics:\n  listen: 0.0.0.0:9721\n", 2, "metrics.listen", "must be a loopback address"),
    ("metrics:\n  listen: '[::]:9721'\n", 2, "metrics.listen", "must be a loopback address"),
    ("metrics:\n  listen: 10.0.0.5:9721\n", 2, "metrics.listen", "must be a loopback address"),
    # duplicate keys
    ("mode: audit\naction: drop\nmode: enforce\n", 3, "mode", "duplicate key"),
    ("allow:\n  users: [root]\n  users: [0]\n", 3, "allow.users", "duplicate key"),
]


@pytest.mark.parametrize(("text", "line", "key", "message"), ERRORS)
def test_error_names_file_key_and_line(text: str, line: int, key: str, message: str) -> None:
    err = _error(text)
    assert (err.path, err.line, err.key) == ("cfg.yaml", line, key)
    prefix = f"cfg.yaml:{line}: {key}: "
    assert str(err).startswith(prefix), str(err)
    assert message in str(err)[len(prefix) :]
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("mode: enforce\nallow:\n  users: [root\naction: drop\n", 4),
        ("mode: enforce\naction: reject\n  bad: indent\n", 3),
        ("mode: enforce\n\tmode: audit\n", 2),
        ("---\nmode: audit\n---\nmode: enforce\n", 3),
    ],
)
def test_invalid_yaml(text: str, line: int) -> None:
    err = _error(text)
    assert str(err).startswith(f"cfg.yaml:{line}: not valid YAML: ")
    assert err.key is None


@pytest.mark.parametrize(
    ("text", "line"),
    [("- mode: audit\n", 1), ("audit\n", 1), ("# header\n\n- mode: audit\n", 3), ("42\n", 1)],
)
def test_top_level_must_be_a_mapping(text: str, line: int) -> None:
    err = _error(text)
    assert str(err) == (
        f"cfg.yaml:{line}: the top level must be a mapping of keys (e.g. 'mode: enforce')"
    )


def test_non_string_key() -> None:
    err = _error("mode: audit\n? [a, b]\n: 1\n")
    assert str(err) == "cfg.yaml:2: keys must be plain strings"


# --- units ----------------------------------------------------------------------------


UNIT_ERRORS = [
    ("allow:\n  units: amazon-ssm-agent.service\n", 2, "allow.units", "must be a list"),
    ("allow:\n  units:\n    - a.service\n    - 5\n", 4, "allow.units[1]", "must be a systemd"),
    ("allow:\n  units: [amazon-ssm-agent]\n", 2, "allow.units[0]", "amazon-ssm-agent.service?"),
    ("allow:\n  units: [foo.timer]\n", 2, "allow.units[0]", "NAME.service, NAME.scope"),
    ("allow:\n  units: [foo@.service]\n", 2, "allow.units[0]", "is a template"),
    ("allow:\n  units: [-.slice]\n", 2, "allow.units[0]", "the root slice"),
    ("allow:\n  units: ['a/b.service']\n", 2, "allow.units[0]", "not a valid systemd unit"),
    ("allow:\n  units: ['../x.service']\n", 2, "allow.units[0]", "not a valid systemd unit"),
    ("allow:\n  units: ['a b.service']\n", 2, "allow.units[0]", "not a valid systemd unit"),
    ("allow:\n  units: ['.service']\n", 2, "allow.units[0]", "not a valid systemd unit"),
    ("allow:\n  units: ['']\n", 2, "allow.units[0]", "must not be empty"),
    (f"allow:\n  units: [{'a' * 250}.service]\n", 2, "allow.units[0]", "longer than 255"),
    # The broker names a client's unit, never a slice: a slice would match nobody.
    ("broker:\n  clients:\n    units: [app.slice]\n", 3, "broker.clients.units[0]", "a slice"),
    (
        'broker:\n  clients:\n    units: [x.service, "y\\n.service"]\n',
        3,
        "broker.clients.units[1]",
        "not a valid systemd unit",
    ),
]


@pytest.mark.parametrize(("text", "line", "key", "message"), UNIT_ERRORS)
def test_unit_names_are_checked(
    unified: None, text: str, line: int, key: str, message: str
) -> None:
    test_error_names_file_key_and_line(text, line, key, message)


def test_units_need_the_unified_hierarchy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On a hybrid host (like this VM) naming units is an error with file, line, key and why."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    )
    real = cgroups.unified_problem
    monkeypatch.setattr(cgroups, "unified_problem", lambda: real(str(mountinfo)))
    err = _error("mode: enforce\nallow:\n  users: []\n  units: [amazon-ssm-agent.service]\n")
    assert (err.line, err.key) == (4, "allow.units")
    assert "hybrid layout" in str(err) and "/sys/fs/cgroup/unified" in str(err)
    assert "systemd.unified_cgroup_hierarchy=1" in str(err)
    err = _error("broker:\n  clients:\n    units: [app.service]\n")
    assert (err.line, err.key) == (3, "broker.clients.units")
    # No units, no requirement: the rest of the config is fine on this host.
    assert parse_config("allow:\n  units: []\n", "cfg.yaml").allow.units == ()


def test_unified_hierarchy_is_recognised(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    assert cgroups.unified_problem(str(mountinfo)) is None
    mountinfo.write_text("30 23 0:26 / /sys/fs/cgroup rw - cgroup cgroup rw,memory\n")
    assert "no cgroup v2 at all" in (cgroups.unified_problem(str(mountinfo)) or "")
    assert "cannot read" in (cgroups.unified_problem(str(tmp_path / "none")) or "")


def test_units_alone_keep_root_allowed(unified: None) -> None:
    """Like groups: leaving users out keeps the default (root); 'users: []' takes it out."""
    cfg = parse_config("allow:\n  units: [a.service]\n", "cfg.yaml")
    assert cfg.allow.users == (Principal("root", 0),)
    cfg = parse_config("allow:\n  users: []\n  units: [a.service]\n", "cfg.yaml")
    assert cfg.allow.users == () and cfg.allow.units == ("a.service",)


# --- load_config --------------------------------------------------------------------


def _write(path: Path, text: str, mode: int = 0o644) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.yaml", "mode: audit\n")
    cfg = load_config(path, trust=False)
    assert (cfg.path, cfg.mode) == (path, "audit")


def test_load_config_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, trust=False)
    assert info.value.exit_code == 2
    assert str(info.value).startswith(f"{path}: file not found")


def test_load_config_reports_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.yaml", UNKNOWN_USER)
    with pytest.raises(ConfigError, match=r"config\.yaml:5: allow\.users\[1\]: unknown user"):
        load_config(path, trust=False)


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"mode: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(path), trust=False)


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path), trust=False)


# --- trust --------------------------------------------------------------------------


@pytest.fixture
def trusted_dir(tmp_path: Path) -> Path:
    """tmp_path, provided every directory above it passes check_trust (root-owned)."""
    for directory in (tmp_path, *tmp_path.parents):
        st = directory.stat()
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
        if st.st_uid != 0 or writable:
            pytest.skip(f"{directory} is not a trusted directory")
    return tmp_path


@needs_root
def test_trusted_file_passes(trusted_dir: Path) -> None:
    path = _write(trusted_dir / "config.yaml", "mode: audit\n")
    check_trust(path)
    assert load_config(path).mode == "audit"


@needs_root
@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620])
def test_writable_file_is_refused(trusted_dir: Path, mode: int) -> None:
    path = _write(trusted_dir / "config.yaml", "mode: audit\n", mode)
    with pytest.raises(ConfigError, match="writable") as info:
        check_trust(path)
    assert info.value.exit_code == 2
    assert str(info.value).startswith(f"{path}: refusing")
    with pytest.raises(ConfigError, match="writable"):
        load_config(path)
    assert load_config(path, trust=False).mode == "audit"


@needs_root
def test_file_owned_by_another_user_is_refused(trusted_dir: Path) -> None:
    path = _write(trusted_dir / "config.yaml", "mode: audit\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by root") as info:
        check_trust(path)
    assert "owner uid 65534" in str(info.value)


@needs_root
def test_symlink_is_judged_by_its_target(trusted_dir: Path) -> None:
    target = _write(trusted_dir / "real.yaml", "mode: audit\n", 0o666)
    link = trusted_dir / "config.yaml"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="writable"):
        check_trust(str(link))


def _trusted_config(trusted_dir: Path) -> str:
    """A root-owned 0644 config in a root-owned 0755 directory."""
    etc = trusted_dir / "etc"
    etc.mkdir(mode=0o755)
    return _write(etc / "config.yaml", "mode: audit\n")


def _open_dir(trusted_dir: Path, name: str = "pub", mode: int = 0o777) -> Path:
    directory = trusted_dir / name
    directory.mkdir()
    directory.chmod(mode)
    return directory


@needs_root
def test_symlink_in_a_writable_directory_is_refused_whatever_it_points_at(
    trusted_dir: Path,
) -> None:
    # Its target is trusted, but anyone can swap the link itself.
    link = _open_dir(trusted_dir) / "config.yaml"
    link.symlink_to(_trusted_config(trusted_dir))
    with pytest.raises(ConfigError, match="writable by others") as info:
        check_trust(str(link))
    assert str(info.value).startswith(f"{link}: refusing a config")
    assert f"directory {link.parent} (on the way to {link})" in str(info.value)
    with pytest.raises(ConfigError, match="refusing"):
        load_config(str(link))


@needs_root
def test_every_symlink_hop_is_checked(trusted_dir: Path) -> None:
    # given (trusted dir) -> hop (open dir) -> file (trusted dir): only the hop is at fault.
    hop = _open_dir(trusted_dir) / "hop.yaml"
    hop.symlink_to(_trusted_config(trusted_dir))
    given = trusted_dir / "config.yaml"
    given.symlink_to(os.path.relpath(hop, trusted_dir))
    with pytest.raises(ConfigError, match=f"directory {hop.parent} "):
        check_trust(str(given))


@needs_root
def test_symlinked_directory_and_dotdot_resolve_like_the_kernel(trusted_dir: Path) -> None:
    real = _trusted_config(trusted_dir)
    deep = _open_dir(trusted_dir, "a", 0o755) / "b"
    deep.mkdir(mode=0o755)
    (trusted_dir / "via").symlink_to(deep)
    # via/.. is a/ (through the link), not trusted_dir/ as a lexical '..' would have it.
    os.symlink(real, trusted_dir / "a" / "config.yaml")
    check_trust(str(trusted_dir / "via" / ".." / "config.yaml"))
    (trusted_dir / "a").chmod(0o777)
    with pytest.raises(ConfigError, match=f"directory {trusted_dir / 'a'} "):
        check_trust(str(trusted_dir / "via" / ".." / "config.yaml"))


@needs_root
def test_symlink_in_a_sticky_directory_must_be_roots(trusted_dir: Path) -> None:
    link = _open_dir(trusted_dir, "tmp", 0o1777) / "config.yaml"
    link.symlink_to(_trusted_config(trusted_dir))
    check_trust(str(link))  # only root (owner of it and of the directory) can swap it
    os.lchown(link, 65534, 65534)
    with pytest.raises(ConfigError, match=f"symlink {link} .*owned by uid 65534"):
        check_trust(str(link))


@needs_root
def test_relative_path_is_checked_from_the_working_directory(
    trusted_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = _open_dir(trusted_dir) / "config.yaml"
    link.symlink_to(_trusted_config(trusted_dir))
    monkeypatch.chdir(link.parent)
    with pytest.raises(ConfigError, match="writable by others"):
        check_trust("config.yaml")


@needs_root
def test_what_is_read_is_what_was_checked(
    trusted_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file opened is the attacker's; by the time of the check the path
    # names a trusted file again. What was opened is refused, not read.
    good = _trusted_config(trusted_dir)
    evil = _write(trusted_dir / "evil.yaml", "mode: audit\naction: drop\n", 0o666)
    link = trusted_dir / "config.yaml"
    link.symlink_to(evil)
    real_check = config.check_trust

    def swap_then_check(*args: object, **kwargs: object) -> None:
        os.unlink(link)
        link.symlink_to(good)
        real_check(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(config, "check_trust", swap_then_check)
    with pytest.raises(ConfigError, match=f"{link}: refusing a config"):
        load_config(str(link))


@needs_root
def test_a_file_swapped_after_opening_is_refused(trusted_dir: Path) -> None:
    path = _trusted_config(trusted_dir)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.replace(_write(trusted_dir / "etc" / "new.yaml", "mode: enforce\n"), path)
        check_trust(path)  # the path alone is fine
        with pytest.raises(ConfigError, match="replaced while it was being checked"):
            check_trust(path, fd)
    finally:
        os.close(fd)


def test_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo, 0o644)
    with pytest.raises(ConfigError, match="cannot read: not a regular file"):
        load_config(str(fifo), trust=False)  # and does not hang waiting for a writer


@needs_root
@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_writable_parent_directory_is_refused(trusted_dir: Path, mode: int) -> None:
    directory = trusted_dir / "etc"
    directory.mkdir()
    path = _write(directory / "config.yaml", "mode: audit\n")
    directory.chmod(mode)
    with pytest.raises(ConfigError, match="writable by others") as info:
        check_trust(path)
    assert f"directory {directory} " in str(info.value)


@needs_root
def test_parent_directory_owned_by_another_user_is_refused(trusted_dir: Path) -> None:
    directory = trusted_dir / "etc"
    directory.mkdir(mode=0o755)
    path = _write(directory / "config.yaml", "mode: audit\n")
    os.chown(directory, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by root"):
        check_trust(path)


@needs_root
def test_sticky_parent_directory_is_accepted(trusted_dir: Path) -> None:
    directory = trusted_dir / "tmp"
    directory.mkdir()
    directory.chmod(0o1777)
    check_trust(_write(directory / "config.yaml", "mode: audit\n"))


def test_trust_is_not_checked_when_not_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "config.yaml", "mode: audit\n", 0o666)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    check_trust(path)
    assert load_config(path).mode == "audit"


def test_endpoints_that_leave_out_imds_are_an_error_unless_acknowledged() -> None:
    """A typo (169.254.169.253) used to be accepted and left IMDS unguarded."""
    with pytest.raises(ConfigError) as info:
        parse_config('endpoints: ["169.254.169.253", "fd00:ec2::254"]\n', "cfg.yaml")
    message = str(info.value)
    assert message.startswith("cfg.yaml:1: endpoints: leaves out 169.254.169.254")
    assert "endpoints_acknowledged: true" in message
    with pytest.raises(ConfigError, match=r"leaves out 169\.254\.169\.254 and fd00:ec2::254"):
        parse_config("endpoints: [169.254.170.2]\n", "cfg.yaml")
    cfg = parse_config("endpoints: [169.254.169.254]\nendpoints_acknowledged: true\n", "cfg.yaml")
    assert [str(e) for e in cfg.endpoints] == ["169.254.169.254"]
    assert cfg.endpoints_acknowledged is True
    assert cfg.to_dict()["endpoints_acknowledged"] is True
    with pytest.raises(ConfigError, match="endpoints_acknowledged: must be true or false"):
        parse_config("endpoints_acknowledged: yes please\n", "cfg.yaml")
    # Both addresses (the default) need no acknowledgement, extra ones neither.
    extra = parse_config('endpoints: ["169.254.169.254", "fd00:ec2::254", "169.254.170.2"]\n', "c")
    assert extra.endpoints_acknowledged is False and "endpoints_acknowledged" not in extra.to_dict()
