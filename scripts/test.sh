#!/usr/bin/env bash
# The README's test command: set everything up, then lint, type-check and run the tests.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k profiles`, `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
V=.venv/bin
echo "== ruff"; "$V/ruff" check .
echo "== mypy (strict)"; "$V/mypy"
echo "== pytest"
"$V/pytest" -m "not slow" "$@"
