"""The golden-AMI pieces: the Image Builder component and the Packer example."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import rpmpkg
import yaml

COMPONENT = rpmpkg.REPO / "packaging" / "image-builder" / "imdsguard.yml"
PACKER = rpmpkg.REPO / "packaging" / "packer" / "imdsguard.pkr.hcl"
#: AWSTOE action modules this component may use.
ACTIONS = {"ExecuteBash", "S3Download", "CreateFile"}


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
    # IMDSv2 only, set in the one source that both architectures' builds use.
    assert text.count('source "amazon-ebs"') == 1
    assert text.count('http_tokens                 = "required"') == 1
    assert text.count('source "source.amazon-ebs.al2023" {') == 2
    # Both architectures (Graviton too), each with its own RPM.
    assert '"al2023-ami-2023.*-x86_64"' in text and '"al2023-ami-2023.*-arm64"' in text
    assert 'instance_type = "t4g.small"' in text and "var.rpm_aarch64" in text
    # Packer's HCL2 timestamp, not the legacy {{timestamp}} template function.
    assert "{{timestamp}}" not in text and "${local.timestamp}" in text
    # Balanced braces: a cheap guard against a broken HCL edit.
    assert text.count("{") - text.count("{{") * 2 == text.count("}") - text.count("}}") * 2


def _run_build_steps(tmp_path: Path, **params: str) -> tuple[int, str, Path]:
    """The build phase's steps up to WriteConfig, as AWSTOE runs them: parameters pasted in
    as text, CreateFile writes its content, ExecuteBash runs its commands."""
    import subprocess

    values = {"RpmS3Uri": "s3://my-bucket/imdsguard/imdsguard-0.1.0-1.x86_64.rpm",
              "AllowUsers": "root", "AllowGroups": "", **params}  # fmt: skip
    text = COMPONENT.read_text()
    for key, value in values.items():
        text = re.sub(r"\{\{\s*" + key + r"\s*\}\}", lambda _m, v=value: v, text)
    text = text.replace("/tmp/imdsguard-params", str(tmp_path / "params"))
    config = tmp_path / "config.yaml"
    text = text.replace("/etc/imdsguard/config.yaml", str(config))
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return 1, f"the document no longer parses: {exc}", config  # AWSTOE refuses it
    build = next(p for p in doc["phases"] if p["name"] == "build")
    for step in build["steps"]:
        if step["name"] in ("DownloadRpm", "InstallRpm"):
            continue  # the package itself is not what is tested here
        if step["action"] == "CreateFile":
            for item in step["inputs"]:
                Path(item["path"]).parent.mkdir(parents=True, exist_ok=True)
                Path(item["path"]).write_text(item["content"])
            continue
        script = "\n".join(step["inputs"]["commands"]).replace("chown root:root", "true")
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return proc.returncode, proc.stdout + proc.stderr, config
        if step["name"] == "WriteConfig":
            return 0, proc.stdout, config
    raise AssertionError("no WriteConfig step")


def test_component_quotes_validated_parameters(tmp_path: Any) -> None:
    code, out, config = _run_build_steps(tmp_path, AllowUsers="root,ec2-instance-connect,1001")
    assert code == 0, out
    doc = yaml.safe_load(config.read_text())
    users = ["root", "ec2-instance-connect", "1001"]
    assert doc == {"mode": "enforce", "allow": {"users": users, "groups": []}}


def test_component_refuses_hostile_parameters(tmp_path: Any) -> None:
    """Before, AllowUsers went into the YAML raw: 'root]\\nmode: audit' turned enforcement off."""
    canary = tmp_path / "pwned"
    for i, params in enumerate([
        {"AllowUsers": "root]\nmode: audit"},
        {"AllowUsers": f"root'; touch {canary}; '"},
        {"AllowUsers": f"root\ntouch {canary}"},
        {"AllowUsers": 'root", "mode: audit'},
        {"AllowGroups": "wheel, docker"},
        {"RpmS3Uri": "https://example.com/imdsguard.rpm"},
    ]):  # fmt: skip
        work = tmp_path / str(i)
        work.mkdir()
        code, out, config = _run_build_steps(work, **params)
        assert code != 0, (params, out)
        assert not config.exists(), params
    assert not canary.exists()


def test_component_documents_its_iam_needs() -> None:
    assert "s3:GetObject" in COMPONENT.read_text()
    assert "s3:GetObject" in (rpmpkg.REPO / "docs" / "ami.md").read_text()
