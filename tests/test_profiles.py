from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ProfileError
from agent.profiles import available_profiles, load_profile, load_profile_file

REQUIRED = {"raspberry-pi-4", "raspberry-pi-5", "nxp-imx8mp", "arm-ethos-u55-128",
            "coral-edgetpu", "jetson-orin-nano", "x86_64-generic"}
PROFILES_DIR = Path(__file__).resolve().parent.parent / "firmware_profiles"


def test_every_profile_file_loads_and_the_required_ones_exist() -> None:
    files = sorted(PROFILES_DIR.glob("*.toml"))
    names = {load_profile_file(f).name for f in files}
    assert names >= REQUIRED
    assert set(available_profiles()) >= REQUIRED


def test_profiles_say_what_the_targets_need() -> None:
    assert load_profile("arm-ethos-u55-128").accelerator.compiler == "vela"  # type: ignore[union-attr]
    assert load_profile("jetson-orin-nano").runtime.onnx_providers[0] == "TensorrtExecutionProvider"
    assert load_profile("jetson-orin-nano").quantization.activation_symmetric
    assert not load_profile("nxp-imx8mp").quantization.per_channel
    assert load_profile("coral-edgetpu").quantization.int8_io_required
    for name in REQUIRED:
        p = load_profile(name)
        assert p.thermal.throttle_c < p.thermal.critical_c
        assert p.memory.model_budget_bytes > 0


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ProfileError, match=r"unknown profile 'pi-9'.*raspberry-pi-4"):
        load_profile("pi-9")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace('cores = 4', 'cores = 4\ncolour = "red"'), "colour: Extra inputs"),
    (lambda t: t.replace("throttle_c = 78.0", "throttle_c = 90.0"), "throttle_c .* below"),
    (lambda t: t.replace('arch = "aarch64"', 'arch = "sparc"'), "arch"),
    (lambda t: t.replace("[runtime]", "[runtime"), "cannot read"),
])
def test_a_broken_profile_names_the_problem(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    text = (PROFILES_DIR / "raspberry-pi-4.toml").read_text()
    bad = tmp_path / "raspberry-pi-4.toml"
    bad.write_text(edit(text))
    with pytest.raises(ProfileError, match=message):
        load_profile_file(bad)


def test_profile_name_must_match_its_file(tmp_path: Path) -> None:
    other = tmp_path / "my-board.toml"
    other.write_text((PROFILES_DIR / "raspberry-pi-4.toml").read_text())
    with pytest.raises(ProfileError, match="does not match the file name"):
        load_profile_file(other)
