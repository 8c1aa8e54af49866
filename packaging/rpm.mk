# Packaging targets, included from the top-level Makefile:
#   make rpm               build the RPM (and SRPM) into build/rpm/
#   make test-system       boot the packaged unit under a real systemd (nspawn) and prove it
#   make clean-test-rootfs drop the cached Debian rootfs the system test boots
# rpm-os-deps installs the OS packages these need (idempotent, like os-deps).

RPM_APT_PACKAGES := rpm cpio debootstrap systemd-container systemd python3-pip python3-yaml gcc unzip rpmlint lintian
RPM_PYTHON ?= /usr/bin/python3
RPM_VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' imdsguard/__init__.py)
RPM_TOPDIR := $(CURDIR)/build/rpm
RPM_SOURCEDIR := $(RPM_TOPDIR)/SOURCES
RPM_TARBALL := $(RPM_SOURCEDIR)/imdsguard-$(RPM_VERSION).tar.gz
RPM_VENDOR_STAMP := $(RPM_SOURCEDIR)/.vendor-$(shell sha256sum packaging/rpm/vendor.txt | cut -c1-12)
RPM_ARCH := $(shell rpm --eval '%{_arch}' 2>/dev/null || uname -m)
RPM_FILE := $(RPM_TOPDIR)/RPMS/$(RPM_ARCH)/imdsguard-$(RPM_VERSION)-1.$(RPM_ARCH).rpm
# What goes into the source tarball (and so into the package).
RPM_INPUTS := imdsguard README.md LICENSE pyproject.toml docs systemd packaging
RPM_INPUT_FILES = $(shell find $(RPM_INPUTS) -type f -not -path '*/__pycache__/*' -not -name '*.pyc')
RPMBUILD_FLAGS ?=

RPM_TEST_CACHE ?= /var/cache/imdsguard-test

.PHONY: rpm rpm-os-deps test-system clean-test-rootfs

# On an RPM-based build host (AL2023, RHEL 9) install the spec's BuildRequires
# yourself (dnf builddep packaging/rpm/imdsguard.spec); there rpmbuild checks them.
RPMBUILD_NODEPS := $(if $(wildcard /var/lib/dpkg/status),--nodeps)

rpm-os-deps:
	@command -v dpkg >/dev/null || exit 0; \
	missing=""; for p in $(RPM_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing OS packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The bundled dependencies, exactly the files pinned (by hash) in vendor.txt.
$(RPM_VENDOR_STAMP): packaging/rpm/vendor.txt | rpm-os-deps
	mkdir -p $(RPM_SOURCEDIR)
	$(RPM_PYTHON) -m pip download -q --disable-pip-version-check --no-deps --require-hashes \
	  -r packaging/rpm/vendor.txt -d $(RPM_SOURCEDIR)
	rm -f $(RPM_SOURCEDIR)/.vendor-*
	touch $@

# Source0 from the working tree: no git needed, only the paths the spec uses.
$(RPM_TARBALL): $(RPM_INPUT_FILES)
	mkdir -p $(RPM_SOURCEDIR)
	tar --sort=name --owner=0 --group=0 --numeric-owner --mode=go-w \
	  --exclude=__pycache__ --exclude='*.pyc' \
	  --transform 's,^,imdsguard-$(RPM_VERSION)/,' -czf $@ $(RPM_INPUTS)

# Source4: %pre creates the broker's user from it (read when the spec is parsed).
$(RPM_SOURCEDIR)/imdsguard.sysusers.conf: packaging/imdsguard.sysusers.conf
	mkdir -p $(RPM_SOURCEDIR)
	cp -p $< $@

$(RPM_FILE): $(RPM_TARBALL) $(RPM_VENDOR_STAMP) $(RPM_SOURCEDIR)/imdsguard.sysusers.conf packaging/rpm/imdsguard.spec
	rpmbuild -ba $(RPMBUILD_NODEPS) --quiet $(RPMBUILD_FLAGS) \
	  --define '_topdir $(RPM_TOPDIR)' --define '_sourcedir $(RPM_SOURCEDIR)' \
	  packaging/rpm/imdsguard.spec
	@ls -l $@ | awk '{print "built " $$NF " (" $$5 " bytes)"}'

rpm: rpm-os-deps $(RPM_FILE)

test-system: deps rpm-os-deps
	IMDSGUARD_TEST_CACHE=$(RPM_TEST_CACHE) $(VPY) -m pytest -q tests/system

clean-test-rootfs:
	rm -rf $(RPM_TEST_CACHE)
