# Shared by the project's scripts: `source scripts/lib.sh`.

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

# apt_ensure PKG...: install the Debian packages not installed yet (apt-get update first,
# only when something is missing), quietly; idempotent.
apt_ensure() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  printf '[apt] apt-get install %s\n' "${missing[*]}" >&2
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
