"""What the docs tell operators to paste must match what imdsguard writes."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from imdsguard._time import rfc3339
from imdsguard.events.attribution import Attribution
from imdsguard.events.capture import build_event
from imdsguard.events.packet import IPPROTO_TCP, TCP_SYN, Packet

DOCS = Path(__file__).resolve().parents[2] / "docs"
README = DOCS.parent / "README.md"


def _cloudwatch_example() -> dict[str, str]:
    text = (DOCS / "fleet.md").read_text()
    block = text.split("**CloudWatch agent**", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    entry: dict[str, str] = json.loads(block)["logs"]["logs_collected"]["files"]["collect_list"][0]
    return entry


def test_cloudwatch_agent_timestamp_format_parses_our_lines() -> None:
    """The agent's own translation (strftime codes to a Go layout plus a regex; %f is
    three digits) applied to fleet.md's example must find and read our timestamp."""
    entry = _cloudwatch_example()
    fmt = entry["timestamp_format"]
    assert entry.get("timezone") == "UTC"
    regex = re.escape(fmt)
    for code, pattern in {"%Y": r"\d{4}", "%m": r"\d{2}", "%d": r"\d{2}", "%H": r"\d{2}",
                          "%M": r"\d{2}", "%S": r"\d{2}", "%f": r"\d{1,9}"}.items():  # fmt: skip
        regex = regex.replace(re.escape(code), pattern)
    stamp = rfc3339(1796174521.389)
    line = json.dumps({"event": "imds_access_blocked", "timestamp": stamp, "uid": 1000})
    found = re.search(regex, line)
    assert found and found.group(0) == stamp
    # The Go layout needs exactly three fractional digits: what we write.
    assert re.fullmatch(r".*\.\d{3}Z", stamp)
    parsed = datetime.strptime(found.group(0), fmt).replace(tzinfo=timezone.utc)
    assert abs(parsed.timestamp() - 1796174521.389) < 0.001


def test_relative_links_in_readme_and_docs_resolve() -> None:
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_readme_architecture_section_points_to_the_details() -> None:
    text = README.read_text()
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    # Near the top, after the quick start, before the operator's install steps.
    assert (
        sections.index("Architecture")
        == sections.index("Quick start (try it on a fresh Debian 12, as root)") + 1
    )
    body = text.split("## Architecture\n", 1)[1].split("\n## ", 1)[0]
    assert "(docs/architecture.md)" in body and "(docs/contract.md)" in body


def test_readme_event_example_has_the_event_fields_in_their_order() -> None:
    text = README.read_text()
    example = text.split("## Who was blocked: events", 1)[1].split("```json", 1)[1]
    keys = list(dict.fromkeys(re.findall(r'"(\w+)":', example.split("```", 1)[0])))
    syn = Packet("ipv4", IPPROTO_TCP, "192.0.2.1", "169.254.169.254", 40000, 80, TCP_SYN)
    assert keys == list(build_event("enforce", syn, Attribution(), 1.0))
