"""libnftables through its Python binding: one context, one netlink socket."""

from __future__ import annotations

import importlib
import os
from typing import Any

from imdsguard.errors import FirewallError, ImdsGuardError, PermissionDeniedError
from imdsguard.firewall.nftables.render import FAMILY, Cmd


def load_binding() -> Any:
    """A new libnftables context (python3-nftables); FirewallError when it is missing."""
    try:
        module = importlib.import_module("nftables")
    except ImportError:
        raise FirewallError(
            "the nftables backend needs libnftables' Python binding: install python3-nftables "
            "(Debian/Ubuntu, Amazon Linux 2023, RHEL 9), or set firewall.backend: iptables"
        ) from None
    try:
        return module.Nftables()
    except OSError as exc:  # libnftables.so.1 itself is missing
        raise FirewallError(f"libnftables cannot be loaded ({exc}): install nftables") from None


class Context:
    """One libnftables context: one netlink socket, open as long as this object lives.

    Tables created with ``flags owner`` through a context belong to its socket:
    the kernel lets nobody else change or delete them and destroys them when
    the socket closes (when this object is freed or the process exits).
    """

    def __init__(self) -> None:
        self._nft = load_binding()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)

    def _failed(self, what: str, error: str) -> ImdsGuardError:
        lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
        text = next((ln for ln in lines if "Error:" in ln), lines[0] if lines else "failed")
        text = text.split("Error:", 1)[-1].strip()
        if "Operation not permitted" in error:
            if os.geteuid() != 0:
                return PermissionDeniedError(
                    f"nftables {what}: the firewall needs root (CAP_NET_ADMIN): {text}"
                )
            return FirewallError(
                f"nftables {what}: {text} (the table is owned by another process: "
                "a running imdsguard daemon holds it)"
            )
        return FirewallError(f"nftables {what} failed: {text}")

    def check(self, commands: list[Cmd], what: str) -> None:
        """Let the kernel validate ``commands`` without committing them (``nft -c``)."""
        self._nft.set_dry_run(True)
        try:
            self.json(commands, what)
        finally:
            self._nft.set_dry_run(False)

    def json(self, commands: list[Cmd], what: str) -> None:
        """Run ``commands`` as one transaction."""
        rc, _out, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise self._failed(what, err)

    def text(self, command: str, what: str) -> None:
        """Run nft syntax (for what JSON cannot say in nft 1.0.6: table flags)."""
        rc, _out, err = self._nft.cmd(command)
        if rc != 0:
            raise self._failed(what, err)

    def table(self, name: str) -> list[dict[str, Any]] | None:
        """``list table inet NAME`` as JSON objects; None when the table does not exist."""
        rc, out, err = self._nft.json_cmd(
            {"nftables": [{"list": {"table": {"family": FAMILY, "name": name}}}]}
        )
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise self._failed(f"list table {name}", err)
        objects: list[dict[str, Any]] = (out or {}).get("nftables", [])
        return [o for o in objects if "metainfo" not in o]
