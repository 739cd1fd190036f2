#!/usr/bin/env bash
# The README's main job, end to end on this machine: set everything up, write the digits
# example (data + a trained teacher), distill, quantize and package it for a firmware
# profile, sign it, then run a fleet (broker, artifact server, two real agents, a simulated
# fleet), roll a release out in waves, infer, and watch a bad release halt and roll back.
#   scripts/demo.sh [--short] [PROFILE]   (default raspberry-pi-4; `edge-convert profiles`)
# --short: a quick conversion and a small fleet (the test suite runs it). EDGE_DEMO_OUT
# moves the output (default build/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
SHORT=()
QUICK=()
if [ "${1:-}" = "--short" ]; then
  SHORT=(--short)
  QUICK=(--distill-epochs 2 --evaluate-latency-runs 10 --data-calibration-samples 64
         --distill-max-gap-points 50)  # 2 epochs: a smoke run, not a good student
  shift
fi
scripts/bootstrap.sh
PROFILE=${1:-raspberry-pi-4}
V=.venv/bin
OUT=${EDGE_DEMO_OUT:-build/demo}
if [ ! -f "$OUT/example/recipe.toml" ]; then
  echo "== 1. writing the digits example: scikit-learn digits + a wide CNN teacher trained here"
  "$V/edge-convert" example digits --out "$OUT/example" --profile "$PROFILE"
fi
echo "== 2. edge-convert run: distill -> export ONNX -> int8 (ONNX QDQ + TFLite) -> evaluate -> bundle, for $PROFILE"
"$V/edge-convert" run "$OUT/example/recipe.toml" --target-profile "$PROFILE" \
  --out "$OUT/$PROFILE" --force --distill-progress false "${QUICK[@]}"
echo
echo "== 3. the report ($OUT/$PROFILE/report.md; plot in report.png, figures in report.json)"
cat "$OUT/$PROFILE/report.md"
echo
echo "== 4. the bundle, ready to sign: $OUT/$PROFILE/bundle"
ls -l "$OUT/$PROFILE/bundle"
"$V/edge-fleet" bundle inspect "$OUT/$PROFILE/bundle"
echo
echo "== 5. sign it with 2 of the fleet's 3 release keys, pack it, verify it as a device would"
# Demo keys carry no passphrase; for real keys set EDGE_FLEET_PASSPHRASE (or answer the prompt).
export EDGE_FLEET_PASSPHRASE=${EDGE_FLEET_PASSPHRASE-}
KEYS=$OUT/keys
[ -f "$KEYS/root.json" ] || "$V/edge-fleet" keys init --dir "$KEYS" --fleet demo
"$V/edge-fleet" sign "$OUT/$PROFILE/bundle" --key "$KEYS/keys/release-1.key" --root "$KEYS/root.json"
"$V/edge-fleet" sign "$OUT/$PROFILE/bundle" --key "$KEYS/keys/release-2.key" --root "$KEYS/root.json"
ARCHIVE=$("$V/edge-fleet" pack "$OUT/$PROFILE/bundle" --out "$OUT/$PROFILE/bundle.tar.zst")
echo "packed: $ARCHIVE"
"$V/edge-fleet" verify "$OUT/$PROFILE/bundle.tar.zst" --root "$KEYS/root.json" --profile "$PROFILE"
echo
echo "== 6. a device refuses a tampered copy: one byte of the model changed"
cp -r "$OUT/$PROFILE/bundle" "$OUT/$PROFILE/tampered"
trap 'rm -rf "$OUT/$PROFILE/tampered"' EXIT
MODEL=$(ls "$OUT/$PROFILE/tampered" | grep '^model\.')
printf '\x01' | dd of="$OUT/$PROFILE/tampered/$MODEL" bs=1 seek=100 conv=notrunc status=none
# Exit 3 is a rejection; anything else (a crash, a usage error) is not the refusal we show.
rc=0; "$V/edge-fleet" verify "$OUT/$PROFILE/tampered" --root "$KEYS/root.json" || rc=$?
if [ "$rc" -ne 3 ]; then
  echo "demo: the tampered copy gave exit $rc, not a rejection (3)" >&2; exit 1
fi
echo "(refused, as it must be)"
rm -rf "$OUT/$PROFILE/tampered"
"$V/python" scripts/fleet_demo.py --out "$OUT" --profile "$PROFILE" "${SHORT[@]}"
