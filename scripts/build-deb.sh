#!/usr/bin/env bash
# Build the Debian package with dh-virtualenv and check it with lintian.
#   scripts/build-deb.sh [OUTDIR]      (default build/deb) -> OUTDIR/edgekeeper_<v>_<arch>.deb
# The working tree (tracked and untracked, not ignored files) is what gets packaged.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[build-deb] %s\n' "$*" >&2; }
OUT=${1:-build/deb}
source scripts/lib.sh
NEED=(dh-virtualenv debhelper lintian build-essential fakeroot python3-venv python3-dev)
apt_ensure "${NEED[@]}"
version=$(dpkg-parsechangelog -S Version)
src="$OUT/edgekeeper-$version"
rm -rf "$src"; mkdir -p "$src"
git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$src"
log "dpkg-buildpackage in $src"
( cd "$src" && dpkg-buildpackage -us -uc -b >"../build.log" 2>&1 ) || {
  tail -40 "$OUT/build.log" >&2; exit 1; }
deb=$(ls "$OUT"/edgekeeper_"$version"_*.deb)
log "lintian $deb"
# Errors fail the build; warnings and info are listed (tests/test_deb.py reads them).
lintian --fail-on error --tag-display-limit 0 "$deb" | tee "$OUT/lintian.txt" >&2
log "built $deb ($(du -h "$deb" | cut -f1))"
echo "$deb"
