"""The user-data secret scanner: kinds and lines, never values."""

from __future__ import annotations

import gzip

import pytest

from imdsguard.audit import scan_secrets

KEY_ID = "AKIA" + "ABCDEFGHIJKLMNOP"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (f"export AWS_ACCESS_KEY_ID={KEY_ID}", "AWS access key id"),
        (f"aws_secret_access_key = {SECRET}", "AWS secret access key"),
        ("-----BEGIN RSA PRIVATE KEY-----", "private key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
        ("GH=ghp_" + "a" * 36, "GitHub token"),
        ("SLACK=xoxb-1234567890-abcdefghij", "Slack token"),
        ("DB_PASSWORD=hunter2hunter2", "password or token assignment"),
        ('  "api_key": "0123456789abcdef"', "password or token assignment"),
    ],
)
def test_each_kind_is_found_with_its_line(line: str, kind: str) -> None:
    data = f"#!/bin/bash\necho hello\n{line}\n".encode()
    assert scan_secrets(data) == [(kind, 3)]


@pytest.mark.parametrize(
    "line",
    [
        "password=${DB_PASSWORD}",  # a reference, not a value
        "token=<set me>",
        "echo 'no secrets here'",
        "PASSWORD_FILE=/run/secrets/x",
    ],
)
def test_references_and_plain_text_are_not_secrets(line: str) -> None:
    assert scan_secrets(line.encode()) == []


def test_gzipped_user_data_is_opened() -> None:
    assert scan_secrets(gzip.compress(f"x\n{KEY_ID}\n".encode())) == [("AWS access key id", 2)]


def test_clean_user_data() -> None:
    assert scan_secrets(b"#cloud-config\npackages: [nginx]\n") == []
