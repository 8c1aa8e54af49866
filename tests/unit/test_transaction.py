"""imdsguard.transaction: stages done in order, the started ones undone in reverse."""

from __future__ import annotations

import pytest

from imdsguard import transaction
from imdsguard.errors import ConfigError, ImdsGuardError
from imdsguard.transaction import Stage


def _stages(trail: list[str], failing: str | None = None) -> list[Stage]:
    def do(name: str) -> None:
        trail.append(f"do {name}")
        if name == failing:
            raise ImdsGuardError(f"{name} broke")

    return [
        Stage(name, lambda n=name: do(n), (lambda n=name: trail.append(f"undo {n}")))
        for name in ("a", "b", "c")
    ]


def test_all_stages_done_nothing_undone() -> None:
    trail: list[str] = []
    assert transaction.run(_stages(trail)) is None
    assert trail == ["do a", "do b", "do c"]


@pytest.mark.parametrize(
    ("failing", "undone"), [("a", ("a",)), ("b", ("b", "a")), ("c", ("c", "b", "a"))]
)
def test_a_failing_stage_undoes_the_started_ones_in_reverse(
    failing: str, undone: tuple[str, ...]
) -> None:
    trail: list[str] = []
    seen: list[tuple[str, str]] = []
    failure = transaction.run(
        _stages(trail, failing), on_failure=lambda stage, exc: seen.append((stage, str(exc)))
    )
    assert failure is not None
    assert (failure.stage, failure.undone) == (failing, undone)
    assert str(failure.error) == f"{failing} broke"
    assert seen == [(failing, f"{failing} broke")]  # reported before the undos ran
    assert trail[-len(undone) :] == [f"undo {n}" for n in undone]
    assert "do c" not in trail[: trail.index(f"do {failing}")]


def test_stage_without_undo_and_a_shared_once() -> None:
    trail: list[str] = []
    back = transaction.once(lambda: trail.append("back"))

    def boom() -> None:
        raise ConfigError("/etc/x", "bad")

    failure = transaction.run(
        [Stage("load", lambda: None), Stage("one", lambda: None, back), Stage("two", boom, back)]
    )
    assert failure is not None and failure.index == 2
    assert failure.undone == ("two", "one") and trail == ["back"]


def test_unexpected_errors_are_not_caught_or_undone() -> None:
    trail: list[str] = []

    def bug() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        transaction.run([Stage("a", lambda: None, lambda: trail.append("undo")), Stage("b", bug)])
    assert trail == []
