"""Blocked-attempt events: capture (NFQUEUE), attribution (/proc), the event log.

- :mod:`.capture`: :class:`~.capture.Capture`, what the daemon runs.
- :mod:`.attribution`, :mod:`.procfs`, :mod:`.sockdiag`: from a packet to a process.
- :mod:`.packet`, :mod:`.nfqueue`, :mod:`.nflog`: the wire formats (netlink
  framing and the netfilter socket are :mod:`imdsguard.netlink`).
- :mod:`.flows`: folding retransmits into one event, rate limiting.
- :mod:`.event`: the event schema (:class:`~.event.Event`) and the line names.
- :mod:`.log`: the event log file and its readers; :mod:`.render`: events
  for people (console lines, escaping).
"""
