"""The event schema is one type, and the README's table of event fields matches it."""

from __future__ import annotations

import re
from pathlib import Path

from imdsguard.events.event import EVENT_FIELDS, FORWARDED_FIELDS, Event

README = Path(__file__).resolve().parents[3] / "README.md"


def _readme_fields() -> list[str]:
    """The field names in the first column of the README's event table, in order."""
    section = README.read_text().split("## Who was blocked: events", 1)[1].split("\n## ", 1)[0]
    names: list[str] = []
    for line in section.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`(\w+)`", line.split("|")[1])
    return names


def test_readme_table_lists_exactly_the_event_fields_in_order() -> None:
    assert _readme_fields() == list(EVENT_FIELDS)


def test_only_the_forwarded_fields_are_optional() -> None:
    assert set(FORWARDED_FIELDS) == {"src", "iface"} == Event.__optional_keys__
    assert set(EVENT_FIELDS) == Event.__required_keys__ | Event.__optional_keys__
