"""Backend choice (``firewall.backend``): the host's tools are probed, never the firewall."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from imdsguard.errors import FirewallError, PermissionDeniedError
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


# --- leftovers: rules of ours in the backend not in use, found without creating anything


@pytest.mark.parametrize(
    ("content", "exists"),
    [(None, False), ("", False), ("mangle\n", False), ("mangle\nfilter\n", True)],
    ids=["no-ip_tables-module", "no-table", "other-table", "filter"],
)
def test_legacy_table_probe_reads_only_the_proc_file(
    tmp_path: Any, content: str | None, exists: bool
) -> None:
    names = {"ipv4": str(tmp_path / "ip_tables_names"), "ipv6": str(tmp_path / "missing")}
    if content is not None:
        (tmp_path / "ip_tables_names").write_text(content)
    assert iptables.legacy_table_exists("ipv4", names) is exists
    assert iptables.legacy_table_exists("ipv6", names) is False


class FakeBackend:
    def __init__(self, name: str, families: tuple[str, ...]) -> None:
        self.name, self.families = name, families

    def present(self) -> tuple[str, ...]:
        return self.families

    def close(self) -> None:
        pass


def test_leftovers_never_opens_legacy_tables_that_do_not_exist(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an nftables-only host python-iptables would load ip_tables and create the tables."""
    host.has("nft", "iptables")
    made: list[str] = []

    def make(name: str, daemon_running: bool = False) -> FakeBackend:
        made.append(name)
        return FakeBackend(name, ("ipv4", "ipv6") if name == "nftables" else ("ipv4",))

    monkeypatch.setattr(detect, "make_backend", make)
    monkeypatch.setattr(iptables, "legacy_tables", lambda: ())
    assert detect.leftovers("nftables") == []
    assert made == []
    assert [(b.name, f) for b, f in detect.leftovers("iptables")] == [
        ("nftables", ("ipv4", "ipv6"))
    ]
    monkeypatch.setattr(iptables, "legacy_tables", lambda: ("ipv4",))
    assert [b.name for b, _ in detect.leftovers(None)] == ["nftables", "iptables"]
    assert made == ["nftables", "nftables", "iptables"]


def test_leftovers_skip_a_backend_without_its_tools(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unusable(name: str, daemon_running: bool = False) -> FakeBackend:
        raise FirewallError(f"{name} cannot load")

    monkeypatch.setattr(detect, "make_backend", unusable)
    monkeypatch.setattr(iptables, "legacy_tables", lambda: ("ipv4",))
    assert detect.leftovers("nftables") == []  # python-iptables cannot load
    assert detect.leftovers("iptables") == []  # no nft command


def test_legacy_table_probe_without_permission_is_not_a_no(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not root (the file is 0440): "cannot tell", never "no table" (status says unknown)."""
    names = {"ipv4": str(tmp_path)}  # a directory: opening it fails, here as EISDIR
    assert iptables.legacy_table_exists("ipv4", names) is False

    def denied(*_a: Any, **_k: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(PermissionDeniedError):
        iptables.legacy_table_exists("ipv4", names)
