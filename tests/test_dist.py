"""The distribution as PyPI would get it: a wheel and an sdist built by the project's own
build backend (PEP 517, setuptools) from the tracked files, named edgekeeper, with the
agent's data (OpenAPI document, firmware profiles) and without the tests."""

from __future__ import annotations

import subprocess
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_and_sdist_carry_the_right_name_extras_and_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\0")
    files = [f for f in files if f and (ROOT / f).is_file()]
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((ROOT / f).read_bytes())
    out = tmp_path / "dist"
    names = []
    for hook in ("build_wheel", "build_sdist"):  # one process each, as pip and build do
        code = (f"import sys; from setuptools import build_meta as b; "
                f"print('BUILT', b.{hook}(sys.argv[1]))")
        proc = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", code, str(out)],
                              cwd=src, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        built = [line for line in proc.stdout.splitlines() if line.startswith("BUILT ")]
        assert built, proc.stdout[-2000:]
        names.append(built[-1].split()[1])
    wheel_name, sdist_name = names
    assert wheel_name.startswith("edgekeeper-0.1.0-py3-none-any"), wheel_name
    assert sdist_name == "edgekeeper-0.1.0.tar.gz", sdist_name

    with zipfile.ZipFile(out / wheel_name) as whl:
        names = whl.namelist()
        meta = whl.read("edgekeeper-0.1.0.dist-info/METADATA").decode()
    assert "agent/serving/openapi.json" in names
    assert any(n.endswith("data/share/edge-agent/firmware_profiles/raspberry-pi-4.toml")
               for n in names), names
    assert not any(n.startswith("tests/") for n in names)
    assert "Name: edgekeeper" in meta
    for extra in ("tflite", "onnx", "convert"):
        assert f"Provides-Extra: {extra}" in meta, extra
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    assert not any("onnxruntime" in r or "torch" in r for r in base), base
    assert any("ai-edge-litert" in r and "aarch64" in r for r in requires), requires
    assert any("tflite-runtime" in r and "armv7l" in r for r in requires), requires

    with tarfile.open(out / sdist_name) as sdist:
        members = sdist.getnames()
    for needed in ("pyproject.toml", "README.md", "agent/serving/openapi.json",
                   "firmware_profiles/raspberry-pi-4.toml"):
        assert f"edgekeeper-0.1.0/{needed}" in members, needed
