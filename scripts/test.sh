#!/usr/bin/env bash
# The README's test command: set everything up, then lint, type-check and run the tests,
# then the agent's own tests again in the lean device environments (scripts/test-device.sh)
# and a smoke part of them on aarch64 under emulation (scripts/test-aarch64.sh --smoke).
# Extra arguments go to the main pytest run (e.g. `scripts/test.sh -k profiles`);
# EDGE_SKIP_DEVICE_ENVS=1 skips the device environments for a quick local run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
V=.venv/bin
echo "== ruff"; "$V/ruff" check .
echo "== mypy (strict)"; "$V/mypy"
echo "== pytest"
# On both cores (pytest-xdist): most tests wait on agents, brokers and databases of their own.
# The package tests share one build and run on one worker (their xdist_group); `-n 0` after
# the command runs everything in one process.
"$V/pytest" -n 2 --dist loadgroup --durations=25 "$@"  # the slowest in the log: CI has 30 min
if [ "${EDGE_SKIP_DEVICE_ENVS:-0}" != 1 ]; then
  echo "== device environments: the agent with its own dependencies only"
  scripts/test-device.sh
  echo "== aarch64 (Debian 12 arm64 under qemu-user-static), smoke part"
  scripts/test-aarch64.sh --smoke
fi
