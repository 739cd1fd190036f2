#!/usr/bin/env bash
# The device environment stays lean: the agent installs and passes its own tests in virtual
# environments with only its own dependencies (no torch, no converter tooling):
#   .venv-device   edgekeeper[tflite,onnx]: ai-edge-litert (numpy 2) and onnxruntime
#   .venv-tflite   a TFLite-only device: the base install + tflite-runtime 2.14 with
#                  numpy < 2 (Python 3.11 only), no onnxruntime; the tests that serve ONNX
#                  models skip there (tests/conftest.py, needs_onnxruntime)
# Test tooling (pytest and pytest-xdist, hypothesis, Triton's client) is added; converter
# outputs the tests need are built once with the full .venv into build/test-artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
log() { printf '[test-device] %s\n' "$*" >&2; }
PY=$(command -v python3.11 || true)
[ -z "$PY" ] && { log "python3.11 not found (tflite-runtime 2.14 has wheels up to 3.11)"; exit 1; }
TOOLS=(pytest pytest-xdist hypothesis "tritonclient[http]" cryptography)
stamp=$(sha256sum pyproject.toml scripts/test-device.sh | sha256sum | cut -c1-16)

make_venv() {  # name, pip args...
  local name=$1; shift
  if [ "$(cat "$name/.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "creating $name: $*"
    rm -rf "$name"
    "$PY" -m venv "$name"
    "$name/bin/pip" install -q "$@" "${TOOLS[@]}"
    echo "$stamp" > "$name/.stamp"
  fi
  # Lean means lean: the host toolchain must not have come in through a dependency.
  if "$name/bin/python" -c 'import torch' 2>/dev/null || \
     "$name/bin/python" -c 'import litert_torch' 2>/dev/null; then
    log "$name has torch or litert_torch installed: the agent's dependencies are not lean"
    exit 1
  fi
}
make_venv .venv-device -e ".[tflite,onnx]"
make_venv .venv-tflite -e . "numpy<2" "tflite-runtime==2.14.0"
.venv-tflite/bin/python -c 'import ai_edge_litert' 2>/dev/null && {
  log ".venv-tflite must exercise tflite-runtime, yet ai-edge-litert is installed"; exit 1; }
.venv-tflite/bin/python -c 'import onnxruntime' 2>/dev/null && {
  log ".venv-tflite is a TFLite-only device, yet onnxruntime is installed"; exit 1; }
# The converter on a device install: help works, a conversion names the extra in one line.
.venv-tflite/bin/edge-convert --help >/dev/null
.venv-tflite/bin/edge-convert profiles >/dev/null
set +e
msg=$(.venv-tflite/bin/edge-convert run --out /tmp/never 2>&1); rc=$?
set -e
if [ "$rc" != 2 ] || [ "$(printf '%s\n' "$msg" | wc -l)" != 1 ] || \
   ! grep -q "edgekeeper\[convert\]" <<<"$msg"; then
  log "edge-convert without its toolchain must say which extra in one line, exit 2; got $rc: $msg"
  exit 1
fi

log "building converter outputs with the full environment"
.venv/bin/python tests/artifacts.py build/test-artifacts >/dev/null

DEVICE_TESTS=(tests/test_layering.py tests/test_profiles.py tests/test_manifest.py
  tests/test_trust_attacks.py tests/test_trust_commands.py tests/test_trust_fuzz.py
  tests/test_store.py tests/test_oip.py tests/test_admission.py tests/test_scheduler.py
  tests/test_agent_e2e.py tests/test_systemd.py tests/test_runtime.py tests/test_outbox.py
  tests/test_detectors.py tests/test_fetch.py tests/test_mqtt_link.py tests/test_fleet_mqtt.py
  tests/test_deploy_flow.py tests/test_install.py tests/test_config.py tests/test_cli_pipes.py
  tests/test_logs.py tests/test_monitoring.py tests/test_h1.py tests/test_shm.py)
# (the operator's fleet tools are tested in the full environment only)
for venv in .venv-device .venv-tflite; do
  log "$venv: $("$venv/bin/python" -c 'import numpy, sys; print("Python", sys.version.split()[0], "numpy", numpy.__version__)')"
  EDGE_TEST_ARTIFACTS=$PWD/build/test-artifacts "$venv/bin/python" -m pytest -q \
    -p no:cacheprovider -n 2 "${DEVICE_TESTS[@]}"
done
