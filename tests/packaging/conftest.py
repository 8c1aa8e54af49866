"""Fixtures for the packaging tests, and the figures ``make test`` prints at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import rpmpkg


@pytest.fixture(scope="session")
def rpm_file() -> Path:
    """The binary RPM, built once per session."""
    path = rpmpkg.build_rpm()
    rpmpkg.FIGURES["rpm"] = f"{path.name}: {path.stat().st_size / 1024:.0f} KiB"
    return path


@pytest.fixture(scope="session")
def payload(rpm_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The RPM's payload extracted into a temporary root."""
    root = tmp_path_factory.mktemp("payload")
    rpmpkg.extract(rpm_file, root)
    return root


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the RPM size and the unit's exposure score with the test results."""
    if rpmpkg.FIGURES:
        terminalreporter.write_sep("-", "packaging")
        for key, value in sorted(rpmpkg.FIGURES.items()):
            terminalreporter.write_line(f"{key}: {value}")
