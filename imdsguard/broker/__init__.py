"""The credential broker: IMDSv2 role credentials for allowlisted local processes.

- :mod:`imdsguard.broker.cache`: the credential cache, refreshed ahead of
  expiry, statically stable when IMDS fails.
- :mod:`imdsguard.broker.peer`: who is on the other end of the socket, and
  whether ``broker.clients`` allows it.
- :mod:`imdsguard.broker.server`: HTTP/1.1 over the Unix socket
  (:class:`~imdsguard.broker.server.Broker`, a daemon component): the
  accept loop and the routes; HTTP parsing and responses in
  :mod:`imdsguard.broker._http`.
- :mod:`imdsguard.broker.socketfile`: binding the socket file safely,
  refusing a live one, unlinking only our own.
- :mod:`imdsguard.broker.checks`: who is a client (in-process or over the
  daemon's channel), refusals logged.
- :mod:`imdsguard.broker.client`: the client side, ``imdsguard credentials``.

Kept import-free so that ``imdsguard credentials`` (run by AWS SDKs on every
credential refresh) loads only the client module.
"""
