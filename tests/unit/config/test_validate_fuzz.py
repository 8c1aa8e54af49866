"""Fuzzing the config loader: every input is a Config or one clean ConfigError line.

Three generators, each bounded by ``max_examples`` so the file stays well
under 20 s: arbitrary text, arbitrary YAML documents (hypothesis builds the
values, ``yaml.safe_dump`` writes them; the schema's own keys get values of
every type), and mutations of a valid config (characters and lines deleted,
duplicated, inserted, re-indented). Hand-picked inputs that once escaped as
other exceptions (alias loops, alias bombs, odd tags, deep nesting) are
pinned down as plain examples.
"""

from __future__ import annotations

import os
import string
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imdsguard.config import Config, parse_config
from imdsguard.errors import ConfigError, ImdsGuardError

PATH = "/etc/imdsguard/fuzz.yaml"
FUZZ = settings(
    # IMDSGUARD_FUZZ_EXAMPLES=20000 for a long hunt; 300 keeps the file near 8 s.
    max_examples=int(os.environ.get("IMDSGUARD_FUZZ_EXAMPLES", "300")),
    deadline=None,  # the first user/group lookups are slow; time is bounded by examples
    suppress_health_check=[HealthCheck.too_slow],
)

VALID = """\
mode: enforce
action: reject
endpoints: ["169.254.169.254", "fd00:ec2::254"]
firewall:
  backend: auto
allow:
  users: [root, 0]
  groups: [root]
containers: deny
broker:
  enabled: false
  socket: /run/imdsguard/broker.sock
  clients: {users: [root], groups: [], exes: [/usr/bin/aws]}
imds:
  url: http://169.254.169.254
logging:
  format: json
metrics:
  textfile: /var/lib/node_exporter/imdsguard.prom
  listen: 127.0.0.1:9721
"""

#: The schema: section -> its keys (None: a leaf at the top level).
SCHEMA: dict[str, Any] = {
    "mode": None,
    "action": None,
    "endpoints": None,
    "firewall": {"backend": None},
    "allow": {"users": None, "groups": None},
    "containers": None,
    "broker": {"enabled": None, "socket": None, "clients": {"users": 0, "groups": 0, "exes": 0}},
    "imds": {"url": None},
    "logging": {"format": None},
    "metrics": {"textfile": None, "listen": None},
}


def check(text: str) -> Config | ConfigError:
    """The property: a Config, or a ConfigError that is one line naming the file."""
    try:
        result = parse_config(text, PATH)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(PATH), message
        assert len(message.splitlines()) == 1, message
        assert message.isprintable(), message
        assert exc.exit_code == 2
        return exc
    except ImdsGuardError as exc:  # pragma: no cover - a failure report, not a path
        pytest.fail(f"{type(exc).__name__} rather than ConfigError: {exc}")
    except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
        pytest.fail(f"{type(exc).__name__} escaped parse_config for {text[:300]!r}: {exc}")
    assert isinstance(result, Config)
    assert result.path == PATH
    return result


# --- arbitrary text -------------------------------------------------------------------

YAML_ISH = st.text(
    alphabet=st.sampled_from(list(":-[]{},#&*!|>'\"%@`?\n\t ") + list("abc019.") + ["\x00"]),
    max_size=80,
)


@FUZZ
@given(st.one_of(st.text(max_size=200), YAML_ISH))
@example("a: &x [*x]")  # an alias inside its own anchor: a loop
@example("mode: !!binary '@@'")
@example("mode: !custom x")
@example("mode: !!int abc")
@example("mode: 2001-13-45")
@example("a: " + "[" * 3000 + "]" * 3000)
@example("\x00")
@example('"a\\nb\\u2028c": 1')
@example("imds: {url: 'http://[abc'}")
@example("imds: {url: 'http://ex\uff03ample'}")
@example('imds: {url: "http://a\\nb"}')
@example("endpoints: ['fe80::1%eth0']")
@example("allow: {users: ['" + "0" * 5000 + "']}")
@example('metrics: {textfile: "/a\\0b"}')
def test_arbitrary_text(text: str) -> None:
    check(text)


