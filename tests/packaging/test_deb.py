"""The .deb: control fields, payload, maintainer scripts, lintian.

Built once per session by ``make deb`` (see debpkg.py). Installing it for
real (apt-get install, upgrade, purge under systemd) is tests/system/test_nspawn_deb.py.
"""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

import debpkg
import pytest
import rpmpkg

SITE = "/usr/lib/python3/dist-packages"


@pytest.fixture(scope="module")
def deb() -> Path:
    path = debpkg.build_deb()
    rpmpkg.FIGURES["deb"] = f"{path.name}: {path.stat().st_size / 1024:.0f} KiB"
    return path


def test_control(deb: Path) -> None:
    assert debpkg.field(deb, "Package") == "imdsguard"
    assert debpkg.field(deb, "Version") == f"{rpmpkg.version()}-1"
    assert debpkg.field(deb, "Architecture") == "all"  # python3-iptables: no C of ours
    depends = [d.strip() for d in debpkg.field(deb, "Depends").split(",")]
    for wanted in ("python3 (>= 3.9)", "python3-yaml", "python3-structlog", "python3-psutil",
                   "python3-iptables", "python3-nftables", "nftables", "iptables", "procps",
                   "adduser"):  # fmt: skip
        assert wanted in depends, wanted
    assert debpkg.field(deb, "Homepage").startswith("https://")
    assert re.fullmatch(r"\d+", debpkg.field(deb, "Installed-Size"))
    assert debpkg.control_file(deb, "conffiles").split() == ["/etc/imdsguard/config.yaml"]


def test_payload(deb: Path) -> None:
    files = debpkg.contents(deb)
    for path in ("/usr/bin/imdsguard", "/lib/systemd/system/imdsguard.service",
                 "/lib/systemd/system/imdsguard-broker.service",
                 "/usr/lib/sysusers.d/imdsguard.conf",
                 "/usr/lib/tmpfiles.d/imdsguard.conf", "/etc/imdsguard/config.yaml",
                 "/usr/share/doc/imdsguard/copyright", "/usr/share/doc/imdsguard/README.md",
                 "/usr/share/doc/imdsguard/changelog.Debian.gz",
                 "/usr/share/man/man1/imdsguard.1.gz", f"{SITE}/imdsguard/py.typed"):  # fmt: skip
        assert path in files, path
    docs = {f"/usr/share/doc/imdsguard/{p.name}" for p in (rpmpkg.REPO / "docs").glob("*.md")}
    assert set(files) >= docs, sorted(docs - set(files))  # every document of docs/ ships
    ours = {
        f"{SITE}/{p.relative_to(rpmpkg.REPO).as_posix()}"
        for p in (rpmpkg.REPO / "imdsguard").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert ours <= files.keys(), sorted(ours - files.keys())
    assert not [f for f in files if "imdsguard_testing" in f or "imds_sim" in f or ".pyc" in f]
    assert files["/usr/bin/imdsguard"].startswith("-rwxr-xr-x")
    assert files["/etc/imdsguard/config.yaml"].startswith("-rw-r--r--")


def test_maintainer_scripts(deb: Path) -> None:
    postinst = debpkg.control_file(deb, "postinst")
    prerm = debpkg.control_file(deb, "prerm")
    postrm = debpkg.control_file(deb, "postrm")
    # Install: enabled and started; upgrade ($2 set): restarted.
    assert "for unit in imdsguard.service imdsguard-broker.service; do" in postinst
    assert 'deb-systemd-helper enable "$unit"' in postinst
    assert "_dh_action=restart" in postinst and "deb-systemd-invoke $_dh_action" in postinst
    assert "adduser --system" in postinst and "imdsguard-broker" in postinst
    assert "py3compile -p imdsguard" in postinst
    # Remove (not upgrade): stop, then take the rules out.
    block = prerm[prerm.index('if [ "$1" = "remove" ]; then') :]
    block = block[: block.index("\nfi\n")]
    assert block.index("deb-systemd-invoke stop") < block.index("imdsguard remove --force")
    # Purge: every file of ours goes.
    purge = postrm[postrm.index('if [ "$1" = "purge" ]; then') :]
    for path in ("/etc/imdsguard", "/var/lib/imdsguard", "/var/log/imdsguard", "/run/imdsguard"):
        assert path in purge, path
    for script in (postinst, prerm, postrm):
        assert script.startswith("#!/bin/sh\n") and "\nset -e\n" in script
        subprocess.run(["sh", "-n"], input=script, text=True, check=True)


def test_copyright_and_man_page(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    copyright_text = (tmp_path / "usr/share/doc/imdsguard/copyright").read_text()
    assert copyright_text.startswith("Format: https://www.debian.org/doc/packaging-manuals/")
    assert "License: Apache-2.0" in copyright_text
    assert "/usr/share/common-licenses/Apache-2.0" in copyright_text
    page = gzip.decompress((tmp_path / "usr/share/man/man1/imdsguard.1.gz").read_bytes()).decode()
    assert page.startswith(".TH IMDSGUARD 1 ") and "\n.SS status\n" in page
    changelog = gzip.decompress(
        (tmp_path / "usr/share/doc/imdsguard/changelog.Debian.gz").read_bytes()
    ).decode()
    assert changelog.startswith(f"imdsguard ({rpmpkg.version()}-1) ")


def test_a_higher_revision_is_a_newer_package(deb: Path, tmp_path: Path) -> None:
    second = debpkg.build_deb(revision=2, out=tmp_path)
    version = debpkg.field(second, "Version")
    assert version == f"{rpmpkg.version()}-2"
    subprocess.run(
        ["dpkg", "--compare-versions", version, "gt", debpkg.field(deb, "Version")], check=True
    )
    subprocess.run(["dpkg-deb", "-x", str(second), str(tmp_path / "x")], check=True)
    changelog = gzip.decompress(
        (tmp_path / "x/usr/share/doc/imdsguard/changelog.Debian.gz").read_bytes()
    ).decode()
    assert changelog.startswith(f"imdsguard ({version}) ")


def test_lintian_clean(deb: Path) -> None:
    """No error or warning; what stays is overridden in the package, each with a reason."""
    proc = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--pedantic", str(deb)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert not tags, tags
    overrides = (debpkg.DEB_DIR / "lintian-overrides").read_text().splitlines()
    overridden = [line.split()[1] for line in overrides if line.startswith("imdsguard: ")]
    assert overridden
    docs = (rpmpkg.REPO / "docs" / "packaging.md").read_text()
    assert all(tag in docs for tag in overridden), overridden  # each listed with its reason
