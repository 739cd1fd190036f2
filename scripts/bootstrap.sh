#!/usr/bin/env bash
# Idempotent setup on a fresh Debian/Ubuntu machine: apt packages, .venv, torch first, the
# project with all extras. Safe to run again: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[bootstrap] %s\n' "$*" >&2; }
source scripts/lib.sh

# --- apt: what the tests and the agent need from the system -------------------------------
# e2fsprogs, mount: the power-cut harness (ext4 on a loop device, tests/powercut.py);
# prometheus: promtool and a real Prometheus scraping the agent (tests/test_monitoring.py);
# systemd-container: the packaged agent booted under a real systemd (tests/test_systemd_boot.py)
# gcc, libc6-dev, libssl-dev, libmosquitto-dev, mosquitto-dev: the broker's guard plugin
# (fleet/mosquitto/edge_fleet_guard.c, built by `edge-fleet broker-config`);
# postgresql: the fleet record on PostgreSQL (fleet/postgres.py starts a cluster of its own, as
# the postgres user on a free loopback port; the distribution's own cluster is not used)
APT_PKGS=(mosquitto mosquitto-clients systemd chromium e2fsprogs mount prometheus curl systemd-container
          gcc libc6-dev libssl-dev libmosquitto-dev mosquitto-dev postgresql)
PY=""
for cand in python3.11 python3.12 python3.13 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PY=$(command -v "$cand"); break
  fi
done
[ -z "$PY" ] && APT_PKGS+=(python3 python3-venv python3-dev)
if [ -n "$PY" ] && ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then APT_PKGS+=(python3-venv); fi
apt_ensure "${APT_PKGS[@]}"
[ -z "$PY" ] && PY=$(command -v python3)

# --- virtual environment -----------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"

# torch first and pinned: an unpinned torch (asked for by litert-torch) would resolve to a
# multi-GB CUDA build.
if ! "$VPY" -c 'import torch, sys; sys.exit(not torch.__version__.startswith("2.13.0"))' 2>/dev/null; then
  log "installing torch==2.13.0 (CPU)"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==2.13.0"
fi

# The project and its extras; skipped when pyproject.toml has not changed since last time.
STAMP=.venv/.edge-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  log "installing edgekeeper[convert,tflite,onnx,fleet,dev] (editable)"
  # The distribution was called edge-agent before (a name PyPI gives someone else).
  "$VPY" -m pip uninstall -q -y edge-agent 2>/dev/null || true
  "$VPY" -m pip install -q -e ".[convert,tflite,onnx,fleet,dev]" "torch==2.13.0"
  # onnx2torch (ONNX models to int8 TFLite, converter/onnx_torch.py) without its declared
  # torchvision: PyPI's torchvision needs a CUDA torch and would replace the CPU one; the
  # converter stands in for the two detection operators that import it.
  "$VPY" -m pip install -q --no-deps "onnx2torch==1.5.15"
  echo "$WANT" > "$STAMP"
fi
log "ready: $("$VPY" --version), torch $("$VPY" -c 'import torch; print(torch.__version__)')"
