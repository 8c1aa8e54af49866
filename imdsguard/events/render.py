"""Events for people: one console line per event, every untrusted string escaped.

Command lines, ``comm`` and ``exe`` come from other users' processes: nothing
in them may move an operator's cursor, change colours or start a new line.
JSON output needs nothing (the encoder escapes); the console formats
(``imdsguard events``, ``status``, structlog's console renderer) go through
:func:`escape`.
"""

from __future__ import annotations

import shlex
from typing import Any

from imdsguard.events.event import SUMMARY


def escape(text: str) -> str:
    """``text`` with control and invisible format characters made visible.

    ESC becomes ``\\x1b``, newline ``\\n``, U+202E (right-to-left override)
    ``\\u202e``, and a backslash is doubled so the result is unambiguous.
    Nothing an untrusted program puts in its argv can move the cursor, change
    colours or start a new line on an operator's terminal.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def escape_value(value: Any) -> Any:
    """:func:`escape` applied to every string inside ``value`` (lists, dicts)."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, list):
        return [escape_value(v) for v in value]
    if isinstance(value, tuple):
        return tuple(escape_value(v) for v in value)
    if isinstance(value, dict):
        return {escape(str(k)): escape_value(v) for k, v in value.items()}
    return value


def console_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """A structlog processor for the console format: escape every string value.

    JSON output needs nothing (the encoder escapes); a console renderer
    prints strings as they are, so put this in front of it.
    """
    return {k: escape_value(v) for k, v in event_dict.items()}


def _s(value: Any) -> str:
    return "-" if value is None else escape(str(value))


def format_console(event: dict[str, Any]) -> str:
    """One line for people, every untrusted string escaped."""
    name = str(event.get("event", ""))
    when = _s(event.get("timestamp"))
    if name == SUMMARY:
        top = ", ".join(
            f"uid={_s(t.get('uid'))} exe={_s(t.get('exe'))} x{_s(t.get('count'))}"
            for t in event.get("top", [])
            if isinstance(t, dict)
        )
        return f"{when} SUPPRESSED {_s(event.get('total'))} events ({top})"
    if not name.startswith("imds_access_"):
        rest = " ".join(f"{escape(str(k))}={_s(v)}" for k, v in event.items() if k != "event")
        return f"{escape(name)} {rest}".strip()
    verdict = "AUDITED" if name == "imds_access_audited" else "BLOCKED"
    dst = _s(event.get("dst"))
    if event.get("family") == "ipv6":
        dst = f"[{dst}]"
    cmdline = event.get("cmdline") or []
    cmd = escape(shlex.join(str(a) for a in cmdline)) if isinstance(cmdline, list) else "-"
    parents = " < ".join(
        f"{_s(a.get('comm'))}({_s(a.get('pid'))})"
        for a in event.get("ancestors") or []
        if isinstance(a, dict)
    )
    parts = [
        when,
        verdict,
        f"{dst}:{_s(event.get('dport'))}",
        f"uid={_s(event.get('uid'))}({_s(event.get('user'))})",
        f"pid={_s(event.get('pid'))}",
        f"exe={_s(event.get('exe'))}",
        f"cmd={cmd or '-'}",
    ]
    if name == "imds_access_audited":
        parts.append(f"imds={_s(event.get('imds_version'))}")
    if (event.get("attempts") or 1) != 1:
        parts.append(f"attempts={_s(event.get('attempts'))}")
    for key in ("unit", "container", "src", "iface"):
        if event.get(key):
            parts.append(f"{key}={_s(event.get(key))}")
    if not event.get("attributed"):
        parts.append("(process not found)")
    if parents:
        parts.append(f"parents: {parents}")
    return " ".join(parts)
