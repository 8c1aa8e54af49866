"""The wheel (what ``pip install .`` installs) carries the product alone."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import rpmpkg


def test_wheel_has_no_test_tooling(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "--disable-pip-version-check", "-w", str(tmp_path), str(rpmpkg.REPO)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("imdsguard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert "imdsguard_testing" not in tops, sorted(tops)
    assert not [n for n in names if "imds_sim" in n or n.endswith("/demo.py")]
    assert "imdsguard/daemon.py" in names and "imdsguard/py.typed" in names
