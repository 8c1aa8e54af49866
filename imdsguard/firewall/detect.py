"""Choose the firewall backend for this host.

``auto`` follows what the host's own tools use, so that our rules show up
where its administrators look (``nft list ruleset`` on nftables hosts) and no
legacy x_tables get created on a host that does not use them:

- the host's ``iptables`` says ``(nf_tables)``, or there is ``nft`` and no
  ``iptables`` at all: nftables (Amazon Linux 2023, RHEL 9, Debian 12);
- ``iptables`` says ``(legacy)``: the iptables backend (python-iptables).

Whatever is chosen, rules of ours can be left in the other backend (the
config named another one, or auto-detection changed its answer after an
upgrade): :func:`leftovers` finds them without creating anything, so that
the daemon takes them out at start, ``remove`` takes out everything and
``status`` says so.
"""

from __future__ import annotations

import shutil
import subprocess

from imdsguard.errors import FirewallError
from imdsguard.firewall.base import Backend
from imdsguard.policy import RuleSet

BACKENDS = ("nftables", "iptables")


def host_flavour() -> str:
    """``nftables``, ``iptables`` or ``none``: what this host's firewall tools speak."""
    iptables = shutil.which("iptables")
    if iptables:
        try:
            out = subprocess.run(
                [iptables, "--version"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if "nf_tables" in out:
            return "nftables"
        if "legacy" in out or out:
            return "iptables"
    return "nftables" if shutil.which("nft") else "none"


def choose(name: str) -> str:
    """The backend name ``firewall.backend: name`` resolves to on this host."""
    if name != "auto":
        return name
    flavour = host_flavour()
    if flavour == "none":
        raise FirewallError("no firewall tools found: install nftables (or iptables) and retry")
    return flavour


def make_backend(name: str, hold: bool = False, daemon_running: bool = False) -> Backend:
    """The backend named by ``firewall.backend`` (``auto`` picks one for this host).

    ``hold``: for the daemon, which keeps the nftables table it owns for its
    lifetime; ``daemon_running``: a one-shot command next to such a daemon
    (see :class:`~imdsguard.firewall.nftables.NftablesBackend`).
    """
    chosen = choose(name)
    if chosen == "iptables":
        from imdsguard.firewall.iptables import IptablesBackend  # noqa: PLC0415 - loads libxtables

        return IptablesBackend()
    if chosen == "nftables":
        from imdsguard.firewall.nftables import NftablesBackend  # noqa: PLC0415

        return NftablesBackend(hold=hold, daemon_running=daemon_running)
    raise FirewallError(f"unknown firewall backend {name!r}: use auto, iptables or nftables")


def leftovers(
    current: str | None, daemon_running: bool = False
) -> list[tuple[Backend, tuple[str, ...]]]:
    """Backends other than ``current`` that hold rules of ours, with their families.

    Nothing is created to look: the legacy tables are opened only where
    ``/proc/net/ip*_tables_names`` lists them (python-iptables would otherwise
    load ip_tables and create them on an nftables-only host), and nftables is
    only listed. A backend whose tools are not installed holds nothing of ours
    that we could take out. ``current=None``: every backend. ``daemon_running``:
    as for :func:`make_backend` (a running daemon's own nftables table is its). The caller
    closes the backends returned (:meth:`Backend.close`).
    """
    found: list[tuple[Backend, tuple[str, ...]]] = []
    for name in BACKENDS:
        if name == current:
            continue
        if name == "iptables":
            from imdsguard.firewall import iptables  # noqa: PLC0415 - no iptc on import

            if not iptables.legacy_tables():
                continue
        elif not shutil.which("nft"):
            continue
        try:
            backend = make_backend(name, daemon_running=daemon_running)
        except FirewallError:
            continue  # e.g. python-iptables cannot load: nothing we could read or remove
        try:
            families = backend.present()
        except BaseException:
            backend.close()
            raise
        if families:
            found.append((backend, families))  # the caller closes it
        else:
            backend.close()
    return found


def preview(name: str, ruleset: RuleSet) -> list[str]:
    """What backend ``name`` (``auto`` resolved) would load for ``ruleset``, without one.

    The same lines as :meth:`Backend.preview`, rendered without opening the
    firewall (``check-config --rules`` runs unprivileged).
    """
    chosen = choose(name)
    if chosen == "nftables":
        from imdsguard.firewall.nftables.render import preview as nft_preview  # noqa: PLC0415

        return nft_preview(ruleset)
    from imdsguard.firewall.iptables.render import preview as xt_preview  # noqa: PLC0415

    return xt_preview(ruleset)
