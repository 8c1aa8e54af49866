"""imdsguard.trouble: periodic failures logged at once, then rate-limited, cleared on success."""

from __future__ import annotations

from imdsguard.trouble import Trouble
from imdsguard_testing.clock import FakeClock
from imdsguard_testing.fakes import RecordingLogger


def test_first_failure_at_once_then_one_line_per_interval_with_the_count() -> None:
    clock = FakeClock()
    log = RecordingLogger()
    trouble = Trouble(log, interval=30.0, clock=clock)
    for _ in range(5):
        trouble.failed("check", "check_failed", OSError(24, "Too many open files"))
        clock.advance(1.0)
    clock.advance(30.0)
    trouble.failed("check", "check_failed", OSError(24, "Too many open files"))
    lines = [f for _, e, f in log.lines if e == "check_failed"]
    assert [f["repeated"] for f in lines] == [0, 4]
    assert trouble.failures("check") == 6
    assert trouble.reasons() and "periodic check failing (6 times" in trouble.reasons()[0]


def test_success_logs_the_recovery_once_and_a_new_failure_logs_at_once() -> None:
    clock = FakeClock()
    log = RecordingLogger()
    trouble = Trouble(log, interval=30.0, clock=clock)
    trouble.failed("publish", "state_write_failed", MemoryError())
    assert trouble.ok("publish") and not trouble.ok("publish")
    clock.advance(1.0)  # well inside the interval: still a new spell of trouble
    trouble.failed("publish", "state_write_failed", MemoryError())
    events = [e for _, e, _ in log.lines]
    assert events == ["state_write_failed", "periodic_recovered", "state_write_failed"]
    assert trouble.failures("publish") == 1
