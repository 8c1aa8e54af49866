#!/usr/bin/env bash
# make test-vm: the kernel-specific tests on Debian's stock kernel, in a VM.
#
# This machine's kernel lacks nft_queue (CONFIG_NFT_QUEUE) and mounts cgroups
# hybrid; the kernels users run (Debian/Ubuntu, AL2023, RHEL 9) have both. So:
# download the kernel that Debian's linux-image-amd64 depends on today
# (cached), boot it under QEMU with virtme-ng (the guest shares the host's /
# read-only, with overlays), run a pytest selection inside, and exit with
# pytest's status. A VM that does not boot, or dies before pytest reports, is
# a failure; so is pytest's exit 5 (nothing collected).
#
#   tests/vm/run.sh [PYTEST ARGS...]      default: $VM_TESTS_DEFAULT below
#
# Environment: IMDSGUARD_VM_CACHE (default /var/cache/imdsguard-test),
# IMDSGUARD_VM_OUT (junit report, log, timings; default build/test-vm),
# IMDSGUARD_TIME_SCALE (default 15: emulation is ~10-20x slower than native),
# IMDSGUARD_VM_TIMEOUT (seconds for the whole VM, default 1500),
# IMDSGUARD_VM_KERNEL_PKG (e.g. linux-image-6.1.0-57-amd64: pin a kernel).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${IMDSGUARD_VM_CACHE:-/var/cache/imdsguard-test}
OUT=${IMDSGUARD_VM_OUT:-$REPO/build/test-vm}
SCALE=${IMDSGUARD_TIME_SCALE:-15}
VM_TIMEOUT=${IMDSGUARD_VM_TIMEOUT:-1500}
VNG_VERSION=1.42
HOST_PACKAGES=(qemu-system-x86 qemu-system-common udev kmod file busybox-static)
VM_TESTS_DEFAULT=(-m "kernel and not long" tests/integration)

log() { printf 'test-vm: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces and the firewall inside the VM)"
[ -x "$REPO/.venv/bin/python" ] || die "no $REPO/.venv: run 'make venv' first"

host_packages() {
  local missing=() p
  for p in "${HOST_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing OS packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
}

kernel_package() {
  if [ -n "${IMDSGUARD_VM_KERNEL_PKG:-}" ]; then echo "$IMDSGUARD_VM_KERNEL_PKG"; return; fi
  local pkg
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || die "cannot tell which kernel linux-image-amd64 depends on"
  echo "$pkg"
}

# Unpacked into $CACHE/kernel-VERSION (~470 MB); older ones are dropped.
fetch_kernel() {
  local pkg=$1 kver=${1#linux-image-} dir="$CACHE/kernel-${1#linux-image-}"
  if [ ! -e "$dir/.complete" ]; then
    log "downloading $pkg"
    mkdir -p "$CACHE/debs"
    rm -rf "$dir" "$dir.tmp" "$CACHE"/debs/*
    (cd "$CACHE/debs" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    local deb
    deb=$(ls "$CACHE"/debs/"$pkg"_*.deb 2>/dev/null | head -n1)
    [ -n "$deb" ] || die "apt-get download $pkg failed"
    dpkg-deb -x "$deb" "$dir.tmp"
    # The package leaves modules.dep to its postinst; the guest's modprobe needs it.
    depmod -b "$dir.tmp" "$kver"
    touch "$dir.tmp/.complete"
    mv "$dir.tmp" "$dir"
    rm -f "$deb"
    find "$CACHE" -maxdepth 1 -name 'kernel-*' ! -name "kernel-$kver" -exec rm -rf {} +
  fi
  echo "$dir"
}

virtme_ng() {
  local venv="$CACHE/vng-venv"
  if [ ! -e "$venv/.installed-$VNG_VERSION" ]; then
    log "installing virtme-ng $VNG_VERSION into $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "virtme-ng==$VNG_VERSION"
    touch "$venv/.installed-$VNG_VERSION"
  fi
  echo "$venv/bin"
}

host_packages
KPKG=$(kernel_package)
KDIR=$(fetch_kernel "$KPKG")
VNG_BIN=$(virtme_ng)
KIMG=$(ls "$KDIR"/boot/vmlinuz-* | head -n1)

[ $# -gt 0 ] || set -- "${VM_TESTS_DEFAULT[@]}"
rm -rf "$OUT"
mkdir -p "$OUT"
printf '%s\n' "$@" > "$OUT/pytest-args"

log "kernel $KPKG ($(basename "$KIMG")), time scale $SCALE, timeout ${VM_TIMEOUT}s, tests: $*"
start=$EPOCHREALTIME
booted=""
# The guest's / is the host's, read-only: the worktree and its .venv are seen
# where they are; only $OUT is writable (and $CACHE readable: the modules).
set +e
PATH="$REPO/tests/vm/bin:$VNG_BIN:$PATH" timeout -k 30 "$VM_TIMEOUT" \
  vng --run "$KIMG" --disable-kvm --cpus 2 --memory 2G \
  --rodir "$CACHE" --rwdir "$OUT" \
  --exec "bash $REPO/tests/vm/guest.sh $REPO $OUT $SCALE" </dev/null 2>&1 |
  while IFS= read -r line; do
    now=$EPOCHREALTIME
    if [ -z "$booted" ] && [[ $line == "imdsguard-vm: booted"* ]]; then
      booted=1
      awk -v a="$start" -v b="$now" 'BEGIN {printf "%.1f\n", b - a}' > "$OUT/boot-seconds"
    fi
    printf '%s\n' "$line"
  done | tee "$OUT/console.log"
vm_rc=${PIPESTATUS[0]}
set -e
end=$EPOCHREALTIME

total=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}')
boot=$(cat "$OUT/boot-seconds" 2>/dev/null || echo "?")
{
  echo "kernel: $KPKG"
  echo "boot_seconds: $boot"
  echo "vm_seconds: $total"
  echo "vm_exit: $vm_rc"
  echo "pytest_exit: $(cat "$OUT/pytest.rc" 2>/dev/null || echo none)"
} > "$OUT/summary.txt"
log "$(tr '\n' ' ' < "$OUT/summary.txt")"

[ "$vm_rc" -ne 124 ] && [ "$vm_rc" -ne 137 ] || die "the VM did not finish within ${VM_TIMEOUT}s"
[ -s "$OUT/pytest.rc" ] || die "pytest never reported inside the VM (vng exit $vm_rc): see $OUT/console.log"
rc=$(cat "$OUT/pytest.rc")
[ "$rc" -eq 0 ] || die "pytest inside the VM exited $rc (junit: $OUT/junit.xml)"
[ "$vm_rc" -eq 0 ] || die "the VM exited $vm_rc after pytest passed"
log "passed; junit report: $OUT/junit.xml"
