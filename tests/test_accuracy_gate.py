"""The int8 accuracy gate on a model built to quantize badly: one input feature spans a
thousand times the range of the others (the model ignores it), so per-tensor min/max input
quantization crushes every real feature to zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from converter.data import load_digits_dataset
from converter.export import export_onnx
from converter.quantize import (
    OnnxQuantSettings,
    calibration_batch,
    gate_onnx,
    preprocess_onnx,
    quantize_onnx,
)
from converter.task import classification


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    ds = load_digits_dataset()
    assert ds.y is not None
    x64 = ds.x.reshape(len(ds.x), -1)
    y = torch.from_numpy(ds.y)
    small = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(small.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(small(torch.from_numpy(x64)), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
    wide = nn.Sequential(nn.Linear(65, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        wide[0].weight.zero_()
        wide[0].weight[:, :64] = small[0].weight
        wide[0].bias.copy_(small[0].bias)
        wide[2].load_state_dict(small[2].state_dict())
    rng = np.random.default_rng(0)
    x = np.concatenate([x64, rng.uniform(0, 1000, (len(x64), 1))], axis=1).astype(np.float32)
    d = tmp_path_factory.mktemp("gate")
    export_onnx(wide, x[:8], d / "m.onnx")
    preprocess_onnx(d / "m.onnx", d / "pre.onnx")
    return d / "pre.onnx", x, ds.y


def _gate(model: tuple[Path, np.ndarray, np.ndarray], **kw):  # type: ignore[no-untyped-def]
    pre, x, y = model
    return gate_onnx(pre, pre.with_name("int8.onnx"), x[:256], x[1000:],
                     classification(y[1000:], tolerance_points=1.0),
                     OnnxQuantSettings(per_channel=True, activation_symmetric=False),
                     max_float_layers=2, **kw)


def test_without_mitigation_the_gate_fails_with_the_figures(outlier_model) -> None:  # type: ignore[no-untyped-def]
    res = _gate(outlier_model, mitigate=False, float_fallback_allowed=True)
    assert res.fp32_val > 0.9
    assert not res.passed
    assert res.int8_val < res.fp32_val - 0.2


def test_mitigation_recovers_accuracy_and_records_each_step(outlier_model) -> None:  # type: ignore[no-untyped-def]
    res = _gate(outlier_model, mitigate=True, float_fallback_allowed=True)
    assert res.passed, res.steps
    assert len(res.steps) >= 2
    assert res.int8_val >= res.fp32_val - 0.01
    # Calibration alone cannot fix a crushed input; keeping the first layer in float does,
    # and the sensitivity analysis finds exactly that layer.
    first_gemm = max(res.sensitivity, key=lambda n: res.sensitivity[n])
    assert res.settings.exclude == (first_gemm,)
    assert res.sensitivity[first_gemm] > 0.5
    assert any(s.startswith("sensitivity") for s in res.steps)


def test_float_layers_are_not_used_where_the_target_forbids_them(outlier_model) -> None:  # type: ignore[no-untyped-def]
    res = _gate(outlier_model, mitigate=True, float_fallback_allowed=False)
    assert res.settings.exclude == ()
    assert not res.passed
    assert "not allowed" in res.steps[-1]


@pytest.mark.parametrize("count", [17, 100, 250])
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_every_calibration_method_works_for_any_sample_count(outlier_model, method: str,  # type: ignore[no-untyped-def]
                                                              count: int) -> None:
    """Percentile and entropy calibration failed on any count that was not a multiple of 32
    (a short last batch), and the gate switches to them by itself on small data sets."""
    pre, x, _ = outlier_model
    dst = pre.with_name(f"int8-{method}-{count}.onnx")
    quantize_onnx(pre, dst, x[:count], OnnxQuantSettings(
        per_channel=True, activation_symmetric=False, calibration=method))
    assert dst.stat().st_size > 0
    assert calibration_batch(count) in {17: (17,), 100: (25,), 250: (25,)}[count]
