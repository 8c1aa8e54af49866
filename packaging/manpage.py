#!/usr/bin/python3
"""Write imdsguard(1) from the command line's own argparse parser.

Run at package build time (RPM %build, ``make deb``) from the source tree:

    python3 packaging/manpage.py > imdsguard.1

The commands, options and help texts come from ``imdsguard.cli.build_parser``,
so the page cannot drift from ``imdsguard --help``; the sections argparse
knows nothing about (exit status, files) are written here. Standard library
only: the build needs no man-page generator package.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imdsguard import __version__
from imdsguard.cli import build_parser

# Commands that exist only in a source checkout (tooling, not the product).
CHECKOUT_ONLY = frozenset({"demo"})

EXIT_STATUS = (
    ("0", "success; for status: protected"),
    ("1", "a failure the message on stderr explains (firewall, broker, IMDS, lock timeout; "
          "a second daemon); for status: degraded (protection in place but something is "
          "wrong, or audit mode); for audit: a high finding; for credentials: refused"),
    ("2", "bad configuration (file:line: key: reason) or a usage error; "
          "for status: unprotected"),
    ("3", "permission: the command needs root, or a file is root's only; "
          "for status and audit: unknown, something could not be checked (e.g. not root)"),
    ("130", "interrupted (Ctrl-C)"),
)  # fmt: skip

FILES = (
    ("/etc/imdsguard/config.yaml", "configuration (every key optional)"),
    ("/run/imdsguard/", "daemon lock, state and the broker socket"),
    ("/var/lib/imdsguard/", "the service's state directory (e.g. for a metrics textfile)"),
    ("/var/log/imdsguard/events.jsonl", "blocked (or audited) attempts, one JSON object a line"),
)


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, hyphens, and control characters at a line start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines() or [""]:
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _option_synopsis(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_roff(s)}\\fR" for s in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    return f"{names} \\fI{_roff(str(metavar))}\\fR"


def _options(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> list[str]:
    out: list[str] = []
    for action in parser._actions:  # argparse has no public iterator over its options
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if skip.issuperset(action.option_strings):
            continue
        out += [".TP", _option_synopsis(action), _roff(action.help or "")]
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public iterator over its options
        if isinstance(action, argparse._SubParsersAction):
            return {n: p for n, p in action.choices.items() if n not in CHECKOUT_ONLY}
    return {}


def render(parser: argparse.ArgumentParser | None = None, version: str = __version__) -> str:
    """The man page (roff) for ``parser`` (default: the real command line)."""
    parser = parser or build_parser()
    commands = _subparsers(parser)
    date = os.environ.get("IMDSGUARD_MAN_DATE", "")  # empty: reproducible builds
    out = [
        f'.TH IMDSGUARD 1 "{date}" "imdsguard {version}" "User Commands"',
        ".SH NAME",
        f"imdsguard \\- {_roff(parser.description or '')}",
        ".SH SYNOPSIS",
        "\\fBimdsguard\\fR [\\fB\\-c\\fR \\fIPATH\\fR] \\fICOMMAND\\fR [\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        _roff(
            "imdsguard keeps the instance metadata service (169.254.169.254 and fd00:ec2::254) "
            "closed to every process but those of allowlisted users and groups. The daemon "
            "(imdsguard run, started by imdsguard.service) owns the firewall rules, repairs "
            "them, logs every blocked attempt with the process behind it and optionally "
            "serves the instance role's credentials to allowed clients over a Unix socket."
        ),
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
        "Every command also takes \\fB\\-c\\fR \\fIPATH\\fR and \\fB\\-h\\fR.",
    ]
    common = frozenset({"-h", "--help", "-c", "--config"})
    for name, sub in commands.items():
        out += [".SS " + _roff(name), _roff(sub.description or ""), *_options(sub, common)]
    out.append(".SH EXIT STATUS")
    for code, meaning in EXIT_STATUS:
        out += [".TP", f"\\fB{code}\\fR", _roff(meaning)]
    out.append(".SH FILES")
    for path, meaning in FILES:
        out += [".TP", f"\\fI{_roff(path)}\\fR", _roff(meaning)]
    out += [
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBnft\\fR(8), \\fBiptables\\fR(8); "
        "/usr/share/doc/imdsguard/README.md",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
