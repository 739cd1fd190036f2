"""Firmware profiles: what a target device can run, and within which budgets.

One TOML file per target in `firmware_profiles/`, validated by `FirmwareProfile`. The converter
reads a profile to choose quantization and compilation; the agent reads the same file for
threads, delegates, memory and thermal budgets. Files come from outside the code, so the
models are frozen and forbid unknown keys: a typo fails loudly at load time.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import ProfileError

RuntimeName = Literal["onnx", "tflite"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TfliteDelegate(_Strict):
    """A TFLite external delegate loaded from a shared library on the device."""

    name: str
    library: str
    options: dict[str, str] = Field(default_factory=dict)


class RuntimeSettings(_Strict):
    """Which runtimes the target prefers, and how to configure them."""

    preference: list[RuntimeName] = Field(min_length=1)
    threads: int = Field(ge=1, le=256)
    tflite_delegates: list[TfliteDelegate] = Field(default_factory=list)
    onnx_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])


class Accelerator(_Strict):
    """An NPU/GPU and the compiler, if any, that prepares models for it."""

    kind: Literal["npu", "gpu", "tpu"]
    name: str
    compiler: Literal["vela", "edgetpu_compiler", "tensorrt", "none"] = "none"
    compiler_args: list[str] = Field(default_factory=list)
    # True: the compiler/delegate partitions the graph and unsupported ops run on the CPU.
    # False: every op must run on the accelerator, or conversion fails.
    cpu_fallback: bool = True
    # How to get the compiler when it is not on PyPI (shown in the report).
    external_step: str | None = None


class QuantizationConstraints(_Strict):
    """What the target's int8 kernels accept."""

    int8_io_required: bool = False
    per_channel: bool = True
    # Symmetric activations (zero point 0): TensorRT's explicit-quantization mode needs this.
    activation_symmetric: bool = False
    # May the converter keep quantization-sensitive layers in float to meet the accuracy gate?
    float_fallback_allowed: bool = True
    # TFLite builtin operators the target runs natively; empty means "no restriction known".
    operators: list[str] = Field(default_factory=list)
    # Static shapes only (batch fixed at 1), as Edge TPU and Vela require.
    static_shapes: bool = False
    max_tensor_rank: int | None = None


class MemoryBudget(_Strict):
    """Memory the agent may use for resident models and per-request arenas."""

    model_budget_bytes: int = Field(gt=0)
    arena_budget_bytes: int = Field(gt=0)


class ThermalLimits(_Strict):
    """Where to read temperature, and when to throttle and shed (degrees Celsius)."""

    sensor: str | None = None
    throttle_c: float
    critical_c: float
    hysteresis_c: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> ThermalLimits:
        if not self.throttle_c < self.critical_c:
            raise ValueError(
                f"throttle_c ({self.throttle_c}) must be below critical_c ({self.critical_c})"
            )
        return self


class FirmwareProfile(_Strict):
    """One target device family."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str
    arch: Literal["aarch64", "armv7l", "x86_64"]
    cpu: str
    cores: int = Field(ge=1)
    runtime: RuntimeSettings
    accelerator: Accelerator | None = None
    quantization: QuantizationConstraints
    memory: MemoryBudget
    thermal: ThermalLimits


def profile_dirs() -> list[Path]:
    """Where profiles are looked for, in order.

    `EDGE_PROFILES_DIR` first, then the checkout's `firmware_profiles/` (editable installs),
    then `<prefix>/share/edge-agent/firmware_profiles` (wheel installs).
    """
    dirs: list[Path] = []
    env = os.environ.get("EDGE_PROFILES_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(Path(__file__).resolve().parent.parent / "firmware_profiles")
    dirs.append(Path(sys.prefix) / "share" / "edge-agent" / "firmware_profiles")
    return dirs


def load_profile_file(path: Path) -> FirmwareProfile:
    """Parse and validate one profile file.

    Raises:
        ProfileError: unreadable TOML or a value that does not validate; the message names
            the file and every offending field.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"profile {path}: cannot read: {exc}", profile=str(path)) from exc
    try:
        profile = FirmwareProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ProfileError(f"profile {path}: {problems}", profile=str(path)) from exc
    if profile.name != path.stem:
        raise ProfileError(
            f"profile {path}: name {profile.name!r} does not match the file name",
            profile=str(path),
        )
    return profile


def available_profiles() -> dict[str, Path]:
    """Profile names mapped to their files; earlier directories win."""
    found: dict[str, Path] = {}
    for directory in profile_dirs():
        if directory.is_dir():
            for path in sorted(directory.glob("*.toml")):
                found.setdefault(path.stem, path)
    return found


def load_profile(name_or_path: str) -> FirmwareProfile:
    """Load a profile by name (e.g. "raspberry-pi-4") or by path to a TOML file.

    Raises:
        ProfileError: the profile is unknown or invalid.
    """
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return load_profile_file(Path(name_or_path))
    known = available_profiles()
    if name_or_path not in known:
        raise ProfileError(
            f"unknown profile {name_or_path!r}; known: {', '.join(sorted(known)) or 'none'}",
            profile=name_or_path,
        )
    return load_profile_file(known[name_or_path])
