"""Reading YAML with the line of every dotted key, for one-line error messages.

:func:`parse_yaml` turns text into plain Python values (safe types only)
plus a :class:`Doc` that maps each dotted key (``broker.limits.max_waiting``,
``allow.users[2]``) to its line, and bounds what a hostile file can cost
(alias bombs, deep nesting).
"""

from __future__ import annotations

from typing import Any

import yaml

from imdsguard.errors import ConfigError

#: A real config has a few hundred values (a few thousand with a long allowlist). The
#: limits stop alias bombs ("billion laughs") and nesting that would exhaust the stack.
_MAX_NODES = 100_000
_MAX_DEPTH = 32


def _one_line(text: object) -> str:
    """``text`` with every run of whitespace, line breaks included, as one space."""
    return " ".join(str(text).split())


def printable(text: str) -> str:
    """``text`` for a one-line message: non-printable characters escaped as in repr."""
    return text if text.isprintable() else repr(text)[1:-1]


class Doc:
    """A parsed document: plain Python values plus the line of every dotted key."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: dict[str, int] = {}
        self.nodes = 0
        self.active: set[int] = set()  # nodes being converted: an alias back to one loops

    def error(self, key: str, message: str) -> ConfigError:
        line = self.lines.get(key)
        while line is None and "." in key:
            key_parent = key.rsplit(".", 1)[0]
            line = self.lines.get(key_parent)
            key = key_parent
        return ConfigError(self.path, message, key=key or None, line=line)


def _convert(node: yaml.Node, key: str, doc: Doc, depth: int = 0) -> Any:
    line = node.start_mark.line + 1
    doc.lines.setdefault(key, line)
    doc.nodes += 1
    if doc.nodes > _MAX_NODES:
        raise ConfigError(
            doc.path, f"too many values (over {_MAX_NODES}): are aliases expanding?", line=line
        )
    if depth > _MAX_DEPTH:
        raise ConfigError(doc.path, f"nested more than {_MAX_DEPTH} levels deep", line=line)
    if id(node) in doc.active:
        raise ConfigError(doc.path, "an alias refers to itself", key=key or None, line=line)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        doc.active.add(id(node))
        try:
            return _convert_collection(node, key, doc, depth)
        finally:
            doc.active.discard(id(node))
    constructor = yaml.SafeLoader("")
    try:
        return constructor.construct_object(node, deep=True)
    except yaml.MarkedYAMLError as exc:  # e.g. an unknown or unsupported !tag
        problem = exc.problem or exc.context or "unsupported value"
        raise ConfigError(doc.path, _one_line(problem), key=key or None, line=line) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. !!int abc, a 5000-digit int
        raise ConfigError(
            doc.path, f"cannot read this value: {_one_line(exc)}", key=key or None, line=line
        ) from None
    finally:
        constructor.dispose()


def _convert_collection(
    node: yaml.MappingNode | yaml.SequenceNode, key: str, doc: Doc, depth: int
) -> Any:
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise ConfigError(
                    doc.path, "keys must be plain strings", line=knode.start_mark.line + 1
                )
            name = printable(str(knode.value))  # keys appear in one-line messages
            child = f"{key}.{name}" if key else name
            if name in result:
                raise ConfigError(
                    doc.path, "duplicate key", key=child, line=knode.start_mark.line + 1
                )
            doc.lines[child] = knode.start_mark.line + 1
            result[name] = _convert(vnode, child, doc, depth + 1)
        return result
    return [_convert(item, f"{key}[{i}]", doc, depth + 1) for i, item in enumerate(node.value)]


def parse_yaml(text: str, path: str) -> tuple[dict[str, Any], Doc]:
    doc = Doc(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        problem = _one_line(exc.problem or exc)
        raise ConfigError(path, f"not valid YAML: {problem}", line=line) from None
    except yaml.YAMLError as exc:  # e.g. a control character (ReaderError, over two lines)
        raise ConfigError(path, f"not valid YAML: {_one_line(exc)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(path, f"nested more than {_MAX_DEPTH} levels deep") from None
    if root is None or root.tag == "tag:yaml.org,2002:null":  # e.g. "---" then only comments
        return {}, doc
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(
            path,
            "the top level must be a mapping of keys (e.g. 'mode: enforce')",
            line=root.start_mark.line + 1,
        )
    data = _convert(root, "", doc)
    return data, doc
