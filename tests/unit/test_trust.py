"""imdsguard.trust: "only root can change this path", as config and broker ask it."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from imdsguard.broker.peer import exe_trust_problem
from imdsguard.config import check_trust
from imdsguard.errors import ConfigError
from imdsguard.trust import root_only_problem, untrusted

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: files must be root's, and lchown to another user"
)
NOBODY = 65534


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    """tmp_path (0755), provided every directory above it is root's alone."""
    for directory in (tmp_path, *tmp_path.parents):
        st = directory.stat()
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
        if st.st_uid != 0 or writable:
            pytest.skip(f"{directory} is not root's alone")
    tmp_path.chmod(0o755)
    return tmp_path


def _file(directory: Path, name: str = "app") -> Path:
    path = directory / name
    shutil.copy2(os.path.realpath(sys.executable), path)
    path.chmod(0o755)
    return path


def _dir(parent: Path, name: str, mode: int = 0o755) -> Path:
    directory = parent / name
    directory.mkdir()
    directory.chmod(mode)
    return directory


def _config_refuses(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        check_trust(str(path))
    return str(info.value)


def test_root_file_in_root_directories_passes_both(root_dir: Path) -> None:
    path = _file(_dir(root_dir, "bin"))
    link = root_dir / "link"
    link.symlink_to(path)  # root's symlink in a root directory
    for given in (path, link):
        problem, st = untrusted(str(given))
        assert problem is None and st is not None and os.path.samestat(st, os.stat(path))
        assert exe_trust_problem(str(given)) is None
        check_trust(str(given))


def test_group_writable_parent_is_refused_by_both(root_dir: Path) -> None:
    directory = _dir(root_dir, "bin", 0o775)
    path = _file(directory)
    problem, st = untrusted(str(path))
    assert problem is not None and st is None
    assert (problem.kind, problem.entry) == ("directory", str(directory))
    assert f"directory {directory} " in _config_refuses(path)
    assert "others could replace the binary" in (exe_trust_problem(str(path)) or "")


def test_symlink_owned_by_another_user_is_refused_by_both(root_dir: Path) -> None:
    """Behaviour fix for the broker: it resolved the path and never looked at link owners."""
    target = _file(_dir(root_dir, "bin"))
    link = root_dir / "app"
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)  # the target stays root's
    assert os.stat(target).st_uid == 0
    problem, _ = untrusted(str(link))
    assert problem is not None and (problem.kind, problem.entry) == ("symlink", str(link))
    assert f"symlink {link} " in _config_refuses(link)
    exe_problem = exe_trust_problem(str(link))
    assert exe_problem is not None and f"symlink {link} " in exe_problem
    assert f"owned by uid {NOBODY}" in exe_problem


def test_a_hop_in_a_chain_owned_by_another_user_is_refused(root_dir: Path) -> None:
    target = _file(_dir(root_dir, "bin"))
    hop = root_dir / "hop"
    hop.symlink_to(target)
    os.lchown(hop, NOBODY, NOBODY)
    given = root_dir / "given"
    given.symlink_to("hop")  # root's; the hop it leads through is not
    problem, _ = untrusted(str(given))
    assert problem is not None and problem.entry == str(hop)
    assert f"symlink {hop} " in (exe_trust_problem(str(given)) or "")


def test_sticky_directory_holds_a_config_but_not_an_allowed_exe(root_dir: Path) -> None:
    tmp = _dir(root_dir, "tmp", 0o1777)
    path = _file(tmp)
    check_trust(str(path))  # only root can swap root's entries of a sticky directory
    assert root_only_problem(str(path))[0] is None
    assert "others could replace the binary" in (exe_trust_problem(str(path)) or "")
    # A sticky directory above the one that holds the file is fine for both.
    inner = _file(_dir(tmp, "bin"))
    check_trust(str(inner))
    assert exe_trust_problem(str(inner)) is None


def test_symlink_loop_stops_at_the_kernels_hop_limit(root_dir: Path) -> None:
    (root_dir / "a").symlink_to("b")
    (root_dir / "b").symlink_to("a")
    assert "too many symlinks" in (root_only_problem(str(root_dir / "a"))[0] or "")
    assert "too many symlinks" in (exe_trust_problem(str(root_dir / "a")) or "")
    # 40 hops resolve, as in the kernel; 41 do not.
    target = _file(root_dir)
    previous = target.name
    for i in range(41):
        (root_dir / f"l{i}").symlink_to(previous)
        previous = f"l{i}"
    assert untrusted(str(root_dir / "l39"))[0] is None
    assert "too many symlinks" in (exe_trust_problem(str(root_dir / "l40")) or "")


def test_missing_path_is_a_problem_not_a_crash(root_dir: Path) -> None:
    problem, _ = untrusted(str(root_dir / "nope"))
    assert problem is not None and problem.kind == "lookup"
    assert "cannot stat" in (exe_trust_problem(str(root_dir / "nope")) or "")
