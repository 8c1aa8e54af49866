"""The ``imdsguard`` command line.

Every failure a user can cause or meet becomes one line on stderr and an exit
code (2 for bad configuration), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from imdsguard import __version__, _locks, cgroups, paths
from imdsguard.config import DEFAULT_PATH, load_config
from imdsguard.errors import ImdsGuardError, PermissionDeniedError
from imdsguard.firewall.detect import leftovers, make_backend, preview
from imdsguard.identity import service_uids
from imdsguard.policy import build_ruleset

# Heavier modules (structlog, the rule renderers) are imported by the commands
# that need them: `imdsguard credentials` runs on every SDK credential refresh.


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PermissionDeniedError(
            f"'imdsguard {what}' changes the firewall and needs root: run it with sudo"
        )


def cmd_run(args: argparse.Namespace) -> int:
    """Foreground daemon."""
    from imdsguard import _log  # noqa: PLC0415 - keep one-shot commands light
    from imdsguard.daemon import serve  # noqa: PLC0415

    _need_root("run")
    config = load_config(args.config)  # validate before anything else, for the exit code
    # python-iptables reads rules back by pointing fd 1 at a pipe for a moment
    # (iptc's _get_saved_buf). A log line another thread (capture) wrote then
    # went into that pipe: lost, and it broke iptc's parsing, which killed the
    # daemon. Log through a copy of fd 1 that nobody redirects.
    sys.stdout = os.fdopen(
        os.dup(sys.stdout.fileno()),
        "w",
        buffering=1,
        encoding=sys.stdout.encoding,
        errors=sys.stdout.errors,
    )
    _log.configure(config.log_format)
    return serve(args.config, _log.get_logger())


def cmd_apply(args: argparse.Namespace) -> int:
    """Put the rules in place once."""
    _need_root("apply")
    config = load_config(args.config)
    running = _locks.is_held(paths.daemon_lock())
    backend = make_backend(config.backend, daemon_running=running)
    paths.ensure_dir(paths.run_dir())
    # With a daemon attributing packets, keep its capture in the rules (as it
    # builds them: policy decides queue or log); otherwise rules that need no daemon.
    with _locks.hold(paths.firewall_lock(), what="the imdsguard firewall lock"):
        units = cgroups.resolve(config.allow.units)
        ruleset = build_ruleset(
            config,
            extra_uids=service_uids(config),
            capabilities=backend.capabilities() if running else None,  # no probe needed
            capturing=running,
            unit_cgroups=units,
        )
        changed = backend.apply(ruleset)
    print(f"rules {'applied' if changed else 'already in place'} ({backend.name} backend)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    """Take every rule and chain of ours out."""
    _need_root("remove")
    running = _locks.is_held(paths.daemon_lock())
    if running and not args.force:
        raise ImdsGuardError(
            "the imdsguard daemon is running and would put the rules back: "
            "stop it first (systemctl stop imdsguard) or pass --force"
        )
    # Every backend, whatever the config says (it may have changed since the rules
    # went in, and a broken config must not keep them in): looking creates nothing.
    paths.ensure_dir(paths.run_dir())
    removed = []
    with _locks.hold(paths.firewall_lock(), what="the imdsguard firewall lock"):
        for backend, _ in leftovers(None, daemon_running=running):
            if backend.remove():
                removed.append(backend.name)
            backend.close()
    done = f"rules removed ({', '.join(removed)})" if removed else ""
    print(done or "no imdsguard rules were in place")
    if running:
        print(
            "the running daemon keeps its rules (on nftables its own table, which no other "
            "process may delete, goes when it stops: systemctl stop imdsguard)"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Health report; the exit code says protected/degraded/unprotected/unknown."""
    from imdsguard import status  # noqa: PLC0415

    doc = status.gather(args.config)
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else status.render_text(doc))
    return status.exit_code(doc)


def cmd_events(args: argparse.Namespace) -> int:
    """Blocked attempts, newest last."""
    from imdsguard.events.log import event_lines  # noqa: PLC0415

    try:
        for line in event_lines(
            paths.events_file(), args.n, as_json=args.json, follow_new=args.follow
        ):
            print(line, flush=True)
    except PermissionError:
        raise PermissionDeniedError(
            f"cannot read {paths.events_file()}: the event log is readable by root only; "
            "run with sudo"
        ) from None
    return 0


