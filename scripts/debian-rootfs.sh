#!/usr/bin/env bash
# A fresh Debian 12 (bookworm) root filesystem for the package tests, made once with
# debootstrap and kept under /var/cache/edgekeeper-test (tests copy it before changing it).
#   scripts/debian-rootfs.sh [ARCH]    (default: this machine's) -> prints its path
# ARCH other than the host's (arm64, armhf) runs under qemu-user-static.
set -euo pipefail
log() { printf '[debian-rootfs] %s\n' "$*" >&2; }
ARCH=${1:-$(dpkg --print-architecture)}
CACHE=${EDGEKEEPER_TEST_CACHE:-/var/cache/edgekeeper-test}
ROOT="$CACHE/bookworm-$ARCH"
source "$(dirname "$0")/lib.sh"
if [ -f "$ROOT/.complete" ]; then echo "$ROOT"; exit 0; fi
NEED=(debootstrap)
[ "$ARCH" != "$(dpkg --print-architecture)" ] && NEED+=(qemu-user-static binfmt-support)
apt_ensure "${NEED[@]}"
if [ "$ARCH" != "$(dpkg --print-architecture)" ]; then
  # Foreign binaries run through qemu-user-static's binfmt handlers: the kernel's
  # binfmt_misc must be mounted (systemd does it at boot; a container may not have it).
  [ -e /proc/sys/fs/binfmt_misc/register ] || \
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  qemu=$(case "$ARCH" in arm64) echo qemu-aarch64;; armhf|armel) echo qemu-arm;; *) echo "qemu-$ARCH";; esac)
  [ -e "/proc/sys/fs/binfmt_misc/$qemu" ] || $SUDO update-binfmts --enable "$qemu"
fi
$SUDO rm -rf "$ROOT"; $SUDO mkdir -p "$CACHE"
log "debootstrap bookworm $ARCH into $ROOT"
# minbase plus what a Raspberry Pi OS Lite image has anyway: apt can install a local .deb
$SUDO debootstrap --variant=minbase --arch="$ARCH" --include=ca-certificates \
  bookworm "$ROOT" http://deb.debian.org/debian >"$CACHE/debootstrap-$ARCH.log" 2>&1 || {
  tail -20 "$CACHE/debootstrap-$ARCH.log" >&2; exit 1; }
$SUDO touch "$ROOT/.complete"
echo "$ROOT"
