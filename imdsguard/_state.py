"""The daemon's published state: a small JSON file that ``status`` reads."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from imdsguard import paths


def write_state(state: dict[str, Any]) -> None:
    """Atomically replace the state file (readable by everyone: it holds no secrets)."""
    target = paths.state_file()
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def read_state() -> dict[str, Any] | None:
    """The last state the daemon published, or None."""
    try:
        with open(paths.state_file(), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
