"""A Debian 12 root file system for booting a real systemd, cached between runs.

debootstrap takes about a minute, so the result is kept under
/var/cache/imdsguard-test/rootfs-<hash of suite, mirror and packages> and
copied per test run. The packages are what the RPM requires, in their Debian
names (python3-yaml, nftables, python3-nftables, iptables for libxtables,
procps for /usr/bin/kill), plus systemd and the tools the test runs inside.
The .deb's system test boots a second cached rootfs that also holds the
deb's own Depends (read from packaging/deb/control), so that
``apt-get install ./imdsguard_*.deb`` resolves them there without a network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packaging"))

SUITE = "bookworm"
MIRROR = os.environ.get("IMDSGUARD_TEST_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("IMDSGUARD_TEST_CACHE", "/var/cache/imdsguard-test"))
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "procps",
    "util-linux",
    "passwd",
    "iproute2",
    "iptables",
    "nftables",
    "python3",
    "python3-yaml",
    "python3-nftables",
    "python3-psutil",
)
TOOLS = ("systemd-nspawn", "debootstrap", "rpm2cpio", "cpio", "nsenter", "rpmbuild")


def _key(packages: tuple[str, ...]) -> str:
    text = "\n".join([SUITE, MIRROR, *sorted(packages)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def deb_depends() -> tuple[str, ...]:
    """The package names in the .deb's Depends: (versions dropped)."""
    control = (Path(__file__).resolve().parents[2] / "packaging/deb/control").read_text()
    line = next(x for x in control.splitlines() if x.startswith("Depends:"))
    return tuple(d.split()[0] for d in line.split(":", 1)[1].split(","))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _build(target: Path, packages: tuple[str, ...]) -> None:
    # Under the lock: whatever a crashed build left behind can go.
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    proc = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            SUITE,
            str(work),
            MIRROR,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise AssertionError(f"debootstrap failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    # What a booted test never needs: the package cache and lists (~100 MB).
    subprocess.run(["chroot", str(work), "apt-get", "clean"], check=True, capture_output=True)
    for lists in (work / "var/lib/apt/lists").glob("*_*"):
        lists.unlink()
    work.rename(target)


def _cached(packages: tuple[str, ...]) -> Path:
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run 'make test-system', which installs them")
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"rootfs-{_key(packages)}"
    with _locked(CACHE / ".lock"):
        if not target.is_dir():
            _build(target, packages)
    return target


@pytest.fixture(scope="session")
def rootfs_cache() -> Path:
    """The cached Debian 12 rootfs (built on first use); copy it, never boot it."""
    return _cached(PACKAGES)


@pytest.fixture(scope="session")
def deb_rootfs_cache() -> Path:
    """The same with the .deb's dependencies installed (apt resolves them locally)."""
    return _cached(tuple(sorted({*PACKAGES, *deb_depends()})))
