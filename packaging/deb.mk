# The .deb for Debian 12 / Ubuntu 22.04+, included from the top-level Makefile:
#   make deb            build build/deb/imdsguard_<version>-<revision>_all.deb
#   make lintian        check it with lintian (findings kept: docs/packaging.md)
# Built with dpkg-deb from the source tree (packaging/deb/build-deb); every
# dependency comes from the distribution (Depends: in packaging/deb/control).

DEB_REVISION ?= 1
DEB_MAINTAINER ?= imdsguard maintainers <maintainers@imdsguard.invalid>
DEB_VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' imdsguard/__init__.py)-$(DEB_REVISION)
DEB_FILE := build/deb/imdsguard_$(DEB_VERSION)_all.deb
DEB_INPUT_FILES = $(shell find imdsguard packaging/deb systemd -type f -not -path '*/__pycache__/*' -not -name '*.pyc') \
  README.md LICENSE docs/ami.md docs/fleet.md docs/rules.md docs/benchmarks.md docs/packaging.md \
  docs/contract.md docs/architecture.md \
  packaging/config.yaml packaging/imdsguard.tmpfiles.conf packaging/manpage.py packaging/rpm/imdsguard.spec

.PHONY: deb lintian

$(DEB_FILE): $(DEB_INPUT_FILES)
	MAINTAINER='$(DEB_MAINTAINER)' packaging/deb/build-deb build/deb $(DEB_REVISION)

deb: $(DEB_FILE)

lintian: rpm-os-deps $(DEB_FILE)
	lintian --fail-on error,warning --pedantic $(DEB_FILE)
