"""Set-up shared by the benchmarks: the root check and the daemon's work directory.

It lives here, not in benchmarks/, so that a benchmark finds it both when run as a
script (``.venv/bin/python benchmarks/X.py``) and when a test imports it
(``benchmarks.flushrace``).
"""

from __future__ import annotations

import os
import sys
import tempfile

from imdsguard_testing.netns import guard_env


def not_root() -> bool:
    """True, with a line on stderr, when this process is not root.

    The benchmarks build network namespaces, so they need root; ``main`` returns 2
    when this is true.
    """
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return True
    return False


def guard_work(
    backend: str, prefix: str = "imdsg-bench-", shared: bool = False
) -> tuple[str, dict[str, str], str]:
    """A fresh work directory, the daemon's environment for it, and its config path.

    The config selects ``backend`` and allows only root. ``shared``: the directory is
    made 0755, for processes that run as another user (nothing secret is kept there).
    The caller removes the directory (``shutil.rmtree``).
    """
    work = tempfile.mkdtemp(prefix=prefix)
    if shared:
        os.chmod(work, 0o755)  # noqa: S103 - the daemon's files live here; nothing secret
    env = guard_env(work)
    config = os.path.join(work, "config.yaml")
    with open(config, "w") as fh:
        fh.write(f"firewall:\n  backend: {backend}\nallow:\n  users: [root]\n")
    return work, env, config
