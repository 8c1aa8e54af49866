"""The native nftables backend: one table of our own, changed in one transaction.

Layout (``nft list table inet imdsguard``)::

    table inet imdsguard {
        set allow_uids { type uid; elements = { 0, 1001 } }   # users + expanded groups
        set imds_v4 { type ipv4_addr; elements = { 169.254.169.254 } }
        set imds_v6 { type ipv6_addr; elements = { fd00:ec2::254 } }
        chain output {
            type filter hook output priority -10; policy accept;
            ip daddr @imds_v4 jump guard
            ip6 daddr @imds_v6 jump guard
        }
        chain deny {
            meta l4proto tcp reject with tcp reset
            reject
        }
        chain units {            # allow.units: one rule per running unit
            socket cgroupv2 level 2 "system.slice/amazon-ssm-agent.service" accept
        }
        chain guard {
            meta skuid @allow_uids accept
            jump units               # only with allow.units
            meta skuid 0-4294967294 goto deny
            ct state established,related accept
            goto deny
        }
        chain forward {          # containers: deny
            type filter hook forward priority -10; policy accept;
            ip daddr @imds_v4 jump fwd_guard
            ip6 daddr @imds_v6 jump fwd_guard
        }
        chain fwd_guard { ... }  # the rules of deny: nothing forwarded is allowed
    }

With capture ``queue``, the deny rules are preceded by a ``queue`` to the
daemon and apply to packets back from it (their connection flagged in its
conntrack mark: no packet mark decides anything), as in
:mod:`imdsguard.firewall.iptables`. With capture ``log`` (a kernel without
nft_queue) a ``log group`` rule copies each packet to the daemon first and
the deny is immediate.

Why this is safe next to other firewalls: an ``accept`` in another table (or
an iptables-nft rule) only ends *that* table's evaluation; our table still
sees the packet and our ``reject``/``drop`` is final. So no other tool can
open IMDS by accepting early, and our own ``accept`` opens nothing the
host's rules close.

``meta skuid``/``skgid`` can only match a socket's uid and *primary* gid, so
allowed groups are expanded to their member uids (primary and
supplementary) every time the rules are rendered; the daemon re-checks
regularly, so an edit of /etc/passwd or /etc/group is picked up.

Every change is one ``nft -j -f -`` batch (add table; delete table; add
everything) which the kernel applies atomically. The one exception is the
``units`` chain: nft's JSON parser (1.0.6, Debian 12) does not know
``socket cgroupv2``, so its rules are loaded in nft's own syntax, as a
second transaction (flush the chain, add its rules) that also runs alone
when only a unit's cgroup changed. Right after a whole-table replacement
the chain is empty for that second transaction's duration: the units'
processes are denied meanwhile, nothing else is opened. Each rule carries a comment
with a hash of its expression, so drift is found by comparing comments, set
elements and chain hooks with what the policy renders.
"""

from imdsguard.firewall.nftables.backend import REUSE, NftablesBackend
from imdsguard.firewall.nftables.compare import combine, compare
from imdsguard.firewall.nftables.context import Context, load_binding
from imdsguard.firewall.nftables.render import (
    BACKSTOP,
    BACKSTOP_PRIORITY,
    FAMILY,
    PRIORITY,
    TABLE,
    UNITS,
    Cmd,
    Plan,
    expand_groups,
    render,
    render_backstop,
)

__all__ = [
    "BACKSTOP",
    "BACKSTOP_PRIORITY",
    "FAMILY",
    "PRIORITY",
    "REUSE",
    "TABLE",
    "UNITS",
    "Cmd",
    "Context",
    "NftablesBackend",
    "Plan",
    "combine",
    "compare",
    "expand_groups",
    "load_binding",
    "render",
    "render_backstop",
]
