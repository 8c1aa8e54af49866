"""docs/contract.md against the code: what it lists is what the code has, no more, no less.

Each test reads one table of the contract and the code's own source of truth
(the argparse parser, the config validator and ``to_dict``, a status document
gathered without root and its text, the event builder, the metrics renderer, the broker's
error answers found in its source), so adding or removing an item on either
side alone fails here.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import imdsguard
from imdsguard import errors, metrics, status
from imdsguard.broker import client as broker_client
from imdsguard.cli import build_parser
from imdsguard.config import parse_config
from imdsguard.events.attribution import Attribution
from imdsguard.events.capture import build_event
from imdsguard.events.packet import IPPROTO_TCP, TCP_SYN, Packet

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "contract.md"
PACKAGE = Path(imdsguard.__file__).resolve().parent


def _section(title: str) -> str:
    """The text of the ``## title...`` section, up to the next ``## ``."""
    text = CONTRACT.read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    found = [p for p in parts if p.startswith(title)]
    assert len(found) == 1, f"contract.md has no single section '## {title}'"
    return found[0]


def _rows(section: str, first: int = 0) -> list[list[str]]:
    """The body rows of the ``first``-th table in ``section``, cells stripped (``\\|`` kept)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        else:
            current = None
    rows = tables[first][2:]  # past the header and the |---| line
    assert rows, "empty table"
    return rows


def _code(cell: str) -> list[str]:
    """The `backticked` parts of a cell."""
    return re.findall(r"`([^`]*)`", cell)


# -- commands and options ------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no subcommands")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option not in ("-h", "--help")
    }


def _documented_commands() -> dict[str, set[str]]:
    commands: dict[str, set[str]] = {}
    for row in _rows(_section("Commands")):
        (command,) = _code(row[0])
        name = command.split()[1]
        assert name not in commands, f"{name} listed twice"
        commands[name] = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", row[1]))
    return commands


def test_every_command_and_option_of_the_parser_is_in_the_contract_and_no_other() -> None:
    parser = build_parser()
    code = {name: _options(sub) for name, sub in _subparsers(parser).items()}
    documented = _documented_commands()
    assert sorted(documented) == sorted(code), "commands differ (contract.md: ## Commands)"
    for name, options in code.items():
        assert documented[name] == options, f"options of {name} differ"
    section = _section("Commands")
    for option in _options(parser):  # -c/--config and --version before the command
        assert f"`{option}" in section or f"/{option}" in section, option


# -- exit codes ----------------------------------------------------------------------


def test_error_classes_with_their_own_exit_code_are_in_the_exit_code_table() -> None:
    rows = {int(row[0]): row[1] for row in _rows(_section("Exit codes"))}
    classes = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.ImdsGuardError)
    ]
    for cls in classes:
        if cls.exit_code != 1:
            assert f"`{cls.__name__}`" in rows.get(cls.exit_code, ""), cls.__name__
    for code, meaning in rows.items():
        for name in re.findall(r"`(\w+Error)`", meaning):
            assert getattr(errors, name).exit_code == code, name


def test_the_man_page_names_every_exit_code_of_the_contract() -> None:
    spec = importlib.util.spec_from_file_location(
        "manpage", CONTRACT.parents[1] / "packaging" / "manpage.py"
    )
    assert spec is not None and spec.loader is not None
    manpage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(manpage)
    documented = {row[0] for row in _rows(_section("Exit codes"))}
    documented |= {row[0] for row in _rows(_section("`imdsguard status`"), first=0)}
    assert {code for code, _ in manpage.EXIT_STATUS} == documented
    page = manpage.render()
    for code in documented:
        assert f".TP\n\\fB{code}\\fR\n" in page, code


# -- configuration -------------------------------------------------------------------


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _nested(key: str, value: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    *parents, last = key.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return doc


def _documented_config() -> dict[str, str]:
    """key -> its default, as written in the contract's table."""
    result = {}
    for row in _rows(_section("Configuration")):
        (key,) = _code(row[0])
        (default,) = _code(row[2])
        result[key] = default
    return result


def test_config_keys_are_those_of_the_model() -> None:
    # Every key the effective configuration has (endpoints_acknowledged shows when true).
    code = set(_flatten(parse_config("endpoints_acknowledged: true\n").to_dict()))
    assert sorted(_documented_config()) == sorted(code)


@pytest.mark.parametrize("key", sorted(_documented_config()))
def test_each_documented_key_is_accepted_and_its_default_is_the_default(key: str) -> None:
    default = _documented_config()[key]
    null = parse_config(yaml.safe_dump(_nested(key, None)))
    if key == "allow.users":  # the one exception the contract states: null allows nobody
        assert null.allow.users == ()
    else:
        assert null.to_dict() == parse_config("").to_dict(), f"{key}: null is not the default"
    written = parse_config(yaml.safe_dump(_nested(key, yaml.safe_load(default))))
    assert written.to_dict() == parse_config("").to_dict(), f"{key}: default is not {default}"


# -- status --------------------------------------------------------------------------


