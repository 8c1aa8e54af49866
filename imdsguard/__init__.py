"""imdsguard: an on-instance guard for the cloud instance metadata service."""

__version__ = "0.1.0"
