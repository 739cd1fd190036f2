"""The runtime adapter: the profile's execution providers and TFLite delegates, and a
missing accelerator library named rather than crashing (or refused when the accelerator
has no CPU fallback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import needs_onnxruntime

from agent.errors import RuntimeLoadError
from agent.profiles import load_profile
from agent.serving.runtime import load_tflite_delegates, open_model


def test_a_missing_delegate_is_named_and_the_model_runs_on_the_cpu(onnx_run: Path) -> None:
    specs = load_profile("nxp-imx8mp").runtime.tflite_delegates
    assert specs, "the i.MX 8M Plus profile names its VX delegate"
    loaded, problems = load_tflite_delegates(specs, required=False)
    assert loaded == [] and specs[0].library in problems[0]
    model = open_model(onnx_run / "model_int8.tflite", "tflite", delegates=loaded)
    assert model.run(np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 10)


def test_a_missing_delegate_without_cpu_fallback_is_refused() -> None:
    profile = load_profile("coral-edgetpu")
    assert profile.accelerator is not None and not profile.accelerator.cpu_fallback
    with pytest.raises(RuntimeLoadError, match="libedgetpu"):
        load_tflite_delegates(profile.runtime.tflite_delegates, required=True)


@needs_onnxruntime
def test_onnx_providers_not_on_this_machine_fall_back_to_the_cpu(onnx_run: Path) -> None:
    providers = load_profile("jetson-orin-nano").runtime.onnx_providers
    model = open_model(onnx_run / "model_int8.onnx", "onnx", providers=providers)
    assert model.run(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)
