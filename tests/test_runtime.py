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
from agent.serving.runtime import (
    TfliteModel,
    _Feed,
    dequantize,
    load_tflite_delegates,
    open_model,
    quantize,
)
from agent.trust.manifest import QuantParams, TensorSpec


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


@pytest.mark.parametrize(("scale", "zero_point", "dtype"), [
    (1 / 255, -128, "int8"), (0.02, 3, "int8"), (0.1, 128, "uint8"), (0.5, 0, "int8"),
    (1e-7, -5, "int8"), (3.7e4, 0, "int8")])
def test_the_tflite_adapter_quantizes_and_dequantizes_as_the_reference_arithmetic(
        scale: float, zero_point: int, dtype: str) -> None:
    """The adapter quantizes an 8-bit input by lookup (`_Feed`: the float32 value of each
    step between levels, found at load); it must give what `quantize` gives, value for
    value: at every step and the floats on either side of it (halves rounded to even),
    past the range (clipped), at the infinities, and on a million float32 bit patterns
    drawn at random."""
    q = QuantParams(scale=scale, zero_point=zero_point)
    feed = _Feed(TensorSpec(name="x", dtype=dtype, shape=[None, 16], quantization=q))
    assert feed.steps is not None and len(feed.steps) == 255  # the lookup, not arithmetic
    up, down = np.float32(np.inf), np.float32(-np.inf)
    x = (np.random.default_rng(0).standard_normal((300, 16)) * 60 * scale).astype(np.float32)
    x[0, :8] = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 1e9, -1e9, 0.0]) * np.float32(scale)
    steps = feed.steps
    edges = np.concatenate([
        steps, np.nextafter(steps, up), np.nextafter(steps, down),
        np.nextafter(np.nextafter(steps, down), down),
        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, -1e-45], np.float32)])
    bits = np.random.default_rng(1).integers(0, 2**32, 1_000_000, dtype=np.uint64)
    drawn = bits.astype(np.uint32).view(np.float32)
    for values in (x, edges.astype(np.float32), drawn[~np.isnan(drawn)]):
        got = feed(values)
        with np.errstate(over="ignore"):  # huge / scale: inf, clipped as it should be
            want = quantize(values, q, np.dtype(dtype))
        assert got.dtype == want.dtype and got.shape == values.shape
        wrong = np.flatnonzero(got.ravel() != want.ravel())
        assert not len(wrong), (values.ravel()[wrong[:5]], got.ravel()[wrong[:5]],
                                want.ravel()[wrong[:5]])
    assert len(np.unique(quantize(x, q, np.dtype(dtype)))) > 100  # x spans the range


def test_a_wider_integer_input_keeps_the_quantize_arithmetic() -> None:
    """An int16 input has 65,535 steps: the adapter keeps the arithmetic for it, equal to
    `quantize` too."""
    q = QuantParams(scale=0.001, zero_point=7)
    feed = _Feed(TensorSpec(name="x", dtype="int16", shape=[None, 4], quantization=q))
    assert feed.steps is None
    x = (np.random.default_rng(2).standard_normal((500, 4)) * 40).astype(np.float32)
    assert np.array_equal(feed(x), quantize(x, q, np.dtype("int16")))


def test_the_tflite_adapter_serves_what_the_reference_arithmetic_gives(onnx_run: Path) -> None:
    """The digits int8 model through the adapter equals set_tensor(quantize(x)), invoke,
    dequantize(get_tensor), on many inputs: the adapter's shortcuts (`_Feed`, the output's
    256-value table) change nothing the model returns."""
    model = open_model(onnx_run / "model_int8.tflite", "tflite")
    assert isinstance(model, TfliteModel)
    spec_in, spec_out = model.inputs[0], model.outputs[0]
    assert spec_in.quantization is not None and spec_out.quantization is not None
    it, seen = model.interpreter, set()
    for x in np.random.default_rng(1).uniform(-0.2, 1.2, (50, 1, 1, 8, 8)).astype(np.float32):
        it.set_tensor(model._in_index, quantize(x, spec_in.quantization,
                                                np.dtype(spec_in.dtype)))
        it.invoke()
        raw = it.get_tensor(model._out_index)
        seen.update(raw.ravel().tolist())
        assert np.array_equal(model.run(x), dequantize(raw, spec_out.quantization))
    assert len(seen) > 20  # many output values met
