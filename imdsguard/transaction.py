"""All-or-nothing changes made of stages: each one done, or every started one undone.

The idea of firewalld's ``fail_funcs``: a change (the daemon's reload) is a
list of :class:`Stage` s, each a ``do`` and the ``undo`` that puts back what
it changed. :func:`run` does them in order; when one raises one of the
expected errors, the undos of the stages started so far (the failing one
included: it may have got half-way) run in reverse order, and the
:class:`Failure` names the stage that failed. An undo reports its own
trouble (it logs; it must not raise): a rollback that cannot finish still
runs the undos after it. When several stages need the same undo first
(put back the components before the rules they serve), each lists it
wrapped in one :func:`once`.

Errors that are not expected (a bug, MemoryError) are not caught: nothing is
undone, and the caller's own guard sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from imdsguard.errors import ImdsGuardError

__all__ = ["Failure", "Stage", "once", "run"]


@dataclass(frozen=True)
class Stage:
    """One step of a change: ``name`` (for the log), ``do``, and its ``undo`` (if any)."""

    name: str
    do: Callable[[], object]
    undo: Callable[[], object] | None = None


@dataclass(frozen=True)
class Failure:
    """Why a change did not happen: ``stage`` (its name) raised ``error``.

    ``index`` is the stage's position; ``undone`` the names of the stages
    whose undo ran, in the order they ran.
    """

    stage: str
    index: int
    error: ImdsGuardError
    undone: tuple[str, ...]


def once(undo: Callable[[], object]) -> Callable[[], None]:
    """``undo``, run by the first call only (an undo that several stages share)."""
    done = False

    def run_once() -> None:
        nonlocal done
        if not done:
            done = True
            undo()

    return run_once


def run(
    stages: Sequence[Stage],
    on_failure: Callable[[str, ImdsGuardError], object] | None = None,
) -> Failure | None:
    """Do ``stages`` in order; None when all succeeded, else the :class:`Failure`
    (after undoing, in reverse, every stage started).

    ``on_failure(stage, error)`` is called before anything is undone, so
    that a log says what failed before what was put back.
    """
    for index, stage in enumerate(stages):
        try:
            stage.do()
        except ImdsGuardError as exc:
            if on_failure is not None:
                on_failure(stage.name, exc)
            undone = []
            for started in reversed(stages[: index + 1]):
                if started.undo is not None:
                    started.undo()
                    undone.append(started.name)
            return Failure(stage.name, index, exc, tuple(undone))
    return None
