"""The iptables :class:`~imdsguard.firewall.base.Backend`: python-iptables (libiptc) I/O."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import ipaddress
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from imdsguard import _locks
from imdsguard.domain import BackendName, Capture
from imdsguard.errors import FirewallError, PermissionDeniedError
from imdsguard.firewall import _xt_blob
from imdsguard.firewall.base import Backend, Capabilities, FamilyState, Inspection
from imdsguard.firewall.iptables.compare import Snapshot, compare
from imdsguard.firewall.iptables.render import (
    AUDITED,
    CHAIN,
    DOCKER_USER,
    HOOKS,
    OUR_CHAINS,
    Params,
    XtRule,
    hook_jumps,
    preview,
    render,
)
from imdsguard.policy import FAMILIES, RuleSet

#: Rules found in order are re-parsed at least this often even if the table's
#: blob is unchanged (belt and braces; the blob check runs on every poll).
FULL_CHECK_EVERY = 30.0
#: How often the daemon asks the kernel for each table's header (quick_check),
#: and how often it compares the whole table (the blob fingerprint) regardless.
QUICK_INTERVAL = 0.025
FULL_INTERVAL = 0.25


# --- talking to libiptc ----------------------------------------------------------


def _norm_addr(value: str) -> str | None:
    if value.startswith("!"):
        return value
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return value
    return None if net.prefixlen == 0 else str(net)


def _norm_params(params: dict[str, list[str]]) -> Params:
    return tuple(sorted((k, " ".join(v)) for k, v in params.items()))


def _from_iptc(rule: Any, chain: str) -> XtRule:
    protocol = rule.protocol if rule.protocol not in ("ip", "ipv6", "all", "0", None) else None
    matches = tuple((m.name, _norm_params(m.get_all_parameters())) for m in rule.matches)
    # Interfaces are not part of our rules; keep them visible so such a rule never equals ours.
    if rule.out_interface:
        matches += (("out-interface", (("iface", str(rule.out_interface)),)),)
    if rule.in_interface:
        matches += (("in-interface", (("iface", str(rule.in_interface)),)),)
    return XtRule(
        chain=chain,
        target=rule.target.name if rule.target is not None else "",
        dst=_norm_addr(rule.dst),
        protocol=protocol,
        matches=matches,
        target_params=_norm_params(rule.target.get_all_parameters()) if rule.target else (),
        goto=bool(rule.target is not None and rule.target.goto),
    )


def _own_scratch(ext: Any) -> None:
    """Give a python-iptables Match/Target live pointers before libxtables uses them.

    python-iptables parses and checks options through pointers that libxtables
    keeps per extension (``xtables_target.t``, ``.udata``): ``t`` is whichever
    object of that extension was touched last, and ``udata`` is a scratch
    buffer that python-iptables frees right after allocating it (a local in
    ``reset()``). Extensions with scratch space (NFLOG, NFQUEUE) then write
    into freed memory; valgrind showed it and it segfaulted with iptables
    1.8.9. Point both at memory this object owns.
    """
    ext._update_pointers()
    size = getattr(ext._module, "udata_size", 0)
    if size:
        scratch = (ctypes.c_ubyte * size)()
        ext._module.udata = ctypes.cast(ctypes.byref(scratch), ctypes.c_void_p)
        ext._imdsguard_scratch = scratch


def _repoint(rule: Any) -> None:
    # libiptc insertion runs each extension's final check through the same pointers.
    for match in rule.matches:
        _own_scratch(match)
    _own_scratch(rule.target)


_owner_match_loaded = False


@contextmanager
def _stderr_muted() -> Iterator[None]:
    """fd 2 to /dev/null for the duration (C libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def _without_distutils() -> Iterator[None]:
    """Import python-iptables as on Python 3.12+, where there is no distutils.

    iptc only wants ``distutils.sysconfig.get_python_lib`` and falls back on
    ``sysconfig.get_path("purelib")`` (the same directory) when distutils is
    missing. Where setuptools' distutils shim is active (distutils-precedence.pth:
    a venv, or a distribution's setuptools that ships it) that import pulls in
    all of setuptools and pkg_resources: 18 MB of the daemon's RSS (43 -> 30 MB
    idle, benchmarks/resources.py) and ~0.1 s of start-up.
    """
    blocked = [n for n in ("distutils", "distutils.sysconfig") if n not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment] # import raises ModuleNotFoundError
    try:
        yield
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@dataclass(frozen=True)
class _Verified:
    """A table found in order: its fingerprint, for which policy, and when."""

    fingerprint: bytes
    ruleset: RuleSet
    inspection: Inspection
    at: float
    info: bytes = b""


#: Per network namespace: the x_tables of each family that exist (``filter`` once
#: anything used it). Missing when the ip_tables module is not loaded at all, as on
#: nftables-only hosts (AL2023, RHEL 9).
TABLE_NAMES = {"ipv4": "/proc/net/ip_tables_names", "ipv6": "/proc/net/ip6_tables_names"}


def legacy_table_exists(family: str, names: dict[str, str] = TABLE_NAMES) -> bool:
    """True when ``family``'s legacy filter table exists, checked without creating it.

    Opening the table (libiptc) would create it, and libxtables loads the
    ip_tables module first when it is missing; a host that never used legacy
    iptables must stay that way, so only this file is read.
    """
    try:
        with open(names[family], encoding="ascii") as fh:
            return "filter" in fh.read().split()
    except PermissionError:
        raise PermissionDeniedError(
            f"cannot read {names[family]}: the firewall needs root (CAP_NET_ADMIN)"
        ) from None
    except OSError:
        return False


def legacy_tables() -> tuple[str, ...]:
    """The families whose legacy filter table exists (see :func:`legacy_table_exists`)."""
    return tuple(f for f in FAMILIES if legacy_table_exists(f))


class IptablesBackend(Backend):
    """python-iptables implementation of :class:`~imdsguard.firewall.base.Backend`."""

    name = BackendName.IPTABLES

    def __init__(self) -> None:
        if importlib.util.find_spec("iptc") is None:
            raise FirewallError(
                "python-iptables cannot be loaded (no module named 'iptc'); install iptables"
                " (libxtables) and python-iptables"
            )
        self._lib: Any = None
        self._readers: dict[str, _xt_blob.TableReader] = {}
        self._verified: dict[str, _Verified] = {}
        self._inspected: tuple[str, ...] = ()  # families the last inspect looked at

    @property
    def _iptc(self) -> Any:
        """python-iptables, imported on first use.

        Importing it runs ``modprobe ip_tables`` and ``ip6_tables``, and
        libxtables loads them again on its first match check: on a host that
        never used legacy iptables (nftables-only AL2023, RHEL 9, a stock
        Debian kernel) looking for our rules (status, remove) must not do
        that, so only a path that opens a table imports it.
        """
        if self._lib is None:
            try:
                try:
                    with _without_distutils():
                        import iptc  # noqa: PLC0415 - libxtables is loaded on import; keep it lazy
                except ImportError:
                    # python-iptables before 1.1 (Debian 12's python3-iptables 1.0.1) imports
                    # distutils unconditionally: there the distribution's distutils is used.
                    import iptc  # noqa: PLC0415
            except Exception as exc:  # noqa: BLE001 - any failure here means "unusable"
                raise FirewallError(
                    f"python-iptables cannot be loaded ({exc}); install iptables (libxtables)"
                ) from None
            self._lib = iptc
            self._load_owner_match()
        return self._lib

    def _load_owner_match(self) -> None:
        """Load libxtables' owner match for both families once, with stderr muted.

        The first IPv4 owner match after an IPv6 one makes libxtables print
        "Warning: Extension owner revision 0 not supported, missing kernel
        module?" (revision 0 left the kernel long ago; revision 1 is used).
        It is harmless but lands in the journal as a stray non-JSON line and
        on the terminal of every command, so it is said here, once per
        process, to /dev/null. Nothing else runs yet (no threads), so no
        other message can be lost.
        """
        global _owner_match_loaded  # noqa: PLW0603 - once per process, like the warning
        if _owner_match_loaded:
            return
        _owner_match_loaded = True
        probe = XtRule(CHAIN, "RETURN", matches=(("owner", (("uid-owner", "0"),)),))
        with _stderr_muted(), contextlib.suppress(Exception):
            for family in ("ipv6", "ipv4"):
                self._build(family, probe)

    # -- low level

    def family_enabled(self, family: str) -> bool:
        """False when the kernel has the family switched off (IPv6 disabled)."""
        return family == "ipv4" or os.path.exists("/proc/net/if_inet6")

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._iptc.IPTCError as exc:
            text = str(exc)
            if "Permission denied" in text or "must be root" in text or os.geteuid() != 0:
                raise PermissionDeniedError(
                    f"cannot {what}: the firewall needs root (CAP_NET_ADMIN): {text}"
                ) from None
            raise FirewallError(f"cannot {what}: {text}") from None

    def _table(self, family: str) -> Any:
        iptc = self._iptc
        with self._errors(f"open the {family} filter table"):
            table = (
                iptc.Table(iptc.Table.FILTER)
                if family == "ipv4"
                else iptc.Table6(iptc.Table6.FILTER)
            )
            table.autocommit = False
            table.refresh()
        return table

    def _snapshot(self, table: Any) -> Snapshot:
        iptc = self._iptc
        output = [_from_iptc(r, "OUTPUT") for r in iptc.Chain(table, "OUTPUT").rules]
        forward = [_from_iptc(r, "FORWARD") for r in iptc.Chain(table, "FORWARD").rules]
        chains = {
            name: [_from_iptc(r, name) for r in iptc.Chain(table, name).rules]
            for name in OUR_CHAINS
            if table.is_chain(name)
        }
        docker_user = None
        if table.is_chain(DOCKER_USER):
            docker_user = [_from_iptc(r, DOCKER_USER) for r in iptc.Chain(table, DOCKER_USER).rules]
        return Snapshot(output, chains, forward, docker_user)

    def _build(self, family: str, rule: XtRule) -> Any:
        iptc = self._iptc
        new = iptc.Rule() if family == "ipv4" else iptc.Rule6()
        if rule.dst:
            new.dst = rule.dst
        if rule.protocol:
            new.protocol = rule.protocol
        for name, params in rule.matches:
            match = new.create_match(name)
            for key, value in params:
                _own_scratch(match)
                match.set_parameter(key, value or None)
        target = iptc.Target(new, rule.target, goto=rule.goto)
        for key, value in rule.target_params:
            _own_scratch(target)
            target.set_parameter(key, value)
        new.target = target
        return new

    # -- the Backend interface

    def inspect(self, ruleset: RuleSet) -> dict[str, Inspection]:
        """See :meth:`imdsguard.firewall.base.Backend.inspect`."""
        result = {}
        for family in FAMILIES:
            if not ruleset.endpoints(family):
                result[family] = Inspection(
                    family, FamilyState.DISABLED, ("no endpoint configured",)
                )
            elif not self.family_enabled(family):
                result[family] = Inspection(
                    family, FamilyState.DISABLED, ("IPv6 is disabled in the kernel",)
                )
            else:
                result[family] = self._inspect_family(ruleset, family)
        self._inspected = tuple(f for f in FAMILIES if f in result and
                                result[f].state != FamilyState.DISABLED)  # fmt: skip
        return result

    def _inspect_family(self, ruleset: RuleSet, family: str) -> Inspection:
        """Parse the rules only when the kernel's table blob changed (see ``_xt_blob``)."""
        if not legacy_table_exists(family):
            # Reading the table would create it (status, or remove's check, must not).
            self._verified.pop(family, None)
            return Inspection(family, FamilyState.MISSING, ("the filter table does not exist",))
        before = self._fingerprint(family)
        known = self._verified.get(family)
        now = time.monotonic()
        if (
            before is not None
            and known is not None
            and known.fingerprint == before
            and known.ruleset == ruleset
            and now - known.at < FULL_CHECK_EVERY
        ):
            return known.inspection
        with self._errors(f"read the {family} rules"):
            snap = self._snapshot(self._table(family))
        found = compare(snap, ruleset, family)
        # Remembered only if nothing changed while we parsed, and only when in order.
        if found.state == FamilyState.OK and before is not None:
            info = self._info(family)
            if self._fingerprint(family) == before and info is not None:
                self._verified[family] = _Verified(before, ruleset, found, now, info)
        else:
            self._verified.pop(family, None)
        return found

    def capabilities(self) -> Capabilities:
        """Always queue (xt_NFQUEUE); x_tables announces no change: the daemon polls."""
        return Capabilities(capture=Capture.QUEUE, notifications=False)

    def quick_check_problem(self) -> str | None:
        """Why the cheap table check cannot be used here (then every poll parses), or None."""
        try:
            if "ipv4" not in self._readers:
                self._readers["ipv4"] = _xt_blob.TableReader("ipv4")
            self._readers["ipv4"].fingerprint()
        except OSError as exc:
            return str(exc)
        return None

    def quick_check(self) -> bool:
        """True when a table may have changed since it was last found in order.

        x_tables announces nothing, so the daemon calls this often (every
        :data:`QUICK_INTERVAL`): one getsockopt per family, a few microseconds.
        It sees every replace that changes the number or size of the rules
        (``iptables-restore`` without our chain, a flush, a deletion), so those
        are repaired within that interval plus a repair; same-size edits wait
        for the daemon's regular full check.
        """
        if not self._inspected or any(f not in self._verified for f in self._inspected):
            return True  # a family not (yet) found in order: only a full check can say
        return any(self._info(f) != known.info for f, known in list(self._verified.items()))

    def _info(self, family: str) -> bytes | None:
        reader = self._readers.get(family)
        try:
            if reader is None:
                reader = self._readers[family] = _xt_blob.TableReader(family)
            return reader.info()
        except OSError:
            return None

    def preview(self, ruleset: RuleSet) -> list[str]:
        """See :meth:`~imdsguard.firewall.base.Backend.preview`: ``iptables-save`` lines."""
        return preview(ruleset)

    def limits(self) -> tuple[str, ...]:
        """What this backend cannot guard against (for ``status``)."""
        return (
            "x_tables has no change notification: a table replace without our chain "
            "(iptables-restore, a firewall reload) opens IMDS until the daemon notices "
            f"(checked every {QUICK_INTERVAL * 1000:.0f} ms) and repairs it (~15-30 ms): "
            "measured up to 55 ms; same-size edits are seen by the full check "
            f"every {FULL_INTERVAL * 1000:.0f} ms",
        )

    def _fingerprint(self, family: str) -> bytes | None:
        """The table's fingerprint, or None where it cannot be read this way."""
        reader = self._readers.get(family)
        try:
            if reader is None:
                reader = self._readers[family] = _xt_blob.TableReader(family)
            return reader.fingerprint()
        except OSError:
            return None  # no permission, no table yet, no such family: parse instead

    def apply(self, ruleset: RuleSet) -> bool:
        """See :meth:`imdsguard.firewall.base.Backend.apply`."""
        changed = False
        with _locks.hold(_locks.XTABLES_LOCK, what="the xtables lock"):
            for family in FAMILIES:
                if not self.family_enabled(family):
                    continue
                if not ruleset.endpoints(family):
                    changed |= self._remove_family(family)
                    continue
                table = self._table(family)
                with self._errors(f"apply the {family} rules"):
                    if compare(self._snapshot(table), ruleset, family).state == FamilyState.OK:
                        continue
                    self._rewrite(table, ruleset, family)
                    table.commit()
                    table.refresh()
                changed = True
        return changed

    def _rewrite(self, table: Any, ruleset: RuleSet, family: str) -> None:
        iptc = self._iptc
        wanted = render(ruleset, family)
        # Sub-chains first: the main chain's rules may jump to them.
        for name in sorted(wanted.chains, key=lambda n: n != AUDITED):
            if not table.is_chain(name):
                table.create_chain(name)
            chain = iptc.Chain(table, name)
            chain.flush()
            for rule in wanted.chains[name]:
                self._add(chain, family, rule)
        stale = [n for n in OUR_CHAINS if n not in wanted.chains and table.is_chain(n)]
        hooks = [*HOOKS, *([DOCKER_USER] if table.is_chain(DOCKER_USER) else [])]
        self._delete_chains(table, [iptc.Chain(table, hook) for hook in hooks], stale)
        for hook in hooks:
            builtin = iptc.Chain(table, hook)
            _delete_jumps(builtin, OUR_CHAINS)
            for rule in reversed(hook_jumps(wanted, hook)):
                self._add(builtin, family, rule, position=0)

    def _delete_chains(self, table: Any, callers: list[Any], names: list[str]) -> bool:
        """Delete chains ``names`` of ours and the jumps to them in ``callers``.

        The jumps go first (a chain still jumped to cannot be deleted), then
        each chain is flushed, then deleted. True when anything was there.
        """
        found = False
        for caller in callers:
            found |= _delete_jumps(caller, names)
        for name in names:
            self._iptc.Chain(table, name).flush()
        for name in names:
            table.delete_chain(name)
        return found or bool(names)

    def _add(self, chain: Any, family: str, rule: XtRule, position: int | None = None) -> None:
        built = self._build(family, rule)
        _repoint(built)
        if position is None:
            chain.append_rule(built)
        else:
            chain.insert_rule(built, position)

    def remove(self) -> bool:
        """See :meth:`imdsguard.firewall.base.Backend.remove`."""
        changed = False
        with _locks.hold(_locks.XTABLES_LOCK, what="the xtables lock"):
            for family in FAMILIES:
                if self.family_enabled(family):
                    changed |= self._remove_family(family)
        return changed

    def present(self) -> tuple[str, ...]:
        """The families that hold any rule or chain of ours (nothing is created to look)."""
        found = []
        for family in FAMILIES:
            if not (self.family_enabled(family) and legacy_table_exists(family)):
                continue
            with self._errors(f"read the {family} rules"):
                snap = self._snapshot(self._table(family))
            jumps = snap.output + snap.forward + (snap.docker_user or [])
            if snap.chains or any(r.target in OUR_CHAINS for r in jumps):
                found.append(family)
        return tuple(found)

    def close(self) -> None:
        """Free libiptc's handles: python-iptables caches one per table, each with a socket.

        For a backend we only looked at (a leftover check), so that the
        daemon does not keep them for its whole life. Used again, a table is
        re-opened.
        """
        if self._lib is None:
            return  # never imported: no handle
        for cls in (self._iptc.Table, self._iptc.Table6):
            for table in list(cls._cache.values()):  # python-iptables' own cache
                table.close()

    def _remove_family(self, family: str) -> bool:
        if not legacy_table_exists(family):
            return False  # no table, so nothing of ours; opening it would create it
        table = self._table(family)
        with self._errors(f"remove the {family} rules"):
            present = [name for name in OUR_CHAINS if table.is_chain(name)]
            found = self._delete_chains(table, table.chains, present)
            if found:
                table.commit()
                table.refresh()
        return found


def _delete_jumps(chain: Any, targets: tuple[str, ...] | list[str]) -> bool:
    """Delete the rules of ``chain`` that jump to one of ``targets``; True when there were any."""
    found = False
    for rule in list(chain.rules):
        if rule.target is not None and rule.target.name in targets:
            chain.delete_rule(rule)
            found = True
    return found
