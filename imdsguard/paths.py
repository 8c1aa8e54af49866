"""Where imdsguard keeps its runtime, state and log files.

Defaults follow docs/contract.md ("Files"); ``IMDSGUARD_RUN_DIR`` and ``IMDSGUARD_LOG_DIR``
move them (tests run several daemons side by side, each in its own network
namespace). Under systemd, ``RuntimeDirectory=`` and ``LogsDirectory=`` create
the defaults. Nothing of the daemon's own lives in ``/var/lib/imdsguard``: the
unit's ``StateDirectory=`` is only the writable place a ``metrics.textfile``
may go (the rest of the file system is read-only to the service).
"""

from __future__ import annotations

import contextlib
import os
import stat

from imdsguard.errors import ImdsGuardError


def run_dir() -> str:
    """Sockets, pid and lock files (``/run/imdsguard``)."""
    return os.environ.get("IMDSGUARD_RUN_DIR", "/run/imdsguard")


def log_dir() -> str:
    """The event log (``/var/log/imdsguard``)."""
    return os.environ.get("IMDSGUARD_LOG_DIR", "/var/log/imdsguard")


def daemon_lock() -> str:
    """Held by the running daemon for its whole life: how ``status`` knows it runs."""
    return os.path.join(run_dir(), "daemon.lock")


def firewall_lock() -> str:
    """Serialises every change imdsguard makes to the firewall (daemon and one-shots)."""
    return os.path.join(run_dir(), "firewall.lock")


def state_file() -> str:
    """The daemon's published state (JSON), read by ``status``."""
    return os.path.join(run_dir(), "state.json")


def events_file() -> str:
    """Blocked-attempt events, one JSON object per line."""
    return os.path.join(log_dir(), "events.jsonl")


def ensure_dir(path: str, mode: int = 0o755) -> None:
    """Create ``path`` if needed; refuse a symlink or a directory someone else owns."""
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
        st = os.lstat(path)
    except OSError as exc:  # e.g. the parent directory does not exist
        raise ImdsGuardError(f"cannot create {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ImdsGuardError(
            f"{path} is not a directory owned by uid {os.geteuid()} (a symlink, or planted by "
            "someone else?): remove it and retry"
        )
    if stat.S_IMODE(st.st_mode) & 0o022:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022)
