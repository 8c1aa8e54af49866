"""Build the RPM once (``make rpm``, cached in build/) and look inside it.

Shared by tests/packaging and tests/system. ``make`` decides whether anything
changed since the last build; a file lock keeps concurrent test sessions from
building into build/rpm at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "packaging" / "rpm" / "imdsguard.spec"
LOCK = REPO / "build" / ".rpm.lock"

#: Figures worth seeing in every ``make test`` run (RPM size, exposure score),
#: filled in by the tests and printed in the terminal summary (conftest.py).
FIGURES: dict[str, str] = {}


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def version() -> str:
    """The package version: imdsguard.__version__ as the source tree has it."""
    for line in (REPO / "imdsguard" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split('"')[1]
    raise AssertionError("no __version__ in imdsguard/__init__.py")


def build_rpm() -> Path:
    """Run ``make rpm`` (a no-op when nothing changed) and return the binary RPM."""
    with _locked():
        proc = subprocess.run(
            ["make", "--no-print-directory", "rpm"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"make rpm failed:\n{proc.stdout}\n{proc.stderr}")
    found = sorted(
        (REPO / "build" / "rpm" / "RPMS").glob(f"*/imdsguard-{version()}-*.rpm"),
        key=os.path.getmtime,
    )
    assert found, "make rpm produced no RPM under build/rpm/RPMS"
    return found[-1]


def source_rpm() -> Path:
    """The SRPM ``make rpm`` built alongside."""
    found = sorted((REPO / "build" / "rpm" / "SRPMS").glob(f"imdsguard-{version()}-*.src.rpm"))
    assert found, "make rpm produced no SRPM under build/rpm/SRPMS"
    return found[-1]


def run(argv: list[str]) -> str:
    """A command's standard output (it must succeed)."""
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def query(rpm: Path, *args: str) -> str:
    """``rpm -qp ARGS RPM``."""
    return run(["rpm", "-qp", *args, str(rpm)])


def scriptlet(rpm: Path, tag: str) -> str:
    """A scriptlet's body (tag POSTIN, PREUN, POSTUN, ...) as rpm stored it."""
    return query(rpm, "--qf", f"%{{{tag}}}")


def extract(rpm: Path, root: Path) -> None:
    """The payload under ``root``, as ``rpm2cpio RPM | cpio -idm`` leaves it."""
    root.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(["rpm2cpio", str(rpm)], stdout=subprocess.PIPE) as conv:
        subprocess.run(
            ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
            stdin=conv.stdout,
            cwd=root,
            check=True,
        )
    assert conv.returncode == 0, "rpm2cpio failed"