def cmd_credentials(args: argparse.Namespace) -> int:
    """credential_process JSON from the broker (for the AWS SDKs and CLI)."""
    from imdsguard.broker.client import credentials_main  # noqa: PLC0415

    return credentials_main(load_config(args.config, trust=False).broker.socket)


def cmd_audit(args: argparse.Namespace) -> int:
    """Posture report of this instance's IMDS exposure."""
    from imdsguard import audit  # noqa: PLC0415

    config = load_config(args.config, trust=False)
    report = audit.run_audit(config, args.config)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else audit.render_text(report))
    return audit.exit_code(report)


def cmd_suggest(args: argparse.Namespace) -> int:
    """Proposed allowlist from what audit mode recorded."""
    from imdsguard.events.log import read_events  # noqa: PLC0415
    from imdsguard.suggest import suggest  # noqa: PLC0415

    path = args.events or paths.events_file()
    try:
        events = read_events(path, n=1_000_000)
    except PermissionError:
        raise PermissionDeniedError(f"cannot read {path}: run with sudo") from None
    # The proposal keeps what is allowed now (audit mode never logs it); without
    # the config it still helps, and says what it leaves out.
    try:
        config = load_config(args.config, trust=False)
    except ImdsGuardError as exc:
        print(
            f"imdsguard: warning: {exc}; the proposal leaves out the current allowlist",
            file=sys.stderr,
        )
        print(suggest(events, source=path), end="")
        return 0
    print(suggest(events, source=path, allowed=config.allow, config_path=config.path), end="")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate and print the effective policy."""
    config = load_config(args.config, trust=os.geteuid() == 0)
    if os.path.exists(config.path):
        print(f"# {config.path}: OK")
    else:  # only the default path may be missing (an explicit -c must exist)
        print(f"# {config.path}: no such file; the defaults (what the daemon uses without it):")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False), end="")
    if args.rules:
        units = cgroups.resolve(config.allow.units)
        ruleset = build_ruleset(config, extra_uids=service_uids(config), unit_cgroups=units)
        print("\n".join(preview(config.backend, ruleset)))
    return 0


def cmd_broker_serve(args: argparse.Namespace) -> int:
    """Internal: the broker process of imdsguard-broker.service (not for people)."""
    from imdsguard.broker.process import unit_main  # noqa: PLC0415
    from imdsguard.broker.supervisor import control_socket  # noqa: PLC0415

    return unit_main(control_socket())


def cmd_demo(args: argparse.Namespace) -> int:
    """Self-contained demo in throw-away namespaces."""
    from imdsguard_testing.demo import run_demo  # noqa: PLC0415

    _need_root("demo")
    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"configuration file (default {DEFAULT_PATH})",
    )
    parser = argparse.ArgumentParser(
        prog="imdsguard",
        description="Guard the instance metadata service: deny all but allowlisted owners.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"imdsguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, "run the daemon in the foreground")
    add("apply", cmd_apply, "put the rules in place once")
    p = add("remove", cmd_remove, "take every imdsguard rule and chain out")
    p.add_argument(
        "--force",
        action="store_true",
        help="even while the daemon runs (its own nftables table goes when it stops)",
    )
    p = add("status", cmd_status, "is this host protected? (exit 0/1/2/3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("events", cmd_events, "blocked attempts, newest last")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new ones")
    add("credentials", cmd_credentials, "print AWS credential_process JSON from the broker")
    p = add("audit", cmd_audit, "posture report of this instance's IMDS exposure (exit 1: high)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("suggest", cmd_suggest, "proposed allowlist from what audit mode observed")
    p.add_argument("--events", metavar="PATH", help="event log to read (default: the daemon's)")
    p = add("check-config", cmd_check_config, "validate the config, print the effective policy")
    p.add_argument("--rules", action="store_true", help="also print the rules it renders to")
    if importlib.util.find_spec("imdsguard_testing") is not None:
        # Only in a source checkout (``make demo``): the demo, its simulated IMDS and
        # namespace harness are not installed on hosts. It reads no config.
        text = "self-contained demo in throw-away network namespaces (root; source checkout)"
        sub.add_parser("demo", help=text, description=text).set_defaults(func=cmd_demo)
    # Internal, for imdsguard-broker.service: no help, so it is not listed.
    sub.add_parser("broker-serve", parents=[common]).set_defaults(func=cmd_broker_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    try:
        result: int = args.func(args)
        return result
    except ImdsGuardError as exc:
        print(f"imdsguard: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