# --- arbitrary YAML structures --------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        ["root", "0", "65534", "enforce", "audit", "drop", "169.254.169.254", "fd00:ec2::254",
         "/usr/bin/aws", "relative/path", "127.0.0.1:9721", "[::1]:80", "http://x:99999"]
    ),
)  # fmt: skip
KEYS = st.one_of(st.text(max_size=12), st.sampled_from(sorted(SCHEMA)), st.integers(), st.none())
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _schema_doc(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Documents with the schema's keys (some left out) and values of any type."""
    fields = {
        key: (_schema_doc(sub) | VALUES) if isinstance(sub, dict) else VALUES
        for key, sub in schema.items()
    }
    return st.fixed_dictionaries({}, optional=fields)


@FUZZ
@given(VALUES)
def test_arbitrary_structures(data: Any) -> None:
    check(_dump(data))


@FUZZ
@given(_schema_doc(SCHEMA))
@example({"allow": {"users": [True]}})
@example({"endpoints": []})
@example({"endpoints": [0]})
@example({"metrics": {"listen": 9721}})
@example({"broker": {"clients": {"exes": [None]}}})
def test_valid_keys_with_any_values(data: dict[str, Any]) -> None:
    check(_dump(data))


def test_schema_matches_the_loader() -> None:
    """The generator above knows every key: the valid sample uses each of them."""
    parsed = yaml.safe_load(VALID)
    assert set(parsed) == set(SCHEMA)
    for key, sub in SCHEMA.items():
        if isinstance(sub, dict):
            assert set(parsed[key]) == set(sub), key
    assert isinstance(check(VALID), Config)


# --- mutations of a valid config ------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn) -> str:
    lines = VALID.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "dup", "swap", "indent"]))
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        if kind == "delete":
            a = draw(st.integers(0, len(line)))
            b = draw(st.integers(a, len(line)))
            lines[i] = line[:a] + line[b:]
        elif kind == "insert":
            a = draw(st.integers(0, len(line)))
            junk = draw(st.one_of(st.text(max_size=8), YAML_ISH.map(lambda s: s[:8])))
            lines[i] = line[:a] + junk + line[a:]
        elif kind == "replace":
            a = draw(st.integers(0, max(len(line) - 1, 0)))
            char = draw(st.sampled_from([*string.printable, "\x00", "\u00e9", "\u2028"]))
            lines[i] = line[:a] + char + line[a + 1 :]
        elif kind == "dup":
            lines.insert(i, line)
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = " " * draw(st.integers(0, 5)) + line.lstrip(" ")
    return "".join(lines)


@FUZZ
@given(mutated())
def test_mutations_of_a_valid_config(text: str) -> None:
    check(text)


# --- pinned: inputs that used to escape as other exceptions ---------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a: &x [*x]", "refers to itself"),
        ("a: &x {b: *x}", "refers to itself"),
        ("mode: !custom x", "tag"),
        ("mode: !!int abc", "cannot read"),
        ("allow:\n  users: [!!timestamp 2001-13-45]\n", "cannot read"),
        ("a: " + "[" * 3000 + "]" * 3000, "nested"),
        ("a: " + "[" * 60 + "]" * 60, "nested"),
        ("\x00", "unacceptable character"),
        ('"a\\nb": 1', "unknown key"),
        ("imds: {url: 'http://[abc'}", "imds.url"),
        ('imds: {url: "http://a\\nb"}', "imds.url"),
        ("endpoints: ['fe80::1%eth0']", "scope"),
        ("allow: {users: ['" + "0" * 5000 + "']}", "out of range"),
        ('metrics: {textfile: "/a\\0b"}', "metrics.textfile"),
    ],
    ids=lambda v: repr(v)[:30] if isinstance(v, str) else None,
)
def test_pinned_inputs_are_clean_errors(text: str, words: str) -> None:
    result = check(text)
    assert isinstance(result, ConfigError), result
    assert words in str(result)


def test_alias_bomb_is_refused_quickly() -> None:
    """'Billion laughs': a few lines that expand to millions of values."""
    text = "a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
    for i in range(1, 9):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    result = check(text)
    assert isinstance(result, ConfigError) and "too many" in str(result)


def test_a_large_honest_config_is_fine() -> None:
    users = ", ".join(str(1000 + i) for i in range(5000))
    result = check(f"allow:\n  users: [{users}]\n")
    assert isinstance(result, Config) and len(result.allow.users) == 5000
