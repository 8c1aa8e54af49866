"""The event log: append, rotation, counting across rotation, reading, following, escaping."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from imdsguard.events.event import SUMMARY
from imdsguard.events.log import (
    RETAIN_PER_UID,
    EventLog,
    EventLogError,
    count_events,
    event_lines,
    follow,
    read_events,
    serialize,
)
from imdsguard.events.render import console_processor, escape, format_console

HOSTILE = 'x\n{"event":"imds_access_blocked","user":"root"}\x1b[2J\x1b]0;pwned\x07\u202eevil\r'


def ev(i: int, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": "imds_access_blocked",
        "timestamp": "2024-05-01T12:00:00.000Z",
        "mode": "enforce",
        "family": "ipv4",
        "dst": "169.254.169.254",
        "dport": 80,
        "uid": 1001,
        "user": "alice",
        "gid": 1001,
        "pid": 1000 + i,
        "ppid": 1,
        "exe": "/usr/bin/curl",
        "cmdline": ["curl", f"http://169.254.169.254/{i}"],
        "comm": "curl",
        "ancestors": [{"pid": 1, "comm": "systemd", "exe": "/usr/lib/systemd/systemd"}],
        "unit": None,
        "container": None,
        "attempts": 1,
        "attributed": True,
        "imds_version": "unknown",
    }
    event.update(extra)
    return event


def test_serialize_puts_event_first_and_escapes() -> None:
    line = serialize({"pid": 1, "event": "imds_access_blocked", "comm": HOSTILE})
    assert line.startswith('{"event":"imds_access_blocked",')
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert line.isascii()
    assert json.loads(line)["comm"] == HOSTILE


def test_append_mode_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "log" / "events.jsonl"
    log = EventLog(str(path))
    log.append(ev(1, cmdline=[HOSTILE]))
    log.append(ev(2))
    log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["cmdline"] == [HOSTILE]


def test_refuses_symlink_and_hardlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("precious\n")
    link = tmp_path / "events.jsonl"
    link.symlink_to(target)
    with pytest.raises(EventLogError, match="symlink"):
        EventLog(str(link)).append(ev(1))
    link.unlink()
    os.link(target, link)
    with pytest.raises(EventLogError, match="hard links"):
        EventLog(str(link)).append(ev(1))
    assert target.read_text() == "precious\n"


def test_rotation_caps_size_and_keeps_one_generation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), max_bytes=4096, keep=1)
    for i in range(200):
        log.append(ev(i))
    log.close()
    assert path.stat().st_size <= 4096
    # The oldest generation also carries each user's last events over (bounded).
    assert (tmp_path / "events.jsonl.1").stat().st_size <= 4096 + RETAIN_PER_UID * 500
    assert not (tmp_path / "events.jsonl.2").exists()
    # Every line in every file is whole.
    for name in ("events.jsonl", "events.jsonl.1"):
        for line in (tmp_path / name).read_text().splitlines():
            json.loads(line)


def test_count_survives_rotation(tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    log = EventLog(path, max_bytes=2048, keep=1)
    for i in range(120):
        log.append(ev(i))
        if i % 10 == 0:
            log.append({"event": SUMMARY, "total": 5, "top": []})  # not an attempt
    assert count_events(path) == 120
    reopened = EventLog(path, max_bytes=2048, keep=1)  # a daemon restart
    for i in range(30):
        reopened.append(ev(i))
    assert count_events(path) == 150


def test_count_of_missing_log_is_zero(tmp_path: Path) -> None:
    assert count_events(str(tmp_path / "nothing.jsonl")) == 0
    assert read_events(str(tmp_path / "nothing.jsonl"), 5) == []


def test_read_events_newest_last_across_generations(tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    log = EventLog(path, max_bytes=3000, keep=1)
    for i in range(12):
        log.append(ev(i))
    assert os.path.exists(path + ".1")
    got = read_events(path, 8)
    assert [e["pid"] for e in got] == [1000 + i for i in range(4, 12)]
    assert [e["pid"] for e in read_events(path, 1)] == [1011]
    assert read_events(path, 0) == []


def test_read_events_skips_junk_and_summaries(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path))
    log.append(ev(1))
    log.append({"event": SUMMARY, "total": 3, "top": []})
    log.close()
    with open(path, "a") as fh:
        fh.write("not json\n[1,2]\n")
    assert [e["pid"] for e in read_events(str(path), 10)] == [1001]
    kinds = [e["event"] for e in read_events(str(path), 10, summaries=True)]
    assert kinds == ["imds_access_blocked", SUMMARY]


def test_read_events_large_file_reads_only_the_tail(tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    log = EventLog(path, max_bytes=50 * 1024 * 1024)
    for i in range(3000):
        log.append(ev(i))
    assert [e["pid"] for e in read_events(path, 3)] == [3997, 3998, 3999]


def test_follow_sees_new_events_across_rotation(tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    log = EventLog(path, max_bytes=2500, keep=1)
    log.append(ev(0))  # before following: not reported
    seen: list[int] = []
    done = threading.Event()

    def reader() -> None:
        for event in follow(path, poll=0.01, stop=done.is_set):
            seen.append(event["pid"])
            if len(seen) == 10:
                done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.1)
    for i in range(1, 11):
        log.append(ev(i))
        time.sleep(0.01)
    thread.join(timeout=5)
    done.set()
    assert seen == [1000 + i for i in range(1, 11)]


def test_follow_waits_for_the_file_to_appear(tmp_path: Path) -> None:
    path = str(tmp_path / "later.jsonl")
    out: list[dict[str, Any]] = []
    done = threading.Event()

    def reader() -> None:
        for event in follow(path, poll=0.01, stop=done.is_set):
            out.append(event)
            done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.1)  # the reader is waiting for a file that does not exist yet
    EventLog(path).append(ev(5))
    thread.join(timeout=5)
    done.set()
    assert [e["pid"] for e in out] == [1005]


def test_escape() -> None:
    assert escape("plain text /usr/bin/curl") == "plain text /usr/bin/curl"
    assert escape("a\nb") == "a\\nb"
    assert escape("\x1b[31mred") == "\\x1b[31mred"
    assert escape("\u202eevil") == "\\u202eevil"
    assert escape("back\\slash") == "back\\\\slash"
    assert escape("\x9b") == "\\x9b"  # C1 CSI
    assert escape("naïve café") == "naïve café"


def test_format_console_is_one_escaped_line() -> None:
    event = ev(1, cmdline=["python3", "-c", HOSTILE], comm=HOSTILE[:15], exe="/tmp/\x1bx")
    line = format_console(event)
    assert "\n" not in line and "\r" not in line
    assert all(ch.isprintable() for ch in line)
    assert "\\x1b[2J" in line and "\\u202e" in line
    assert "BLOCKED" in line and "uid=1001(alice)" in line and "pid=1001" in line
    assert "parents: systemd(1)" in line


def test_format_console_audit_ipv6_unattributed() -> None:
    event = ev(
        1,
        event="imds_access_audited",
        family="ipv6",
        dst="fd00:ec2::254",
        imds_version="v1",
        attributed=False,
        pid=None,
        attempts=3,
        ancestors=[],
    )
    line = format_console(event)
    assert line.startswith("2024-05-01T12:00:00.000Z AUDITED [fd00:ec2::254]:80 ")
    assert "imds=v1" in line and "attempts=3" in line and "(process not found)" in line


def test_format_console_summary_and_other_lines() -> None:
    summary = {
        "event": SUMMARY,
        "timestamp": "t",
        "total": 7,
        "top": [{"uid": 1, "exe": "/x\n", "count": 7}],
    }
    assert format_console(summary) == "t SUPPRESSED 7 events (uid=1 exe=/x\\n x7)"
    assert format_console({"event": "other\x1b", "k": "v\n"}) == "other\\x1b k=v\\n"


def test_console_processor_escapes_nested_strings() -> None:
    out = console_processor(None, "info", {"event": "e", "cmdline": [HOSTILE], "n": 3})
    assert out["n"] == 3
    assert "\x1b" not in out["cmdline"][0] and "\n" not in out["cmdline"][0]


def test_read_events_looks_past_many_other_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    log = EventLog(path)
    log.append(ev(1))
    for _ in range(500):
        log.append({"event": SUMMARY, "total": 1, "top": []})
    assert [e["pid"] for e in read_events(path, 3)] == [1001]


def test_event_lines_json_console_and_follow(tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    log = EventLog(path)
    for i in range(5):
        log.append(ev(i, comm=HOSTILE))
    as_json = list(event_lines(path, 2, as_json=True))
    assert [json.loads(line)["pid"] for line in as_json] == [1003, 1004]
    assert all(line.isascii() and "\n" not in line for line in as_json)
    console = list(event_lines(path, 1))
    assert len(console) == 1 and "BLOCKED" in console[0] and "\x1b" not in console[0]

    got: list[str] = []
    lines = event_lines(
        path, 1, as_json=True, follow_new=True, poll=0.01, stop=lambda: len(got) > 2
    )
    got.append(next(lines))  # the tail is read now: what comes next must be followed
    log.append(ev(5))
    log.append(ev(6))
    got += [next(lines), next(lines)]
    assert [json.loads(line)["pid"] for line in got] == [1004, 1005, 1006]


def test_event_lines_without_a_log(tmp_path: Path) -> None:
    assert list(event_lines(str(tmp_path / "none.jsonl"), 5)) == []


def test_console_processor_in_front_of_structlogs_console_renderer() -> None:
    import io

    import structlog

    out = io.StringIO()
    logger = structlog.wrap_logger(
        structlog.PrintLogger(file=out),
        processors=[console_processor, structlog.dev.ConsoleRenderer(colors=False)],
    )
    logger.info("imds_access_blocked", comm=HOSTILE, cmdline=[HOSTILE], exe="/tmp/\x1b[31m")
    text = out.getvalue()
    assert text.count("\n") == 1 and "\x1b" not in text and "\r" not in text


def test_one_user_flooding_cannot_rotate_another_users_events_away(tmp_path: Path) -> None:
    """Measured before: a flood rotated events.jsonl twice and took bob's attempt with it."""
    path = str(tmp_path / "events.jsonl")
    log = EventLog(path, max_bytes=8192, keep=1)
    log.append(ev(0, uid=1002, user="bob", exe="/usr/bin/curl"))
    log.append(ev(1, uid=1002, user="bob", exe="/usr/bin/wget"))
    for i in range(3000):  # dozens of rotations
        log.append(ev(i, exe=f"/tmp/py{i}"))
        if i % 500 == 0:
            log.append({"event": SUMMARY, "total": 5, "top": []})
    log.close()
    everything = read_events(path, n=100_000)
    bobs = [e for e in everything if e["uid"] == 1002]
    assert [e["exe"] for e in bobs] == ["/usr/bin/curl", "/usr/bin/wget"]
    alices = [e for e in everything if e["uid"] == 1001]
    assert alices[-1]["exe"] == "/tmp/py2999"  # the flooder's newest are there too
    # Bounded: the two files, plus what was carried over.
    size = sum(os.path.getsize(p) for p in (path, path + ".1"))
    assert size <= 2 * 8192 + 2 * RETAIN_PER_UID * 400
    assert count_events(path) == 3002  # carried-over lines are counted once
    # Order in the oldest file is still oldest first.
    with open(path + ".1") as fh:
        pids = [json.loads(line).get("pid") for line in fh]
    assert pids[:2] == [1000, 1001]


def test_retention_keeps_each_users_last_events_only(tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    log = EventLog(path, max_bytes=4096, keep=1, retain_per_uid=3, retain_uids=2)
    for uid in (2001, 2002, 2003):  # three quiet users, then a flood
        for i in range(5):
            log.append(ev(i, uid=uid))
    for i in range(600):
        log.append(ev(i, uid=1001))
    log.close()
    uids = [e["uid"] for e in read_events(path, n=100_000)]
    # Only the two most recently seen owners are carried (the flooder and 2003).
    assert 2001 not in uids and 2002 not in uids
    assert uids.count(2003) == 3
