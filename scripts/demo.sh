#!/usr/bin/env bash
# The README's main job: set everything up, write the digits example (data + a trained
# teacher), then distill, quantize and package it for a firmware profile, and show the report.
#   scripts/demo.sh [PROFILE]        (default raspberry-pi-4; `edge-convert profiles` lists them)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
PROFILE=${1:-raspberry-pi-4}
V=.venv/bin
OUT=build/demo
if [ ! -f "$OUT/example/recipe.toml" ]; then
  echo "== 1. writing the digits example: scikit-learn digits + a wide CNN teacher trained here"
  "$V/edge-convert" example digits --out "$OUT/example" --profile "$PROFILE"
fi
echo "== 2. edge-convert run: distill -> export ONNX -> int8 (ONNX QDQ + TFLite) -> evaluate -> bundle, for $PROFILE"
"$V/edge-convert" run "$OUT/example/recipe.toml" --target-profile "$PROFILE" \
  --out "$OUT/$PROFILE" --force --distill-progress false
echo
echo "== 3. the report ($OUT/$PROFILE/report.md; plot in report.png, figures in report.json)"
cat "$OUT/$PROFILE/report.md"
echo
echo "== 4. the bundle, ready to sign: $OUT/$PROFILE/bundle"
ls -l "$OUT/$PROFILE/bundle"
"$V/edge-fleet" bundle inspect "$OUT/$PROFILE/bundle"
