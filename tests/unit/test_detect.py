"""Backend choice (``firewall.backend``): the host's tools are probed, never the firewall."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from imdsguard.errors import FirewallError
from imdsguard.firewall import detect, iptables, nftables

NFT_VARIANT = "iptables v1.8.9 (nf_tables)\n"
LEGACY = "iptables v1.8.9 (legacy)\n"


class Host:
    """Fakes ``shutil.which`` and ``iptables --version`` for :mod:`detect`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tools: dict[str, str] = {}
        self.version: str | BaseException = ""
        self.probes: list[list[str]] = []
        monkeypatch.setattr(detect.shutil, "which", self.tools.get)
        monkeypatch.setattr(detect.subprocess, "run", self._run)

    def _run(self, argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        self.probes.append(argv)
        if isinstance(self.version, BaseException):
            raise self.version
        return subprocess.CompletedProcess(argv, 0, stdout=self.version, stderr="")

    def has(self, *names: str) -> Host:
        self.tools.update({n: f"/usr/sbin/{n}" for n in names})
        return self


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Host:
    return Host(monkeypatch)


@pytest.mark.parametrize(
    ("tools", "version", "expected"),
    [
        (("iptables", "nft"), NFT_VARIANT, "nftables"),  # Debian 12, AL2023, RHEL 9
        (("iptables",), NFT_VARIANT, "nftables"),  # iptables-nft without the nft tool
        (("iptables", "nft"), LEGACY, "iptables"),  # legacy wins even when nft is there
        (("iptables",), LEGACY, "iptables"),
        (("iptables",), "iptables v1.4.21\n", "iptables"),  # too old to say: x_tables
        (("nft",), "", "nftables"),  # only nft
    ],
    ids=["nft-variant", "nft-variant-no-nft", "legacy-with-nft", "legacy", "old", "only-nft"],
)
def test_auto_follows_the_hosts_tools(
    host: Host, tools: tuple[str, ...], version: str, expected: str
) -> None:
    host.has(*tools).version = version
    assert detect.host_flavour() == expected
    assert detect.choose("auto") == expected
    if "iptables" in tools:
        assert host.probes[-1] == ["/usr/sbin/iptables", "--version"]
    else:
        assert host.probes == []


@pytest.mark.parametrize(
    "failure", [OSError(13, "Permission denied"), subprocess.TimeoutExpired("iptables", 5)]
)
def test_an_iptables_that_cannot_say_falls_back_to_nft(host: Host, failure: Exception) -> None:
    host.has("iptables", "nft").version = failure
    assert detect.choose("auto") == "nftables"


def test_no_firewall_tools_is_an_error_that_says_what_to_install(host: Host) -> None:
    assert detect.host_flavour() == "none"
    with pytest.raises(FirewallError, match="no firewall tools found: install nftables"):
        detect.choose("auto")
    with pytest.raises(FirewallError, match="no firewall tools found"):
        detect.make_backend("auto")


@pytest.mark.parametrize("name", ["iptables", "nftables"])
def test_explicit_backends_are_honoured_without_probing(host: Host, name: str) -> None:
    host.has("iptables", "nft").version = NFT_VARIANT if name == "iptables" else LEGACY
    assert detect.choose(name) == name
    assert host.probes == []


class _FakeIptables:
    name = "iptables"


class _FakeNftables:
    name = "nftables"

    def __init__(self, hold: bool = False, daemon_running: bool = False) -> None:
        self.hold = hold


@pytest.fixture
def fake_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-ins: the real constructors load libxtables or look for nft."""
    monkeypatch.setattr(iptables, "IptablesBackend", _FakeIptables)
    monkeypatch.setattr(nftables, "NftablesBackend", _FakeNftables)


@pytest.mark.usefixtures("fake_backends")
@pytest.mark.parametrize(
    ("name", "version", "expected"),
    [
        ("auto", LEGACY, _FakeIptables),
        ("auto", NFT_VARIANT, _FakeNftables),
        ("iptables", NFT_VARIANT, _FakeIptables),
        ("nftables", LEGACY, _FakeNftables),
    ],
)
def test_make_backend_builds_the_chosen_one(
    host: Host, name: str, version: str, expected: type
) -> None:
    host.has("iptables", "nft").version = version
    assert isinstance(detect.make_backend(name), expected)


@pytest.mark.usefixtures("fake_backends")
def test_unknown_backend_name_is_an_error(host: Host) -> None:
    with pytest.raises(FirewallError, match="unknown firewall backend 'pf'"):
        detect.make_backend("pf")
