# imdsguard: two commands on a fresh Debian 12 as root: `make demo` and `make test`.
# Each installs what it needs (OS packages, .venv) idempotently, then runs.

SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PACKAGES := iptables nftables python3-nftables iproute2 curl util-linux passwd gcc python3-venv python3-dev prometheus
# Real EC2 clients for tests/integration/test_clients.py. cloud-init must never run
# on this host: cloud-init.disabled is in place before it is installed, and no
# recommends come with it (its postinst only links units, starts nothing).
CLIENT_PACKAGES := cloud-init amazon-ec2-utils cloud-guest-utils awscli
TEST_DEPS := pytest ruff 'mypy==1.19.1' types-PyYAML types-psutil botocore hypothesis prometheus-client

.PHONY: help deps os-deps client-deps venv demo test test-long test-vm test-unit test-integration lint typecheck bench clean

help:
	@echo "make demo   - run the guard end to end in throw-away network namespaces (root)"
	@echo "make test   - lint, type check, unit and real-kernel integration tests (root)"
	@echo "make test-long - the long reliability suite (100 restarts, 100 SIGHUPs, 60 kill -9, long fuzzing)"
	@echo "make test-vm - the kernel-specific tests on Debian's stock kernel in a VM (QEMU, ~20 min)"
	@echo "make bench  - benchmarks (figures for docs/benchmarks.md)"
	@echo "make rpm    - build the RPM for Amazon Linux 2023 / RHEL 9 (build/rpm/)"
	@echo "make deb    - build the .deb for Debian 12 / Ubuntu 22.04+ (build/deb/); make lintian checks it"
	@echo "make test-system - boot the packaged unit under systemd-nspawn and check it"

os-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing OS packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The tests' real EC2 clients (not needed by the demo).
client-deps: os-deps
	@missing=""; for p in $(CLIENT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing test clients:$$missing"; \
	  mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null; \
	fi

# What the demo needs: the package and its runtime dependencies.
$(VENV)/.runtime: pyproject.toml | os-deps
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(VPY) -m pip install -q --disable-pip-version-check -e .
	touch $@

# What the tests add: linters, type checker, test libraries.
$(VENV)/.installed: $(VENV)/.runtime Makefile  # TEST_DEPS live here
	$(VPY) -m pip install -q --disable-pip-version-check $(TEST_DEPS)
	touch $@

# The nftables backend drives libnftables in-process through the distribution's
# binding (python3-nftables: ctypes over libnftables.so.1, so it must match the
# installed nftables; it is not on PyPI). The venv sees that one package through
# a symlink, not --system-site-packages: the rest of dist-packages (an older
# structlog, yaml, ...) must not shadow or satisfy what pip installs here.
NFT_BINDING := /usr/lib/python3/dist-packages/nftables
$(VENV)/.nftables: $(VENV)/.runtime
	ln -sfn $(NFT_BINDING) "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nftables"
	$(VPY) -c 'import nftables; nftables.Nftables()'
	touch $@

venv: os-deps client-deps $(VENV)/.installed $(VENV)/.nftables

deps: venv rpm-os-deps

# Only the runtime: no test or packaging toolchain before the first demo line.
demo: os-deps $(VENV)/.runtime $(VENV)/.nftables
	$(VPY) -m imdsguard_testing.demo

lint: deps
	$(VENV)/bin/ruff check --target-version py39 imdsguard imdsguard_testing tests benchmarks
	$(VENV)/bin/ruff format --check imdsguard imdsguard_testing tests benchmarks

typecheck: deps
	$(VENV)/bin/mypy imdsguard imdsguard_testing

test-unit: deps
	$(VPY) -m pytest -q tests/unit

test-integration: deps
	$(VPY) -m pytest -q tests/integration

# One pytest run over everything, so the closing line counts all tests; exit 5
# (no tests collected) fails like any other non-zero exit.
test: lint typecheck
	$(VPY) -m pytest -q -m "not long" tests

# The long versions of the reliability scenarios (the short ones run in
# `make test`) and the fuzzers with 10x the examples: about 8 minutes.
test-long: deps
	$(VPY) -m pytest -q -m long tests
	IMDSGUARD_FUZZ_EXAMPLES=3000 $(VPY) -m pytest -q tests/unit/config/test_validate_fuzz.py tests/unit/broker/test_server_fuzz.py

# The tests marked `kernel` on Debian's stock kernel (nft_queue, cgroup v2), booted
# under QEMU: tests/vm/run.sh. VM_TESTS picks other pytest arguments.
VM_TESTS ?= -m "kernel and not long" tests/integration
test-vm: venv
	tests/vm/run.sh $(VM_TESTS)

bench: deps
	PYTHONPATH=. $(VPY) benchmarks/repair.py
	PYTHONPATH=. $(VPY) benchmarks/flushrace.py
	PYTHONPATH=. $(VPY) benchmarks/nftcall.py
	PYTHONPATH=. $(VPY) benchmarks/attribution.py
	PYTHONPATH=. $(VPY) benchmarks/broker.py
	PYTHONPATH=. $(VPY) benchmarks/resources.py
	PYTHONPATH=. $(VPY) benchmarks/flood.py
	PYTHONPATH=. $(VPY) benchmarks/flood.py --backend nftables

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

-include packaging/rpm.mk
-include packaging/deb.mk
