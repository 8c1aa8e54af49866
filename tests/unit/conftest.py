"""Fixtures shared by the unit tests: a hand-moved clock and simulators on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable

import pytest

from imdsguard_testing.clock import FakeClock
from imdsguard_testing.imds_sim import ImdsSimulator, SimConfig

#: ``start_sim(config, host="127.0.0.1", clock=None)``: the simulator and its base URL.
StartSim = Callable[..., "tuple[ImdsSimulator, str]"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def start_sim() -> Iterator[StartSim]:
    """Serve simulators on loopback, port 0; all are shut down after the test."""
    sims: list[ImdsSimulator] = []

    def start(
        config: SimConfig, host: str = "127.0.0.1", clock: Callable[[], float] | None = None
    ) -> tuple[ImdsSimulator, str]:
        sim = ImdsSimulator(config, clock=clock)
        [(bound, port)] = sim.serve([(host, 0)])
        sims.append(sim)
        return sim, f"http://[{bound}]:{port}" if ":" in bound else f"http://{bound}:{port}"

    yield start
    for sim in sims:
        sim.shutdown()
