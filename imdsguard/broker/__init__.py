"""The credential broker: IMDSv2 role credentials for allowlisted local processes.

- :mod:`imdsguard.broker.cache`: the credential cache, refreshed ahead of
  expiry, statically stable when IMDS fails.
- :mod:`imdsguard.broker.peer`: who is on the other end of the socket, and
  whether ``broker.clients`` allows it.
- :mod:`imdsguard.broker.server`: HTTP/1.1 over the Unix socket
  (:class:`~imdsguard.broker.server.Broker`, a daemon component).
- :mod:`imdsguard.broker.client`: the client side, ``imdsguard credentials``.

Kept import-free so that ``imdsguard credentials`` (run by AWS SDKs on every
credential refresh) loads only the client module.
"""
