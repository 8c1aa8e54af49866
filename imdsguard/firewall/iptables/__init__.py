"""The iptables backend, through python-iptables (libiptc, the legacy x_tables API).

Layout, per family (``filter`` table of iptables and ip6tables)::

    -A OUTPUT -d 169.254.169.254/32 -j IMDSGUARD        (first rules of OUTPUT)
    -A FORWARD -d 169.254.169.254/32 -j IMDSGUARD-FWD   (containers: deny; also
                                                         first in DOCKER-USER)
    -A IMDSGUARD -m owner --uid-owner 0 -j RETURN
    -A IMDSGUARD -m owner --gid-owner 1001 --suppl-groups -j RETURN
    -A IMDSGUARD -m cgroup --path system.slice/amazon-ssm-agent.service
                 -m comment --comment "imdsguard unit amazon-ssm-agent.service cgroup 8812"
                 -j RETURN                               (allow.units, running ones only)
    -A IMDSGUARD -m owner ! --uid-owner 0-4294967294 -m conntrack --ctstate RELATED,ESTABLISHED
                 -j RETURN                               (TEARDOWN: owner-less packets
                                                          of allowed connections)
    -A IMDSGUARD -p tcp -m tcp -m connmark --mark 0x1000/0x1000 -m mark --mark 0x1000/0x1000
                 -j REJECT --reject-with tcp-reset       (seen: back from the queue)
    -A IMDSGUARD -m connmark --mark 0x1000/0x1000 -m mark --mark 0x1000/0x1000
                 -j REJECT --reject-with icmp-port-unreachable
    -A IMDSGUARD -m conntrack --ctstate NEW,RELATED,ESTABLISHED
                 -j CONNMARK --set-xmark 0x1000/0x1000   (capture on: flag the connection,
    -A IMDSGUARD -m conntrack --ctstate NEW,RELATED,ESTABLISHED
                 -j NFQUEUE --queue-num 5421              the daemon attributes, repeats)
    -A IMDSGUARD -p tcp -m tcp -j REJECT --reject-with tcp-reset   (untracked: at once)
    -A IMDSGUARD -j REJECT --reject-with icmp-port-unreachable

Without capture there are only the last two REJECTs. The queue has no
``--queue-bypass`` in enforce mode: with nobody listening the packet is
dropped, never admitted. No packet mark decides anything: a socket's
``SO_MARK`` (which CAP_NET_RAW alone allows) can neither admit a packet nor
keep it from the queue, see :data:`imdsguard.policy.MARK_SEEN`.

Allowed traffic RETURNs rather than ACCEPTs: we never open anything the host's
own rules would close. Every change is made on one libiptc handle and
committed once, which replaces the whole table in a single setsockopt, so a
reload never lets a denied packet through.
"""

from imdsguard.firewall.iptables.backend import (
    FULL_CHECK_EVERY,
    FULL_INTERVAL,
    QUICK_INTERVAL,
    TABLE_NAMES,
    IptablesBackend,
    legacy_table_exists,
    legacy_tables,
)
from imdsguard.firewall.iptables.compare import Snapshot, compare
from imdsguard.firewall.iptables.render import (
    AUDITED,
    CHAIN,
    DOCKER_USER,
    FORWARDED,
    HOOKS,
    OUR_CHAINS,
    TEARDOWN,
    Params,
    Rendered,
    XtRule,
    render,
)

__all__ = [
    "AUDITED",
    "CHAIN",
    "DOCKER_USER",
    "FORWARDED",
    "FULL_CHECK_EVERY",
    "FULL_INTERVAL",
    "HOOKS",
    "OUR_CHAINS",
    "QUICK_INTERVAL",
    "TABLE_NAMES",
    "TEARDOWN",
    "IptablesBackend",
    "Params",
    "Rendered",
    "Snapshot",
    "XtRule",
    "compare",
    "legacy_table_exists",
    "legacy_tables",
    "render",
]
