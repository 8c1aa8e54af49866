"""Shared pytest configuration."""

from __future__ import annotations

import os

import pytest


def in_test_vm() -> bool:
    """True inside ``make test-vm`` (a stock distribution kernel, see tests/vm/run.sh)."""
    return os.environ.get("IMDSGUARD_TEST_VM") == "1"


def require_kernel(feature: str, present: bool) -> None:
    """Skip a test that needs a kernel ``feature`` this kernel lacks, except in the test VM.

    ``make test-vm`` boots a kernel chosen because it has every feature the
    kernel-marked tests need (nft_queue, cgroup v2): there a missing one is a
    failure, so a selection can never pass by skipping what it is there to test.
    """
    if present:
        return
    if in_test_vm():
        pytest.fail(f"the test VM's kernel lacks {feature}: the VM cannot test what it is for")
    pytest.skip(f"this kernel lacks {feature} (make test-vm runs it on one that has it)")
