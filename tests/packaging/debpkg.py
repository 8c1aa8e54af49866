"""Build the .deb (``make deb``, cached in build/deb) and look inside it.

Shared by tests/packaging and tests/system. A second build with a higher
revision (for the upgrade test) goes to a directory of the caller's.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import rpmpkg

REPO = rpmpkg.REPO
DEB_DIR = REPO / "packaging" / "deb"
MAINTAINER = "imdsguard maintainers <maintainers@imdsguard.invalid>"


def build_deb(revision: int = 1, out: Path | None = None) -> Path:
    """``make deb`` (revision 1, a no-op when nothing changed), or a build into ``out``."""
    with rpmpkg._locked():  # one packaging build at a time in build/
        if out is None:
            argv = ["make", "--no-print-directory", "deb", f"DEB_REVISION={revision}"]
            env = dict(os.environ)
        else:
            argv = [str(DEB_DIR / "build-deb"), str(out), str(revision)]
            env = {**os.environ, "MAINTAINER": MAINTAINER}
        proc = subprocess.run(
            argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0:
            raise AssertionError(f"{argv} failed:\n{proc.stdout}\n{proc.stderr}")
    where = out or REPO / "build" / "deb"
    deb = where / f"imdsguard_{rpmpkg.version()}-{revision}_all.deb"
    assert deb.is_file(), f"no {deb}"
    return deb


def field(deb: Path, name: str) -> str:
    """One control field (``dpkg-deb -f``)."""
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def control_file(deb: Path, name: str) -> str:
    """A file of the control area (postinst, conffiles, ...)."""
    tar = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        member = archive.extractfile(f"./{name}")
        assert member is not None, name
        return member.read().decode()


def contents(deb: Path) -> dict[str, str]:
    """Payload paths (``/usr/bin/imdsguard``) → ``dpkg-deb -c`` mode string."""
    out = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    files = {}
    for line in out.splitlines():
        mode, *_, path = line.split(maxsplit=5)
        files["/" + path.split(" -> ")[0].lstrip("./").rstrip("/")] = mode
    return files