@pytest.fixture
def status_doc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A status gathered without a daemon or a config: touches no firewall."""
    monkeypatch.setenv("IMDSGUARD_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("IMDSGUARD_LOG_DIR", str(tmp_path / "log"))
    return status.gather(str(tmp_path / "no-such-config.yaml"))


def _documented_status() -> dict[str, str]:
    """dotted key (or ``top.*``) -> its description."""
    keys = {}
    for row in _rows(_section("`imdsguard status`"), first=1):
        for key in _code(row[0]):
            keys[key] = row[1]
    return keys


def test_status_exit_codes_are_the_contract_s() -> None:
    rows = _rows(_section("`imdsguard status`"), first=0)
    documented = {_code(row[1])[0]: int(row[0]) for row in rows}
    assert documented == status.EXIT


def test_status_document_keys_are_the_contract_s(status_doc: dict[str, Any]) -> None:
    documented = _documented_status()
    assert status.exit_code(status_doc) == 3
    assert {k.split(".")[0] for k in documented} == set(status_doc)
    for top, value in status_doc.items():
        if (
            isinstance(value, dict)
            and f"{top}.*" not in documented
            and any(k.startswith(f"{top}.") for k in documented)
        ):
            for sub in value:
                assert f"{top}.{sub}" in documented, f"{top}.{sub} is not in contract.md"
    for key, meaning in documented.items():
        top, _, sub = key.partition(".")
        if sub and sub != "*" and not meaning.startswith("only when"):
            assert sub in status_doc[top], f"contract.md lists {key}, status has no such key"


def _label(line: str) -> str | None:
    """What a line of status text is: its ``word:``, or ``!`` / ``-``; None for an event line."""
    text = line.strip()
    if text[:2] in ("! ", "- "):
        return text[0]
    found = re.match(r"([a-z]+):", text)
    return found.group(1) if found else None


def test_status_text_lines_are_the_contract_s(status_doc: dict[str, Any]) -> None:
    paragraph = _section("`imdsguard status`").split("The text output has these lines", 1)[1]
    documented = {_label(c) for c in _code(paragraph.split("\n\n", 1)[0])} - {None}
    syn = Packet("ipv4", IPPROTO_TCP, "192.0.2.1", "169.254.169.254", 40000, 80, TCP_SYN)
    # The gathered document with every conditional line switched on.
    doc = {
        **status_doc,
        "broker": {**status_doc["broker"], "enabled": True, "healthy": False},
        "blocked": {
            **status_doc["blocked"],
            "total": 1,
            "recent": [build_event("enforce", syn, Attribution(), 1.0)],
        },
        "units": {"a.service": "running", "b.service": "not running"},
        "attribution": {"available": True, "held": False, "reason": "log"},
        "limits": ["a limit"],
        "problems": ["ipv4: a problem"],
    }
    rendered = {_label(line) for line in status.render_text(doc).splitlines()} - {None}
    assert sorted(rendered) == sorted(documented)


# -- events --------------------------------------------------------------------------


def test_event_fields_are_the_contract_s_in_its_order() -> None:
    documented = [_code(row[0])[0] for row in _rows(_section("Blocked-attempt event"))]
    syn = Packet("ipv4", IPPROTO_TCP, "192.0.2.1", "169.254.169.254", 40000, 80, TCP_SYN)
    assert list(build_event("enforce", syn, Attribution(), 1.0)) == documented
    forwarded = build_event("enforce", syn, Attribution(), 1.0, forwarded=True, iface="docker0")
    at = documented.index("family") + 1
    assert list(forwarded) == [*documented[:at], "src", *documented[at:], "iface"]


# -- metrics -------------------------------------------------------------------------


def test_metric_names_are_the_contract_s() -> None:
    snap = {"version": "0", "backend": "iptables", "mode": "enforce", "protected": True}
    text = metrics.render({**snap, "broker_healthy": True})
    code = set(re.findall(r"^# TYPE (imdsguard_\w+) ", text, flags=re.M))
    documented = {_code(row[0])[0] for row in _rows(_section("Metrics"))}
    assert sorted(documented) == sorted(code)


# -- broker --------------------------------------------------------------------------


def _text(node: ast.expr) -> str | None:
    """A message as the contract writes it: f-string fields as ``{expression}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                parts.append("{" + ast.unparse(value.value) + "}")
        return "".join(parts)
    return None


def _error_message(node: ast.expr) -> str | None:
    if not isinstance(node, ast.Dict):
        return None
    keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
    if "error" not in keys or "event" in keys:  # {"event": ...}: a log line
        return None
    return _text(node.values[keys.index("error")])


def _broker_errors() -> tuple[set[str], set[int], set[tuple[int, str]]]:
    """(messages, statuses, (status, message) pairs) the broker's code answers with."""
    messages: set[str] = set()
    statuses: set[int] = set()
    pairs: set[tuple[int, str]] = set()
    for path in sorted((PACKAGE / "broker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                message = _error_message(node)
                if message is not None:
                    messages.add(message)
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            codes = [
                a.value
                for a in node.args
                if isinstance(a, ast.Constant) and type(a.value) is int and 400 <= a.value < 600
            ]
            if name not in ("HttpError", "_reply", "response") or not codes:
                continue
            statuses.add(codes[0])
            for arg in node.args:
                message = _error_message(arg) if name != "HttpError" else _text(arg)
                if message is not None:
                    messages.add(message)
                    pairs.add((codes[0], message))
    return messages, statuses, pairs


def test_broker_errors_are_the_contract_s() -> None:
    rows = _rows(_section("Broker"))
    documented = {(int(row[0]), _code(row[1])[0]) for row in rows}
    messages, statuses, pairs = _broker_errors()
    assert len(pairs) > 10, "the scan of the broker's source found too little"
    assert sorted({m for _, m in documented}) == sorted(messages)
    assert sorted({s for s, _ in documented}) == sorted(statuses)
    assert pairs <= documented, sorted(pairs - documented)
    assert f"`GET {broker_client.CREDENTIALS_ROUTE}`" in _section("Broker")
    assert f"`GET {broker_client.HEALTH_ROUTE}`" in _section("Broker")
