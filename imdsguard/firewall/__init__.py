"""Firewall backends: render a :class:`~imdsguard.policy.RuleSet` into kernel rules."""

from imdsguard.firewall.base import Backend, FamilyState, Inspection

__all__ = ["Backend", "FamilyState", "Inspection"]
