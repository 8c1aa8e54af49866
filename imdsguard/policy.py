"""Turn a :class:`~imdsguard.config.Config` into what the firewall must enforce.

Pure: no I/O. The result, :class:`RuleSet`, is backend-neutral data that each
firewall backend renders in its own terms, so that the same policy means the
same thing on iptables and nftables and can be compared for drift.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from imdsguard.cgroups import UnitCgroup
from imdsguard.config import Config
from imdsguard.domain import Action, Capture, Containers, Mode

if TYPE_CHECKING:  # the backend contract imports RuleSet from here
    from imdsguard.firewall.base import Capabilities

FAMILIES = ("ipv4", "ipv6")

#: NFQUEUE queue (capture ``queue``) or NFLOG group (``log``) the daemon reads denied
#: (or, in audit mode, audited) packets from.
QUEUE_NUM = 5421

#: Mark bit that tells a packet back from the queue (NF_REPEAT) from a new one,
#: so the chain can tell "seen, now deny" (audit: "seen, pass") from "not seen
#: yet, queue it". A packet is seen when the bit is in its connection's
#: conntrack mark, which the queue rule sets and no socket can, *and* in the
#: packet's own mark, which the daemon's verdict sets. The packet mark alone
#: would be forgeable: ``SO_MARK`` needs only CAP_NET_RAW since Linux 5.17
#: (Docker grants it), and a client that pre-set the bit would skip the queue
#: and its event. The conntrack mark alone would not be per packet: a packet
#: sent while another of its connection is queued (an HTTP request right after
#: the handshake's ACK) would pass as seen, unread. Needs CONFIG_NF_CONNTRACK_MARK
#: only (not the nfnetlink_queue conntrack glue, CONFIG_NETFILTER_NETLINK_GLUE_CT,
#: which some kernels lack). Residual: a host rule that copies packet marks into
#: conntrack marks (``CONNMARK --save-mark`` without a mask that excludes this bit)
#: would let a client's mark look seen. Chosen clear of the bits kube-proxy
#: (0x4000, 0x8000), Calico (0xffff0000), Cilium (0x0f00) and the AWS VPC CNI
#: (0x80) use.
MARK_SEEN = 0x1000


@dataclass(frozen=True)
class RuleSet:
    """What to enforce, per address family.

    ``allow_uids``/``allow_gids`` pass (the broker is one of ``allow_uids``:
    its own system user; no packet mark grants access, since any process
    with CAP_NET_RAW can set one), and so do sockets created in the cgroup
    of a running unit of ``allow_units``: ``allow_cgroups`` holds (unit,
    cgroup path, cgroup inode) of each one found running when the rule set
    was built (see :mod:`imdsguard.cgroups`: the inode tells a restarted
    unit's new cgroup from the old one). A unit without a cgroup gets no rule.
    Everything else to ``endpoints`` is denied with ``action`` in enforce
    mode; in audit mode nothing is denied. ``capture`` is how denied (audit:
    audited) packets reach a running daemon (see :class:`~imdsguard.domain.Capture`):
    ``queue`` through NFQUEUE :data:`QUEUE_NUM` first, so the daemon can
    attribute them (see imdsguard.firewall.iptables for how that stays
    fail-closed); ``log`` a copy to NFLOG group :data:`QUEUE_NUM`; ``none``
    without a daemon. ``containers == deny`` also denies IMDS traffic that
    the host forwards (from local bridges: Docker, CNI, podman), where no
    owner is known.
    """

    endpoints_v4: tuple[str, ...]
    endpoints_v6: tuple[str, ...]
    allow_uids: tuple[int, ...]
    allow_gids: tuple[int, ...]
    action: Action = Action.REJECT
    mode: Mode = Mode.ENFORCE
    capture: Capture = Capture.NONE
    containers: Containers = Containers.DENY
    allow_units: tuple[str, ...] = ()
    allow_cgroups: tuple[tuple[str, str, int], ...] = ()

    @property
    def enforcing(self) -> bool:
        """True when denied traffic is actually blocked (not audit mode)."""
        return self.mode == Mode.ENFORCE

    def endpoints(self, family: str) -> tuple[str, ...]:
        """The endpoint addresses of one family (``ipv4`` or ``ipv6``)."""
        return self.endpoints_v4 if family == "ipv4" else self.endpoints_v6

    def families(self) -> tuple[str, ...]:
        """The families that have at least one endpoint, in a fixed order."""
        return tuple(f for f in FAMILIES if self.endpoints(f))

    def units_not_running(self) -> tuple[str, ...]:
        """The configured units that had no cgroup (so no rule) when this was built."""
        running = {unit for unit, _, _ in self.allow_cgroups}
        return tuple(u for u in self.allow_units if u not in running)

    def to_json(self) -> str:
        """A stable serialisation, used to record what the daemon applied."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RuleSet:
        """Inverse of :meth:`to_json`; also reads older records.

        Before ``capture`` a record had ``queue_num`` (a number: queued, read
        as ``queue``; null: ``none``); before ``containers`` nothing forwarded
        was denied (``allow``).
        """
        data = json.loads(text)
        if "capture" in data:
            capture = Capture.parse(data["capture"])
        else:
            capture = Capture.NONE if data.get("queue_num") is None else Capture.QUEUE
        return cls(
            endpoints_v4=tuple(data["endpoints_v4"]),
            endpoints_v6=tuple(data["endpoints_v6"]),
            allow_uids=tuple(data["allow_uids"]),
            allow_gids=tuple(data["allow_gids"]),
            action=Action.parse(data["action"]),
            mode=Mode.parse(data["mode"]),
            capture=capture,
            containers=Containers.parse(data.get("containers", Containers.ALLOW)),
            allow_units=tuple(data.get("allow_units", ())),
            allow_cgroups=tuple(
                (str(u), str(p), int(i)) for u, p, i in data.get("allow_cgroups", ())
            ),
        )


def capture_for(capabilities: Capabilities | None, capturing: bool) -> Capture:
    """How denied packets are captured: the one place that decides.

    ``capturing``: the daemon's capture component runs (it listens on
    :data:`QUEUE_NUM`); then the backend's own way (``queue`` where the
    kernel can queue from it, else ``log``), otherwise ``none``: rules that
    need no daemon.
    """
    if not capturing or capabilities is None:
        return Capture.NONE
    return capabilities.capture


def build_ruleset(
    config: Config,
    *,
    extra_uids: tuple[int, ...] = (),
    capabilities: Capabilities | None = None,
    capturing: bool = False,
    unit_cgroups: Mapping[str, UnitCgroup | None] | None = None,
) -> RuleSet:
    """The rule set for ``config``.

    ``extra_uids`` are identities the daemon itself needs (the broker's
    system user, :func:`imdsguard.identity.service_uids`) and are allowed in
    addition to the configured users. ``capabilities`` (the backend's) and
    ``capturing`` decide :attr:`RuleSet.capture` (see :func:`capture_for`).
    ``unit_cgroups`` is where each of ``allow.units`` runs now
    (:func:`imdsguard.cgroups.resolve`); a unit missing from it or None
    there is not running and gets no rule.
    """
    found = unit_cgroups or {}
    cgroups = tuple(
        (unit, cg.path, cg.inode)
        for unit in config.allow.units
        if (cg := found.get(unit)) is not None
    )
    v4 = [str(e) for e in config.endpoints if isinstance(e, ipaddress.IPv4Address)]
    v6 = [str(e) for e in config.endpoints if isinstance(e, ipaddress.IPv6Address)]
    uids = sorted({p.id for p in config.allow.users} | set(extra_uids))
    gids = sorted({p.id for p in config.allow.groups})
    return RuleSet(
        endpoints_v4=tuple(v4),
        endpoints_v6=tuple(v6),
        allow_uids=tuple(uids),
        allow_gids=tuple(gids),
        action=Action(config.action),
        mode=Mode(config.mode),
        capture=capture_for(capabilities, capturing),
        containers=Containers(config.containers),
        allow_units=config.allow.units,
        allow_cgroups=cgroups,
    )
