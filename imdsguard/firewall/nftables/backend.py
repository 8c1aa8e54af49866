"""The nftables :class:`~imdsguard.firewall.base.Backend`: our tables in the kernel."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Mapping
from typing import Any

from imdsguard import cgroups
from imdsguard import netlink as nl
from imdsguard.domain import BackendName, Capture
from imdsguard.errors import FirewallError, PermissionDeniedError
from imdsguard.firewall.base import Backend, Capabilities, FamilyState, Inspection
from imdsguard.firewall.nftables.compare import combine, compare
from imdsguard.firewall.nftables.context import Context
from imdsguard.firewall.nftables.render import (
    BACKSTOP,
    FAMILY,
    PRIORITY,
    TABLE,
    UNITS,
    Cmd,
    Plan,
    expand_groups,
    preview,
    render,
    render_backstop,
)
from imdsguard.policy import FAMILIES, RuleSet

#: How long the daemon's apply may act on the listing its inspect just made.
REUSE = 0.1
_PROBE_TABLE = "imdsguard_cgprobe"

#: What to write (our table, the backstop, the tables wanted) and what was listed.
_State = tuple["Plan", "Plan | None", list[str], dict[str, "list[dict[str, Any]] | None"]]


class NftablesBackend(Backend):
    """nftables implementation of :class:`~imdsguard.firewall.base.Backend`.

    Two tables (see the README's "What a firewall reload does"):

    - ``inet imdsguard``: the daemon's, with the queue or log for the
      capture. Created ``flags owner`` through a context the daemon keeps
      open (``hold=True``), so no other process can flush, edit or delete it
      (``nft flush ruleset`` skips it; its edits get EPERM) and it goes
      with the daemon.
    - ``inet imdsguard_backstop``: the same allow and deny without queue, owned
      by nobody, so it stays when the daemon is gone (kill -9, stop, upgrade).
      Hooked after our own table, so attribution sees denied packets first.
      A reload's ``flush ruleset`` removes it; the daemon puts it back while
      its owned table keeps IMDS closed.

    Without a daemon (one-shot ``apply``) only the backstop is written: it
    is all that would survive the command's exit. ``daemon_running``: a
    daemon holds ``inet imdsguard``, so inspect expects it and leaves it be.
    """

    name = BackendName.NFTABLES

    def __init__(self, hold: bool = False, daemon_running: bool = False) -> None:
        self._reader = Context()  # listings: never the owner's socket (see README)
        self._owner = Context() if hold else None
        self._expect_main = hold or daemon_running
        self._owns_main = False  # our owner context created the table now in the kernel
        self._queue_supported: bool | None = None
        self._cgroup_offset: int | None = None
        self.owner_problem: str | None = None
        self._last: tuple[RuleSet, float, _State] | None = None  # the last inspection's

    def capabilities(self) -> Capabilities:
        """Queue where the kernel has nft_queue, else log; nftables announces changes."""
        capture = Capture.QUEUE if self._can_queue() else Capture.LOG
        return Capabilities(capture=capture, notifications=True)

    def _can_queue(self) -> bool:
        """True when the kernel has nft_queue (CONFIG_NFT_QUEUE), checked without changes."""
        if self._queue_supported is None:
            probe = "imdsguard_probe"
            commands: list[Cmd] = [
                {"add": {"table": {"family": FAMILY, "name": probe}}},
                {"add": {"chain": {"family": FAMILY, "table": probe, "name": "c"}}},
                {
                    "add": {
                        "rule": {
                            "family": FAMILY,
                            "table": probe,
                            "chain": "c",
                            "expr": [{"queue": {"num": 1}}],
                        }
                    }
                },
            ]
            try:
                # Through the listing context (no new socket: a probe context
                # freed only by a later garbage collection kept its fd open).
                self._reader.check(commands, "queue probe")
                self._queue_supported = True
            except PermissionDeniedError:
                raise
            except FirewallError:
                self._queue_supported = False
        return self._queue_supported

    def cgroup_offset(self) -> int:
        """How many levels below the kernel's cgroup root our ``/sys/fs/cgroup`` starts.

        0 in the initial cgroup namespace. In another one (a container:
        systemd-nspawn puts its payload in ``/payload``) ``socket cgroupv2
        level`` still counts from the real root, which no file inside
        tells. So it is measured, once: a throw-away table counts one UDP
        datagram of ours to 127.0.0.1 against our own cgroup at each
        candidate level, and the level that matched gives the offset.
        """
        if self._cgroup_offset is None:
            self._cgroup_offset = 0
            if not cgroups.own_cgroup_ns_is_initial():
                self._cgroup_offset = self._probe_cgroup_offset()
        return self._cgroup_offset

    def _probe_cgroup_offset(self, tries: int = 8) -> int:
        own = cgroups.own_path()
        if not own:
            raise FirewallError(
                "cannot match units in this cgroup namespace: the daemon runs at its root, "
                "so the depth of the namespace cannot be measured (run it as a service)"
            )
        depth = cgroups.level(own)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            table = f"{FAMILY} {_PROBE_TABLE}"
            lines = [
                f"add table {table}",
                f"add chain {table} out {{ type filter hook output priority {PRIORITY}; }}",
            ]
            lines += [
                f'add rule {table} out udp dport {port} socket cgroupv2 level {depth + k} "{own}" '
                "counter"
                for k in range(tries)
            ]
            self._reader.text("\n".join(lines) + "\n", "cgroup namespace probe")
            try:
                with contextlib.suppress(OSError):  # IPAddressDeny= may refuse it after our hook
                    sock.sendto(b"imdsguard cgroup probe", ("127.0.0.1", port))
                listing = self._reader.table(_PROBE_TABLE) or []
            finally:
                self._reader.json([_delete_table(_PROBE_TABLE)], "delete the probe table")
        counts = [
            next((e["counter"]["packets"] for e in o["rule"]["expr"] if "counter" in e), 0)
            for o in listing
            if "rule" in o
        ]
        matched = [k for k, n in enumerate(counts) if n]
        if len(matched) != 1:
            raise FirewallError(
                f"cannot measure this cgroup namespace's depth (matches at {matched}): "
                "allow.units cannot be enforced here"
            )
        return matched[0]

    def plan(self, ruleset: RuleSet) -> Plan:
        """Our own table for ``ruleset``, rendered with the current group membership."""
        return self._wanted(ruleset)[0]

    def _wanted(
        self, ruleset: RuleSet, loading: bool = False
    ) -> tuple[Plan, Plan | None, list[str]]:
        """The plans; ``loading``: they go into the kernel, so the cgroup namespace's
        depth is measured if not known yet (inspection compares without it)."""
        members = expand_groups(ruleset.allow_gids)
        offset = 0
        if ruleset.allow_cgroups:
            offset = self.cgroup_offset() if loading else (self._cgroup_offset or 0)
        main = render(ruleset, members, cgroup_offset=offset)
        backstop = render_backstop(ruleset, members, cgroup_offset=offset)
        wanted = ([TABLE] if self._expect_main else []) + ([BACKSTOP] if backstop else [])
        return main, backstop, wanted

    def _state(self, ruleset: RuleSet, reuse: bool = False, loading: bool = False) -> _State:
        last = self._last
        # A plan rendered before the cgroup namespace's depth was measured is not loaded.
        unmeasured = loading and bool(ruleset.allow_cgroups) and self._cgroup_offset is None
        fresh = last is not None and last[0] == ruleset and time.monotonic() - last[1] < REUSE
        if reuse and fresh and not unmeasured and last is not None:
            return last[2]
        main, backstop, wanted = self._wanted(ruleset, loading)
        listings = {TABLE: self._reader.table(TABLE), BACKSTOP: self._reader.table(BACKSTOP)}
        state = main, backstop, wanted, listings
        self._last = (ruleset, time.monotonic(), state)
        return state

    @staticmethod
    def _compare_tables(
        ruleset: RuleSet, plans: Mapping[str, Plan | None], listings: Mapping[str, Any]
    ) -> dict[str, dict[str, Inspection] | None]:
        found: dict[str, dict[str, Inspection] | None] = {}
        for table, listing in listings.items():
            plan = plans[table]
            if listing is None:
                found[table] = None
            elif plan is None:  # present but nothing of it is wanted: audit-mode backstop
                found[table] = {
                    f: Inspection(f, FamilyState.DRIFTED, ("it denies in audit mode",))
                    for f in FAMILIES
                }
            else:
                found[table] = compare(listing, plan, ruleset)
        return found

    # -- the Backend interface

    def inspect(self, ruleset: RuleSet) -> dict[str, Inspection]:
        """See :meth:`imdsguard.firewall.base.Backend.inspect`."""
        main, backstop, wanted, listings = self._state(ruleset)
        found = self._compare_tables(ruleset, {TABLE: main, BACKSTOP: backstop}, listings)
        return combine(ruleset, found, wanted)

    def apply(self, ruleset: RuleSet) -> bool:
        """See :meth:`imdsguard.firewall.base.Backend.apply`."""
        # The daemon applies right after an inspect that found something wrong:
        # its listing is reused (a change since then notifies the daemon again).
        main, backstop, wanted, listings = self._state(
            ruleset, reuse=self._owner is not None, loading=True
        )
        self._last = None  # whatever is written below, the next look lists afresh
        found = self._compare_tables(ruleset, {TABLE: main, BACKSTOP: backstop}, listings)

        def fine(table: str) -> bool:
            got = found[table]
            if table not in wanted:
                return got is None
            return got is not None and all(
                i.state in (FamilyState.OK, FamilyState.DISABLED) for i in got.values()
            )

        changed = False
        writer = self._owner or self._reader
        if not fine(BACKSTOP):  # first: it covers the gap if our table must be re-created
            if backstop is not None:
                writer.json(backstop.batch()["nftables"], "replace the backstop table")
                _load_units(writer, backstop)
            else:
                writer.json([_delete_table(BACKSTOP)], "delete the backstop table")
            changed = True
        if fine(TABLE):
            return changed
        if self._owner is None:
            if listings[TABLE] is not None and not self._expect_main:
                # Left by an older imdsguard, or by a daemon on a kernel without owned tables.
                self._reader.json([_delete_table(TABLE)], f"delete table {FAMILY} {TABLE}")
                changed = True
            return changed
        current = listings[TABLE]
        if self._owns_main and current is not None:
            self._owner.json(main.replace_in_place(current), "replace our table")
            _load_units(self._owner, main)
            return True
        self._create_owned(self._owner, listings[TABLE] is not None)
        self._owner.json(main.commands, "fill our table")
        _load_units(self._owner, main)
        return True

    def _create_owned(self, owner: Context, exists: bool) -> None:
        """An empty ``inet imdsguard`` owned by ``owner`` (the backstop denies meanwhile)."""
        delete = f"delete table {FAMILY} {TABLE}\n" if exists else ""
        try:
            owner.text(f"{delete}add table {FAMILY} {TABLE} {{ flags owner; }}", "own table")
            self._owns_main = True
            self.owner_problem = None
            return
        except PermissionDeniedError:
            raise
        except FirewallError as exc:
            if "Operation not permitted" in str(exc) or "owned by another" in str(exc):
                raise
            # Kernel < 5.12 (or an nft without the flag): an ordinary table.
            self.owner_problem = (
                f"the kernel refused an owned table ({exc}): a `flush ruleset` by another "
                "process removes our rules until the daemon repairs them (kernel >= 5.12 needed)"
            )
        owner.json(
            [{"add": {"table": {"family": FAMILY, "name": TABLE}}}, _delete_table(TABLE),
             {"add": {"table": {"family": FAMILY, "name": TABLE}}}],
            "create our table",
        )  # fmt: skip
        self._owns_main = True

    def preview(self, ruleset: RuleSet) -> list[str]:
        """See :meth:`imdsguard.firewall.base.Backend.preview` (one JSON command per line)."""
        return preview(ruleset, cgroup_offset=self._cgroup_offset or 0)

    def limits(self) -> tuple[str, ...]:
        """What this backend cannot guard against here (for ``status``)."""
        return (self.owner_problem,) if self.owner_problem else ()

    def remove(self) -> bool:
        """See :meth:`imdsguard.firewall.base.Backend.remove`."""
        writer = self._owner or self._reader
        changed = False
        if self._reader.table(BACKSTOP) is not None:
            writer.json([_delete_table(BACKSTOP)], "delete the backstop table")
            changed = True
        if self._reader.table(TABLE) is not None and self._expect_main and self._owner is None:
            # A running daemon's: the kernel lets no other process delete it (EPERM),
            # and it goes when the daemon stops.
            return changed
        if self._reader.table(TABLE) is not None:
            try:
                writer.json([_delete_table(TABLE)], f"delete table {FAMILY} {TABLE}")
            except PermissionDeniedError:
                raise
            except FirewallError as exc:
                if "owned by another" not in str(exc):
                    raise
                raise FirewallError(
                    f"table {FAMILY} {TABLE} belongs to the running imdsguard daemon and the "
                    "kernel lets no other process delete it; it goes when the daemon stops "
                    "(systemctl stop imdsguard)"
                ) from None
            self._owns_main = False
            changed = True
        return changed

    def present(self) -> tuple[str, ...]:
        """The families our tables hold rules for (``inet`` tables: both, if one exists)."""
        held = any(self._reader.table(name) is not None for name in (TABLE, BACKSTOP))
        return FAMILIES if held else ()

    def close(self) -> None:
        """Nothing to release early: the libnftables contexts go with this object.

        The owner context's socket *is* our table's life (the kernel destroys an
        owned table when it closes), so it is never closed before the daemon exits.
        """

    def watch(self) -> socket.socket:
        """A netlink socket that becomes readable whenever any nftables object changes."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             nl.NETLINK_NETFILTER)  # fmt: skip
        sock.bind((0, 0))
        sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_ADD_MEMBERSHIP, nl.NFNLGRP_NFTABLES)
        sock.setblocking(False)
        return sock


def _load_units(writer: Context, plan: Plan) -> None:
    """The units chain's rules, right after the JSON that (re)created the chain empty.

    A separate transaction (nft syntax: 1.0.6's JSON parser lacks ``socket
    cgroupv2``): until it lands, the units' processes are denied, nothing
    else changes. A unit's cgroup gone meanwhile fails it; the daemon looks
    the units up again and retries.
    """
    if UNITS in plan.chains:
        writer.text(plan.units_script(), f"load the units rules of {plan.table}")


def _delete_table(name: str) -> Cmd:
    return {"delete": {"table": {"family": FAMILY, "name": name}}}
