"""The golden-AMI pieces: the Image Builder component and the Packer example."""

from __future__ import annotations

import re
from typing import Any

import rpmpkg
import yaml

COMPONENT = rpmpkg.REPO / "packaging" / "image-builder" / "imdsguard.yml"
PACKER = rpmpkg.REPO / "packaging" / "packer" / "imdsguard.pkr.hcl"
#: AWSTOE action modules this component may use.
ACTIONS = {"ExecuteBash", "S3Download"}


def _component() -> dict[str, Any]:
    doc = yaml.safe_load(COMPONENT.read_text())
    assert isinstance(doc, dict)
    return doc


def _commands(phase: dict[str, Any]) -> str:
    return "\n".join(
        cmd for step in phase["steps"] if step["action"] == "ExecuteBash"
        for cmd in step["inputs"]["commands"]
    )  # fmt: skip


def test_component_structure() -> None:
    doc = _component()
    assert doc["name"] == "imdsguard"
    assert str(doc["schemaVersion"]) == "1.0"
    phases = {p["name"]: p for p in doc["phases"]}
    assert list(phases) == ["build", "validate", "test"]
    for phase in phases.values():
        names = [s["name"] for s in phase["steps"]]
        assert len(names) == len(set(names)), "step names must be unique within a phase"
        for step in phase["steps"]:
            assert re.fullmatch(r"[A-Za-z0-9]+", step["name"])
            assert step["action"] in ACTIONS
            if step["action"] == "ExecuteBash":
                commands = step["inputs"]["commands"]
                assert commands[0] == "set -euo pipefail"  # a failing command fails the step
    # Every {{ parameter }} used is declared.
    declared = {name for p in doc["parameters"] for name in p}
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", COMPONENT.read_text()))
    assert used <= declared, used - declared


def test_component_phases_do_what_the_ami_needs() -> None:
    phases = {p["name"]: p for p in _component()["phases"]}
    build = _commands(phases["build"])
    assert "dnf install -y /tmp/imdsguard.rpm" in build
    assert "systemctl enable imdsguard.service" in build
    assert "systemctl start" not in build  # first started on the image's own boot
    assert "rm -rf /var/lib/imdsguard /var/log/imdsguard /run/imdsguard" in build
    validate = _commands(phases["validate"])
    assert "imdsguard check-config" in validate
    test = _commands(phases["test"])
    assert "imdsguard status" in test
    assert "sudo -u nobody curl" in test
    assert "network-pre.target" in test


def test_packer_example() -> None:
    text = PACKER.read_text()
    assert 'source "amazon-ebs"' in text
    assert 'provisioner "file"' in text and 'provisioner "shell"' in text
    for needed in (
        "dnf install -y /tmp/imdsguard.rpm",
        "imdsguard check-config",
        "systemctl enable imdsguard.service",
        "rm -rf /var/lib/imdsguard /var/log/imdsguard /run/imdsguard",
    ):
        assert needed in text
    assert 'http_tokens                 = "required"' in text
    # Balanced braces: a cheap guard against a broken HCL edit.
    assert text.count("{") - text.count("{{") * 2 == text.count("}") - text.count("}}") * 2
