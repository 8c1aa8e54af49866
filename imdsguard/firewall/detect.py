"""Choose the firewall backend for this host."""

from __future__ import annotations

from imdsguard.errors import FirewallError
from imdsguard.firewall.base import Backend


def make_backend(name: str) -> Backend:
    """The backend named by ``firewall.backend`` (``auto`` picks one for this host)."""
    if name in ("auto", "iptables"):
        from imdsguard.firewall.iptables import IptablesBackend  # noqa: PLC0415 - loads libxtables

        return IptablesBackend()
    raise FirewallError(
        f"firewall backend {name!r} is not available in this version; use 'iptables' or 'auto'"
    )
