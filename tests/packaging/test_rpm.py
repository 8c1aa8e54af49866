"""The RPM: payload, config file, requirements, scriptlets, and the packaged code running.

The package is built once per session by ``make rpm`` (see rpmpkg.py). Its
code is then run straight from the extracted payload with the system python3,
using only what the package bundles plus the distribution packages it
declares (on this Debian host: python3-yaml).
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import rpmpkg

SITE = "/usr/lib64/imdsguard"
CONFIG = "/etc/imdsguard/config.yaml"
EXPECTED_FILES = {
    "/usr/bin/imdsguard",
    "/usr/lib/systemd/system/imdsguard.service",
    "/usr/lib/systemd/system/imdsguard-broker.service",
    "/usr/lib/systemd/system-preset/80-imdsguard.preset",
    "/usr/lib/tmpfiles.d/imdsguard.conf",
    "/usr/lib/sysusers.d/imdsguard.conf",
    CONFIG,
    f"{SITE}/libxtwrapper.so",
    f"{SITE}/imdsguard/cli.py",
    f"{SITE}/structlog/__init__.py",
    f"{SITE}/typing_extensions.py",
    f"{SITE}/iptc/xtables.py",
    "/usr/share/doc/imdsguard/ami.md",
    "/usr/share/man/man1/imdsguard.1.gz",
    "/usr/share/licenses/imdsguard/LICENSE",
    "/var/lib/imdsguard",
    "/var/log/imdsguard",
}
#: Where the package may put files; anything else is a packaging mistake.
ALLOWED_PREFIXES = (
    "/usr/bin/imdsguard",
    f"{SITE}",
    "/usr/lib/systemd/system/imdsguard.service",
    "/usr/lib/systemd/system/imdsguard-broker.service",
    "/usr/lib/systemd/system-preset/",
    "/usr/lib/tmpfiles.d/",
    "/usr/lib/sysusers.d/imdsguard.conf",
    "/etc/imdsguard",
    "/usr/share/doc/imdsguard",
    "/usr/share/licenses/imdsguard",
    "/usr/share/man/man1/imdsguard.1.gz",
    "/var/lib/imdsguard",
    "/var/log/imdsguard",
)


def test_payload(rpm_file: Path) -> None:
    files = set(rpmpkg.query(rpm_file, "-l").split())
    assert files >= EXPECTED_FILES, sorted(EXPECTED_FILES - files)
    docs = {f"/usr/share/doc/imdsguard/{p.name}" for p in (rpmpkg.REPO / "docs").glob("*.md")}
    assert files >= docs, sorted(docs - files)  # every document of docs/ ships
    stray = sorted(f for f in files if not f.startswith(ALLOWED_PREFIXES))
    assert not stray, f"files outside the package's own paths: {stray}"
    # Everything of ours from the source tree is shipped.
    ours = {
        f"{SITE}/{p.relative_to(rpmpkg.REPO).as_posix()}"
        for p in (rpmpkg.REPO / "imdsguard").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert ours <= files, sorted(ours - files)
    # ...and nothing of the test, demo and benchmark tooling (imdsguard_testing).
    tooling = sorted(f for f in files if "imdsguard_testing" in f or "imds_sim" in f)
    assert not tooling, f"test tooling in the payload: {tooling}"
    # Bytecode only for the python3 that builds (and, on the targets, runs) it;
    # on a non-RPM build host, whose python3 is not the targets' 3.9, none.
    tag = rpmpkg.run(["/usr/bin/python3", "-c", "import sys; print(sys.implementation.cache_tag)"])
    tag = tag.strip()
    pyc = [f for f in files if f.endswith(".pyc")]
    assert all(f.endswith(f".{tag}.pyc") for f in pyc), pyc[:3]
    distro = rpmpkg.run(["rpm", "--eval", "%{?rhel}%{?amzn}%{?fedora}"]).strip()
    if not distro:  # the spec's own test for "building on the target"
        assert not pyc, "byte-compiled on a host that is not the target"


def test_config_file_is_noreplace_and_root_owned(rpm_file: Path) -> None:
    assert rpmpkg.query(rpm_file, "--configfiles").split() == [CONFIG]
    flags = dict(
        line.split(" ", 1)
        for line in rpmpkg.query(
            rpm_file, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"
        ).splitlines()
    )
    assert flags[CONFIG] == "cn"  # %config(noreplace)
    # imdsguard refuses a config anyone but root can write (config.check_trust).
    dump = {line.split()[0]: line.split() for line in rpmpkg.query(rpm_file, "--dump").splitlines()}
    _path, _size, _mtime, _digest, mode, owner, group, *_ = dump[CONFIG]
    assert (mode, owner, group) == ("0100644", "root", "root")


def test_requires(rpm_file: Path) -> None:
    requires = {line.strip() for line in rpmpkg.query(rpm_file, "--requires").splitlines()}
    for wanted in (
        "python3 >= 3.9",
        "/usr/bin/python3",
        "python3-pyyaml",
        "python3-psutil",
        "nftables",
        "python3-nftables",
        "libxtables.so.12()(64bit)",
        "libip4tc.so.2()(64bit)",
        "libip6tc.so.2()(64bit)",
        "/usr/bin/kill",
        "systemd",
    ):
        assert wanted in requires, f"missing Requires: {wanted}"
    # Nothing tied to the build host's Python, and no glibc newer than the
    # targets' 2.34 (AL2023, RHEL 9).
    assert not [r for r in requires if r.startswith("python(abi)")]
    glibc = [re.search(r"GLIBC_([\d.]+)", r) for r in requires]
    versions = [tuple(int(x) for x in m.group(1).split(".")) for m in glibc if m]
    assert max(versions) <= (2, 34)


def test_provides_bundled_and_hides_the_private_library(rpm_file: Path) -> None:
    provides = rpmpkg.query(rpm_file, "--provides")
    for name in ("structlog", "typing-extensions", "python-iptables"):
        assert f"bundled(python3dist({name}))" in provides
    assert "libxtwrapper" not in provides


def test_scriptlets(rpm_file: Path) -> None:
    post = rpmpkg.scriptlet(rpm_file, "POSTIN")
    preun = rpmpkg.scriptlet(rpm_file, "PREUN")
    postun = rpmpkg.scriptlet(rpm_file, "POSTUN")
    # Install: enabled through the preset (the systemd macros, or our fallback).
    assert re.search(r"preset imdsguard\.service|install-system-units imdsguard", post)
    assert "tmpfiles" in post and "imdsguard.conf" in post
    # Erase: stop and disable first, then take the rules out; never on upgrade.
    stop = re.search(r"disable --now imdsguard\.service|remove-system-units imdsguard", preun)
    remove = preun.find("/usr/bin/imdsguard remove --force")
    assert stop and remove > stop.start()
    guard = preun.rfind("if [ $1 -eq 0 ]; then", 0, remove)
    assert guard != -1 and "fi" not in preun[guard:remove].split(), "remove runs on upgrade too"
    # Upgrade: restart (gap-free: the old daemon leaves its rules on SIGTERM).
    assert re.search(r"try-restart imdsguard\.service|mark-restart-system-units imdsguard", postun)
    assert "-ge 1" in postun or "mark-restart" in postun


def test_spec_matches_the_sources(rpm_file: Path) -> None:
    spec = rpmpkg.SPEC.read_text()
    assert re.search(rf"^Version:\s+{re.escape(rpmpkg.version())}$", spec, re.M)
    pins = dict(
        re.findall(
            r"^([\w-]+)==([\d.]+) --hash",
            (rpmpkg.SPEC.parent / "vendor.txt").read_text(),
            re.M,
        )
    )
    spec_versions = {
        "structlog": re.search(r"%global structlog_version (\S+)", spec),
        "typing-extensions": re.search(r"%global typing_extensions_version (\S+)", spec),
        "python-iptables": re.search(r"%global iptables_version (\S+)", spec),
    }
    assert {k: m.group(1) for k, m in spec_versions.items() if m} == pins
    # The SRPM carries the exact sources the binary package was built from.
    srpm_files = set(rpmpkg.query(rpmpkg.source_rpm(), "-l").split())
    assert f"imdsguard-{rpmpkg.version()}.tar.gz" in srpm_files
    # spec, our tarball, three pinned dependencies, the sysusers.d file (%pre reads it)
    assert len(srpm_files) == 6


def test_size(rpm_file: Path) -> None:
    # Bundling only what AL2023 / RHEL 9 lack keeps the package small.
    assert rpm_file.stat().st_size < 1024 * 1024


def _run_launcher(payload: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Executed through its shebang, as installed: /usr/bin/python3 -I.
    return subprocess.run(
        [str(payload / "usr/bin/imdsguard"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_launcher_runs_from_the_extracted_payload(payload: Path) -> None:
    launcher = payload / "usr/bin/imdsguard"
    assert launcher.read_text().splitlines()[0] == "#!/usr/bin/python3 -I"
    version = _run_launcher(payload, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"imdsguard {rpmpkg.version()}"
    config = payload / CONFIG.lstrip("/")
    check = _run_launcher(payload, "check-config", "-c", str(config))
    assert check.returncode == 0, check.stderr
    # As root this includes the trust check: the payload's config is root's, 0644.
    assert check.stdout.startswith(f"# {config}: OK")
    assert "users:\n  - root (0)" in check.stdout  # the shipped default: root only
    # The launcher never leaves bytecode behind (/usr is rpm's, and read-only to the service).
    assert not list(payload.rglob("__pycache__"))


def test_modules_come_from_the_bundle_and_the_declared_packages(payload: Path) -> None:
    site = payload / SITE.lstrip("/")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.dont_write_bytecode = True\n"
        "import imdsguard, structlog, typing_extensions, yaml, iptc.xtables\n"
        "print(imdsguard.__file__); print(structlog.__file__); print(typing_extensions.__file__)\n"
        "print(iptc.__file__); print(iptc.xtables._lib_xtwrapper._name)\n"
        "print(yaml.__file__)\n"
    )
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", code, str(site)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    *bundled, yaml_file = proc.stdout.split()
    assert all(p.startswith(f"{site}/") for p in bundled), bundled
    assert bundled[-1] == f"{site}/libxtwrapper.so"  # version-free name, found on sys.path
    # PyYAML comes from the distribution, as the RPM's Requires say.
    assert yaml_file.startswith("/usr/lib/python3/")


def _python39() -> str | None:
    candidates = [shutil.which("python3.9"), *glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9")]
    for candidate in filter(None, candidates):
        proc = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.stdout.strip() == "True":
            return candidate
    return None


def test_payload_runs_on_python_3_9(payload: Path, tmp_path: Path) -> None:
    """AL2023 and RHEL 9 run python3.9: import every module of the bundle with it."""
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter on this host (the targets' python3)")
    # The targets' python3-pyyaml stands in as Debian's pure-Python yaml package
    # (its C accelerator is built for 3.11 and simply not used).
    system_site = tmp_path / "system-site"
    system_site.mkdir()
    yaml_dir = Path("/usr/lib/python3/dist-packages/yaml")
    if not yaml_dir.is_dir():
        pytest.skip("python3-yaml is not installed")
    (system_site / "yaml").symlink_to(yaml_dir)
    # The targets' python3-psutil (5.8 on RHEL 9): the same release from PyPI, for 3.9.
    psutil_dir = rpmpkg.REPO / "build" / "py39-psutil-5.8.0"
    if not (psutil_dir / "psutil").is_dir():
        fetched = subprocess.run(
            [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
             "--only-binary=:all:", "--target", str(psutil_dir), "psutil==5.8.0"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if fetched.returncode != 0:
            pytest.skip(f"psutil 5.8.0 for Python 3.9 unavailable: {fetched.stderr[-300:]}")
    (system_site / "psutil").symlink_to(psutil_dir / "psutil")
    site = payload / SITE.lstrip("/")
    code = (
        "import sys, importlib, pkgutil\n"
        "sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2])\n"
        "sys.dont_write_bytecode = True\n"
        "import imdsguard, iptc.xtables\n"
        "names = [m.name for m in pkgutil.walk_packages(imdsguard.__path__, 'imdsguard.')\n"
        "         if not m.name.endswith('__main__')]\n"
        "for name in names: importlib.import_module(name)\n"
        "from imdsguard.cli import main\n"
        "sys.exit(main(['check-config', '-c', sys.argv[3]]))\n"
    )
    config = payload / CONFIG.lstrip("/")
    proc = subprocess.run(
        [python, "-I", "-c", code, str(site), str(system_site), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"# {config}: OK")


def test_licenses_cover_ours_and_every_bundled_package(rpm_file: Path) -> None:
    licenses = set(rpmpkg.query(rpm_file, "--licensefiles").split())
    assert "/usr/share/licenses/imdsguard/LICENSE" in licenses
    pinned = re.findall(r"^([\w-]+)==", (rpmpkg.SPEC.parent / "vendor.txt").read_text(), re.M)
    prefix = {"structlog": "structlog.", "typing-extensions": "typing_extensions.",
              "python-iptables": "python-iptables."}  # fmt: skip
    assert set(pinned) == set(prefix), "a new bundled package needs its licence in %files"
    for name in pinned:
        assert any(f.rsplit("/", 1)[1].startswith(prefix[name]) for f in licenses), name


def test_license_is_apache_2_0(payload: Path) -> None:
    shipped = (payload / "usr/share/licenses/imdsguard/LICENSE").read_text()
    assert shipped == (rpmpkg.REPO / "LICENSE").read_text()
    assert "Apache License" in shipped and "Version 2.0, January 2004" in shipped
    assert "END OF TERMS AND CONDITIONS" in shipped


def test_spec_has_url_and_names_its_sources() -> None:
    spec = rpmpkg.SPEC.read_text()
    assert re.search(r"^URL:\s+https://\S+$", spec, re.M)
    sources = dict(re.findall(r"^Source(\d+):\s+(\S+)$", spec, re.M))
    assert all(sources[n].startswith(("https://", "%{url}/")) for n in "04"), sources
    # The bundle by its pinned file names (vendor.txt holds name, version and hash).
    vendor = (rpmpkg.SPEC.parent / "vendor.txt").read_text()
    for n, name in (("1", "structlog"), ("2", "typing_extensions"), ("3", "python_iptables")):
        assert sources[n].startswith(name + "-"), sources[n]
        assert name.replace("_", "-") in vendor.replace("_", "-"), name


def test_state_and_log_directories_are_owned(rpm_file: Path) -> None:
    dump = {line.split()[0]: line.split() for line in rpmpkg.query(rpm_file, "--dump").splitlines()}
    for path in ("/var/lib/imdsguard", "/var/log/imdsguard"):
        _path, _size, _mtime, _digest, mode, owner, group, *_ = dump[path]
        # the unit's StateDirectoryMode= / LogsDirectoryMode=: systemd never changes them
        assert (mode, owner, group) == ("040750", "root", "root"), path
    flags = dict(
        line.split(" ", 1)
        for line in rpmpkg.query(
            rpm_file, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"
        ).splitlines()
    )
    assert "g" in flags["/var/log/imdsguard/events.jsonl"]  # %ghost: erased with the package


def test_man_page_lists_every_command(payload: Path) -> None:
    import gzip

    page = gzip.decompress((payload / "usr/share/man/man1/imdsguard.1.gz").read_bytes()).decode()
    assert page.startswith(".TH IMDSGUARD 1 ")
    for command in ("run", "apply", "remove", "status", "events", "credentials", "audit",
                    "suggest", "check\\-config"):  # fmt: skip
        assert f"\n.SS {command}\n" in page, command
    assert ".SS demo" not in page  # source checkout only


def test_rpmlint_clean() -> None:
    """rpmlint with our settings (packaging/rpm/rpmlint.toml: each filter says why)."""
    rpms = [str(p) for p in (rpmpkg.REPO / "build" / "rpm" / "RPMS").glob("*/*.rpm")]
    proc = subprocess.run(
        ["rpmlint", "-c", str(rpmpkg.SPEC.parent / "rpmlint.toml"), *rpms,
         str(rpmpkg.source_rpm())],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert "0 errors, 0 warnings" in proc.stdout, proc.stdout + proc.stderr
