#!/usr/bin/env bash
# The agent on aarch64: a Debian 12 arm64 root filesystem (debootstrap) run through
# qemu-user-static. Inside it, Debian's python3 (3.11), the project's wheel with the aarch64
# wheels PyPI has for [tflite,onnx], and the agent's own tests that matter on a device
# (trust, store, serving end to end with TFLite and onnxruntime, the MQTT link against a
# mosquitto inside).
#   scripts/test-aarch64.sh            every device test (slow: ~10x under emulation)
#   scripts/test-aarch64.sh --smoke    a smaller part (scripts/test.sh runs it, so CI does)
# Prints which versions resolved and the wall time; the full mode also a TFLite-only
# install's size and package count, and the agent's RSS idle and serving (under qemu, which
# adds its own). The root with its packages and dependencies is kept between runs
# (EDGE_AARCH64_CACHE, /var/cache/edgekeeper-test by default) until they change, and so are
# apt's packages and pip's wheels (arm64-archives/, arm64-wheels/ there), so a root made again (the
# project's dependencies changed) downloads nothing it had before. A wheelhouse, not pip's
# own cache: PyPI's proxy here answers with headers that keep pip's HTTP cache empty.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[test-aarch64] %s\n' "$*" >&2; }
MODE=${1:-full}
WORK=${EDGE_AARCH64_WORK:-build/aarch64}
SMOKE=(tests/test_manifest.py tests/test_store.py tests/test_runtime.py
  "tests/test_agent_e2e.py::test_tflite_bundle_served_over_kserve_v2_and_tf_serving"
  "tests/test_agent_e2e.py::test_onnx_over_tcp_needs_the_bearer_token_and_serves_a_standard_client"
  "tests/test_fleet_mqtt.py::test_a_signed_deploy_is_downloaded_verified_activated_and_committed"
  tests/test_h1.py "tests/test_shm.py::test_inputs_and_outputs_pass_through_registered_regions")
FULL=(tests/test_manifest.py tests/test_trust_attacks.py tests/test_trust_commands.py
  tests/test_store.py tests/test_oip.py tests/test_admission.py tests/test_scheduler.py
  tests/test_agent_e2e.py tests/test_runtime.py tests/test_outbox.py tests/test_detectors.py
  tests/test_fetch.py tests/test_mqtt_link.py tests/test_fleet_mqtt.py tests/test_deploy_flow.py
  tests/test_install.py tests/test_config.py tests/test_logs.py tests/test_h1.py tests/test_shm.py)
t0=$(date +%s)
base=$(bash scripts/debian-rootfs.sh arm64)
[ -d build/test-artifacts ] || .venv/bin/python tests/artifacts.py build/test-artifacts >/dev/null
root="$WORK/root"
CACHE=${EDGE_AARCH64_CACHE:-/var/cache/edgekeeper-test}
# Mounted into the root while it runs: apt's and pip's downloads, kept across roots.
CACHES=(var/cache/apt/archives wheels)
cleanup() {
  for m in "${CACHES[@]}" dev/pts dev proc; do umount -l "$root/$m" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
rm -rf --one-file-system "$WORK"; mkdir -p "$WORK"
# The root with apt's packages and the venv's dependencies installed is kept between runs,
# keyed by what decides them: the steps of prepare() below, the project's dependency lists
# (not the rest of pyproject.toml or this script) and Debian's point release. Only the
# project's own wheel goes in afresh.
deps=$(.venv/bin/python -c 'import json, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(json.dumps([p["dependencies"], {k: p["optional-dependencies"][k] for k in ("tflite", "onnx")}]))')
key=$( { sed -n '/^# >>> prepare/,/^# <<< prepare/p' scripts/test-aarch64.sh; echo "$deps"
        cat "$base/etc/debian_version"; } | sha256sum | cut -c1-16)
prepared="$CACHE/aarch64-prepared-$key"
if [ -d "$prepared" ]; then
  cp -a --reflink=auto "$prepared" "$root"
else
  cp -a --reflink=auto "$base" "$root"
fi
mkdir -p "$root/proc" "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# This machine's CA bundle (a registry proxy may sign with its own CA), for pip inside.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# No sysfs: with it mounted, qemu-aarch64 (7.2) crashed with SIGSEGV in the test run
# (psutil and the thermal sensor read it); the agent then sees no thermal sensor.
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"; mount --bind /dev/pts "$root/dev/pts"
for m in "${CACHES[@]}"; do
  mkdir -p "$CACHE/arm64-${m##*/}" "$root/$m"; mount --bind "$CACHE/arm64-${m##*/}" "$root/$m"
done
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 \
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$@"; }
# >>> prepare: what these lines install is kept (the cache key hashes them)
prepare() {
  log "apt: python3, venv, mosquitto, curl (arm64, emulated)"
  in_root apt-get update -qq
  in_root apt-get install -y -qq --no-install-recommends python3 python3-venv mosquitto curl \
    >/dev/null
  log "pip install $1[tflite,onnx] with PyPI's aarch64 wheels (kept in /wheels)"
  local want=("/work/$1[tflite,onnx]" pytest hypothesis cryptography "tritonclient[http]")
  in_root python3 -m venv /opt/v
  in_root /opt/v/bin/pip download -q -d /wheels "${want[@]}"  # what /wheels has stays put
  rm -f "$root/wheels/$1"
  in_root /opt/v/bin/pip install -q --no-index --find-links /wheels "${want[@]}"
}
# <<< prepare
log "the project's wheel, built here from the tracked files"
mkdir -p "$WORK/src"
git ls-files -z | xargs -0 cp --parents -t "$WORK/src"
.venv/bin/pip wheel -q --no-deps -w "$WORK/wheel" "$WORK/src" >/dev/null
mkdir -p "$root/work"
git ls-files -z tests firmware_profiles systemd README.md | xargs -0 cp --parents -t "$root/work"
cp -a build/test-artifacts "$root/work/artifacts"
cp "$WORK"/wheel/*.whl "$root/work/"
wheel=$(basename "$WORK"/wheel/*.whl)
if [ -d "$prepared" ]; then
  log "pip install $wheel alone (its dependencies are in the kept root $prepared)"
  in_root /opt/v/bin/pip install -q --no-deps --force-reinstall "/work/$wheel"
else
  t2=$(date +%s)
  prepare "$wheel"
  log "prepared the root in $(( $(date +%s) - t2 )) s; keeping it for the next run: $prepared"
  rm -rf --one-file-system "$prepared.tmp" "${prepared%-*}"-*
  mkdir -p "$(dirname "$prepared")"
  # The caches are bind mounts of the same file system (cp -x would copy them): out first.
  for m in "${CACHES[@]}"; do umount "$root/$m"; done
  cp -a -x --reflink=auto "$root" "$prepared.tmp"  # -x: not the mounted /proc and /dev
  for m in "${CACHES[@]}"; do mount --bind "$CACHE/arm64-${m##*/}" "$root/$m"; done
  rm -rf "$prepared.tmp/work"
  mv "$prepared.tmp" "$prepared"
