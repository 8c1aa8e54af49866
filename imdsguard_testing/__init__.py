"""Test, demo and benchmark tooling for imdsguard: never installed on a host.

Lives beside the product package in the source checkout only (the wheel, the
RPM and the deb carry ``imdsguard`` alone): the simulated IMDS
(:mod:`imdsguard_testing.imds_sim`), the EC2-like network namespaces
(:mod:`imdsguard_testing.netns`) and ``make demo``
(:mod:`imdsguard_testing.demo`).
"""
