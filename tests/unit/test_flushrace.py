"""benchmarks.flushrace's verdicts on a recorded race (the flush-race tests rely on them)."""

from __future__ import annotations

from benchmarks.flushrace import Race


def test_uncovered_names_the_reloads_without_an_attempt() -> None:
    race = Race(attempts=3, through=[], reloads=[10.0, 11.0, 12.0], started=[10.2, 12.9, 13.5])
    assert race.uncovered() == [1]
    assert Race(2, [], [10.0, 11.0], [10.5, 11.0]).uncovered() == []
    assert Race(0, [], [10.0], []).uncovered() == [0]


def test_windows_run_from_each_reload_to_its_last_connect_through() -> None:
    race = Race(attempts=5, through=[10.01, 10.05, 12.02], reloads=[10.0, 11.0, 12.0])
    assert [round(w) for w in race.windows_ms()] == [50, 20]


def test_median_gap_is_the_client_s_typical_time_between_attempts() -> None:
    race = Race(attempts=5, through=[], started=[1.0, 1.01, 1.02, 1.05, 1.30])
    assert round(race.median_gap_ms()) == 30  # gaps 10, 10, 30, 250 ms
    assert Race(1, [], started=[1.0]).median_gap_ms() == float("inf")