fi
log "resolved: $(in_root /opt/v/bin/pip list --format=freeze 2>/dev/null |
  grep -iE '^(ai-edge-litert|onnxruntime|numpy|paho-mqtt|pynacl|psutil|pydantic|zstandard|h11|httptools)==' |
  tr '\n' ' ')"
log "$(in_root /opt/v/bin/python -c 'import platform, sys; print(platform.machine(), "Python", sys.version.split()[0])')"
tests=("${FULL[@]}"); [ "$MODE" = "--smoke" ] && tests=("${SMOKE[@]}")
log "pytest (${#tests[@]} targets, $MODE)"
t1=$(date +%s)
in_root /usr/bin/env EDGE_TEST_ARTIFACTS=/work/artifacts sh -c \
  "cd /work && /opt/v/bin/pytest -q -p no:cacheprovider $(printf '%q ' "${tests[@]}")"
log "tests took $(( $(date +%s) - t1 )) s under emulation; $(( $(date +%s) - t0 )) s in all"

if [ "$MODE" = "--smoke" ]; then
  exit 0  # the figures below are the full mode's (a second install under emulation)
fi
log "figures: a TFLite-only install (its own venv) and the agent's RSS, under emulation"
in_root python3 -m venv /opt/lean
in_root /opt/lean/bin/pip install -q --no-index --find-links /wheels "/work/$wheel[tflite]"
count=$(in_root /opt/lean/bin/pip list --format=freeze 2>/dev/null | grep -vc '^\(pip\|setuptools\)==')
log "TFLite-only aarch64 install: $count packages, $(du -sh "$root/opt/lean" | cut -f1)"
in_root /usr/bin/env EDGE_TEST_ARTIFACTS=/work/artifacts /opt/v/bin/python - <<'PY' >&2
import json, subprocess, sys, time, psutil
from pathlib import Path
sys.path.insert(0, "/work/tests")
from fixture_agent import write_config
from agent.client import unix_call, upload
art = Path("/work/artifacts"); idx = json.loads((art / "releases.json").read_text())
where = Path("/tmp/rss"); cfg = write_config(where, art / idx["keys"], profile="raspberry-pi-4")
p = subprocess.Popen(["/opt/lean/bin/edge-agent", "run", "--config", str(cfg)],
                     stderr=open(where / "log", "wb"))
sock = where / "api.sock"
for _ in range(1200):
    try:
        if unix_call(sock, "GET", "/v2/health/live")[0] == 200: break
    except OSError: time.sleep(0.1)
rss = lambda: psutil.Process(p.pid).memory_info().rss / 2**20
idle = rss()
assert upload(where / "admin.sock", art / idx["tflite1"])[0] == 200
loaded = rss()
name = unix_call(sock, "GET", "/v2/models/digits")[1]["inputs"][0]["name"]
body = {"inputs": [{"name": name, "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
for _ in range(200): assert unix_call(sock, "POST", "/v2/models/digits/infer", body)[0] == 200
print(f"[test-aarch64] agent RSS under qemu (includes the emulator): idle {idle:.1f} MiB, "
      f"digits TFLite loaded {loaded:.1f} MiB, after 200 requests {rss():.1f} MiB")
p.terminate(); p.wait(30)
PY
