"""imdsguard.cgroups on a temporary tree: unit names, path -> level, lookup, the watcher."""

from __future__ import annotations

import os
import select
from pathlib import Path

import pytest

from imdsguard import cgroups
from imdsguard.cgroups import UnitCgroup, level, resolve
from imdsguard.firewall.nftables import render
from imdsguard.policy import RuleSet


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("system.slice/foo.service", 2),
        ("/system.slice/foo.service/", 2),
        ("foo.service", 1),
        ("user.slice/user-1000.slice/user@1000.service", 3),
        ("", 0),
    ],
)
def test_level_is_the_depth_of_the_path(path: str, expected: int) -> None:
    assert level(path) == expected
    assert UnitCgroup("u", path, 1).level == expected


@pytest.mark.parametrize(
    "name", ["a.service", "foo@bar.service", "session-3.scope", "app-web.slice", "a:b_c.d.service"]
)
def test_valid_unit_names(name: str) -> None:
    assert cgroups.unit_name_problem(name) is None


def _tree(root: Path) -> None:
    for rel in (
        "system.slice/amazon-ssm-agent.service",
        "system.slice/system-getty.slice/getty@tty1.service",
        "app.slice/app-web.slice/web.service",
        "user.slice/user-1000.slice/user@1000.service/app.slice/evil.service",
        "init.scope",
    ):
        (root / rel).mkdir(parents=True)


def test_resolve_finds_units_in_slices_only(tmp_path: Path) -> None:
    _tree(tmp_path)
    units = [
        "amazon-ssm-agent.service",
        "getty@tty1.service",
        "web.service",
        "app-web.slice",
        "init.scope",
        "evil.service",  # below a delegated service: a user could have named it so
        "absent.service",
    ]
    found = resolve(units, root=str(tmp_path))
    paths = {u: (cg.path if cg else None) for u, cg in found.items()}
    assert paths == {
        "amazon-ssm-agent.service": "system.slice/amazon-ssm-agent.service",
        "getty@tty1.service": "system.slice/system-getty.slice/getty@tty1.service",
        "web.service": "app.slice/app-web.slice/web.service",
        "app-web.slice": "app.slice/app-web.slice",
        "init.scope": "init.scope",
        "evil.service": None,
        "absent.service": None,
    }
    cg = found["amazon-ssm-agent.service"]
    assert cg is not None
    assert cg.inode == os.stat(tmp_path / cg.path).st_ino


def test_a_restart_is_a_new_inode_and_a_stop_is_none(tmp_path: Path) -> None:
    _tree(tmp_path)
    unit = "amazon-ssm-agent.service"
    first = resolve([unit], root=str(tmp_path))
    path = tmp_path / "system.slice" / unit
    path.rmdir()
    gone = resolve([unit], root=str(tmp_path), known=first, search=False)
    assert gone == {unit: None}
    (tmp_path / "system.slice" / "keep").mkdir()  # the freed inode is not reused at once
    path.mkdir()
    again = resolve([unit], root=str(tmp_path), known=first, search=False)
    cg_first, cg_again = first[unit], again[unit]
    assert cg_first is not None and cg_again is not None
    assert cg_again.path == cg_first.path and cg_again.inode != cg_first.inode


def test_watcher_reports_a_unit_starting_and_a_new_slice(tmp_path: Path) -> None:
    _tree(tmp_path)
    watcher = cgroups.Watcher(["late.service"], root=str(tmp_path))
    try:
        assert not watcher.changed()
        (tmp_path / "system.slice" / "other.service").mkdir()  # not ours: ignored
        assert not watcher.changed()
        (tmp_path / "new.slice").mkdir()
        assert select.select([watcher], [], [], 2)[0]
        assert watcher.changed()
        (tmp_path / "new.slice" / "late.service").mkdir()  # watched since the rescan
        assert select.select([watcher], [], [], 2)[0]
        assert watcher.changed()
        (tmp_path / "new.slice" / "late.service").rmdir()
        assert select.select([watcher], [], [], 2)[0]
        assert watcher.changed()
    finally:
        watcher.close()


def test_nft_level_counts_from_the_kernels_root() -> None:
    """In a container's cgroup namespace (nspawn: /payload) the level is shifted."""
    ruleset = RuleSet(
        endpoints_v4=("169.254.169.254",),
        endpoints_v6=(),
        allow_uids=(),
        allow_gids=(),
        allow_units=("a.service",),
        allow_cgroups=(("a.service", "system.slice/a.service", 7),),
    )
    assert 'level 2 "system.slice/a.service"' in render(ruleset, {}).texts[0]
    assert 'level 3 "system.slice/a.service"' in render(ruleset, {}, cgroup_offset=1).texts[0]
    # The comments (what inspection compares) do not depend on the depth: `status`
    # checks the daemon's rules without measuring it.
    assert render(ruleset, {}).rules["units"] == render(ruleset, {}, cgroup_offset=1).rules["units"]
    # Configured but not running: the chain and its jump exist, with no rule in it.
    stopped = render(RuleSet(("169.254.169.254",), (), (), (), allow_units=("a.service",)), {})
    assert "units" in stopped.chains and stopped.texts == []


def test_own_path(tmp_path: Path) -> None:
    f = tmp_path / "cgroup"
    f.write_text("1:name=systemd:/x\n0::/system.slice/imdsguard.service\n")
    assert cgroups.own_path(str(f)) == "system.slice/imdsguard.service"
    assert cgroups.own_path(str(tmp_path / "none")) == ""


@pytest.mark.parametrize(
    "lookalike",
    [
        # A user's own manager (Delegate=yes): any name, even a slice named like the system's.
        "user.slice/user-1000.slice/user@1000.service/system.slice/amazon-ssm-agent.service",
        "user.slice/user-1000.slice/user@1000.service/amazon-ssm-agent.service",
        # A container's own systemd below its delegated unit (nspawn's payload, a pod's scope).
        "machine.slice/systemd-nspawn@c.service/payload/system.slice/amazon-ssm-agent.service",
        "kubepods.slice/kubepods-pod1.slice/cri-containerd-1.scope/system.slice/"
        "amazon-ssm-agent.service",
    ],
)
def test_a_delegated_lookalike_is_never_the_unit(tmp_path: Path, lookalike: str) -> None:
    """While the real unit is stopped (or restarting), a same-named cgroup that its owner
    made below a delegated unit is not found, by a search or from the last answer."""
    (tmp_path / "system.slice").mkdir()
    (tmp_path / lookalike).mkdir(parents=True)
    unit = "amazon-ssm-agent.service"
    assert resolve([unit], root=str(tmp_path)) == {unit: None}
    (tmp_path / "system.slice" / unit).mkdir()
    running = resolve([unit], root=str(tmp_path))
    cg = running[unit]
    assert cg is not None and cg.path == f"system.slice/{unit}"
    (tmp_path / "system.slice" / unit).rmdir()
    assert resolve([unit], root=str(tmp_path), known=running) == {unit: None}
