"""int8 post-training quantization, calibrated on real training samples.

ONNX: onnxruntime's pre-processing (symbolic shape inference + graph optimisation) first,
then `quantize_static` in QDQ format: int8 weights (per-channel where the profile allows it),
int8 activations (symmetric where the profile needs it, e.g. TensorRT).

TFLite: litert-torch's PT2E path (torch.export -> PT2EQuantizer -> prepare/calibrate/convert
-> LiteRT flatbuffer) with no TensorFlow; inputs and outputs come out int8.

The quality gate (`gate_onnx`) compares int8 with fp32 on the validation split (the test
split stays untouched for the report), by accuracy for classifiers and by output error for
other models (`converter.task`), and when int8 fails it tries other calibration methods and
then keeps the most sensitive layers in float, one at a time, where the profile allows float
layers.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.serving.runtime import open_onnx, open_tflite, sample_shapes, unpack
from converter.data import F32
from converter.errors import ConvertError
from converter.task import Quality

CALIBRATION_BATCH = 32
QUANTIZABLE_ONNX_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


@dataclass(frozen=True)
class OnnxQuantSettings:
    per_channel: bool
    activation_symmetric: bool
    calibration: str = "minmax"
    exclude: tuple[str, ...] = ()


@dataclass
class GateResult:
    settings: OnnxQuantSettings
    fp32_val: float  # the Quality's score
    int8_val: float
    passed: bool
    steps: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)


def preprocess_onnx(src: Path, dst: Path) -> None:
    """onnxruntime's recommended pre-processing before static quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415  # optional: when used

    with contextlib.redirect_stdout(io.StringIO()):
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)


def quantizable_nodes(path: Path) -> list[str]:
    import onnx  # noqa: PLC0415  # heavy or optional: loaded only when used

    graph = onnx.load(str(path)).graph
    return [n.name for n in graph.node if n.op_type in QUANTIZABLE_ONNX_OPS]


def calibration_batch(n: int) -> int:
    """The largest batch of at most CALIBRATION_BATCH that divides `n` evenly. onnxruntime's
    histogram calibrators (percentile, entropy) stack the batches' outputs into one array
    and fail on a short last batch ("inhomogeneous shape"), which every count that was not
    a multiple of 32 had."""
    return max(d for d in range(1, min(n, CALIBRATION_BATCH) + 1) if n % d == 0)


def quantize_onnx(src: Path, dst: Path, calib: F32, s: OnnxQuantSettings) -> None:
    """Static int8 QDQ quantization of a pre-processed float model."""
    from onnxruntime.quantization import (  # noqa: PLC0415  # optional: when used
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    specs = open_onnx(src).inputs
    fixed = specs[0].shape[0]
    shapes = sample_shapes(specs) if len(specs) > 1 else None  # several: packed side by side
    if fixed and len(calib) % fixed:  # a fixed batch: the tail padded with its last sample
        calib = np.concatenate([calib, np.repeat(calib[-1:], fixed - len(calib) % fixed, 0)])
    step = fixed or calibration_batch(len(calib))

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(calib[i:i + step] for i in range(0, len(calib), step))

        def get_next(self) -> dict[str, F32] | None:
            batch = next(self._it, None)
            if batch is None:
                return None
            if shapes is None:
                return {specs[0].name: batch}
            return {spec.name: part for spec, part in zip(specs, unpack(batch, shapes),
                                                          strict=True)}

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[s.calibration]
    extra: dict[str, Any] = {"ActivationSymmetric": s.activation_symmetric,
                             "WeightSymmetric": True}
    if s.calibration == "percentile":
        extra["CalibPercentile"] = 99.99
    try:
        quantize_static(
            str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
            per_channel=s.per_channel, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=method,
            nodes_to_exclude=list(s.exclude), extra_options=extra,
        )
    except Exception as exc:  # quantize_static raises assorted builtins
        raise ConvertError(f"ONNX int8 quantization failed: "
                           f"{str(exc).splitlines()[0][:300]}") from exc


def gate_onnx(pre: Path, dst: Path, calib: F32, x_val: F32, quality: Quality,
              base: OnnxQuantSettings, *, mitigate: bool, float_fallback_allowed: bool,
              max_float_layers: int) -> GateResult:
    """Quantize, check the quality gate on validation data, mitigate if needed.

    The model at `dst` is the best one found. The caller decides whether a failed gate is
    fatal (it raises AccuracyGateError with these figures).
    """
    fp32 = quality.score(open_onnx(pre).run(x_val))

    def trial(s: OnnxQuantSettings) -> float:
        quantize_onnx(pre, dst, calib, s)
        return quality.score(open_onnx(dst).run(x_val))

    def ok(acc: float) -> bool:
        return quality.passes(fp32, acc)

    best_s, best_acc = base, trial(base)
    result = GateResult(base, fp32, best_acc, ok(best_acc),
                        [f"{base.calibration} calibration: int8 {quality.name} "
                         f"{quality.show(best_acc)} vs fp32 {quality.show(fp32)}"])
    if result.passed or not mitigate:
        return result
    for method in ("percentile", "entropy"):
        if method == base.calibration:
            continue
        s = replace(base, calibration=method)
        acc = trial(s)
        result.steps.append(f"{method} calibration: int8 {quality.show(acc)}")
        if acc > best_acc:
            best_s, best_acc = s, acc
        if ok(acc):
            break
    if not ok(best_acc) and float_fallback_allowed and max_float_layers > 0:
        best_s, best_acc = _keep_sensitive_in_float(
            trial, best_s, best_acc, pre, result, ok, max_float_layers, quality.show)
    elif not ok(best_acc):
        result.steps.append("keeping layers in float is not allowed on this target")
    quantize_onnx(pre, dst, calib, best_s)  # trials overwrote dst: leave the best one there
    result.settings, result.int8_val, result.passed = best_s, best_acc, ok(best_acc)
    return result


def _keep_sensitive_in_float(
    trial: Callable[[OnnxQuantSettings], float], best_s: OnnxQuantSettings, best_acc: float,
    pre: Path, result: GateResult, ok: Callable[[float], bool], max_float_layers: int,
    show: Callable[[float], str],
) -> tuple[OnnxQuantSettings, float]:
    """Per-layer sensitivity: the score with each quantizable node alone kept in float."""
    anchor, anchor_acc = best_s, best_acc
    nodes = quantizable_nodes(pre)
    for node in nodes:
        result.sensitivity[node] = trial(replace(anchor, exclude=(node,))) - anchor_acc
    ranked = sorted(nodes, key=lambda n: result.sensitivity[n], reverse=True)
    result.steps.append("sensitivity (score gained when kept in float): " + ", ".join(
        f"{n} {result.sensitivity[n]:+.4f}" for n in ranked))
    excluded: list[str] = []
    for node in ranked[:max_float_layers]:
        excluded.append(node)
        s = replace(anchor, exclude=tuple(excluded))
        acc = trial(s)
        result.steps.append(f"float layers {excluded}: int8 {show(acc)}")
        if acc > best_acc:
            best_s, best_acc = s, acc
        if ok(acc):
            break
    return best_s, best_acc


@dataclass(frozen=True)
class TfliteResult:
    path: Path
    per_channel: bool
    io_dtype: str


def torch_args(x: F32, shapes: list[tuple[int, ...]] | None) -> tuple[torch.Tensor, ...]:
    """A model's arguments for samples `x`: one tensor, or one per input where `shapes`
    says how several inputs stand packed side by side in `x`."""
    if shapes is None:
        return (torch.from_numpy(np.ascontiguousarray(x)),)
    return tuple(torch.from_numpy(np.ascontiguousarray(p)) for p in unpack(x, shapes))


def quantize_tflite(model: nn.Module, calib: F32, dst: Path, *, per_channel: bool,
                    batch: int = 1, shapes: list[tuple[int, ...]] | None = None
                    ) -> TfliteResult:
    """Full-int8 TFLite through litert-torch's PT2E quantizer, its batch fixed at `batch`
    (1, or the fixed batch of a model given as ONNX); calibrated in batches of that size,
    the last padded with its last sample. `shapes`: a model with several inputs, packed
    side by side in `calib` (`agent.serving.runtime.pack`); the TFLite model takes them
    as separate inputs, in that order."""
    import litert_torch  # noqa: PLC0415  # heavy or optional: loaded only when used
    from litert_torch.quantize import pt2e_quantizer as pq  # noqa: PLC0415  # optional: when used
    from litert_torch.quantize.quant_config import QuantConfig  # noqa: PLC0415  # optional: when used
    from torchao.quantization.pt2e import quantize_pt2e  # noqa: PLC0415  # optional: when used

    model.eval()
    if len(calib) % batch:
        calib = np.concatenate([calib, np.repeat(calib[-1:], batch - len(calib) % batch, 0)])
    args = torch_args(calib[:batch], shapes)
    try:
        # a module that cannot be exported prints its whole graph to stderr: the one-line
        # error below says enough
        with contextlib.redirect_stderr(io.StringIO()):
            graph = torch.export.export(model, args).module()
        quantizer = pq.PT2EQuantizer().set_global(
            pq.get_symmetric_quantization_config(is_per_channel=per_channel))
        graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for i in range(0, len(calib), batch):
                graph(*torch_args(calib[i:i + batch], shapes))
        graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            edge = litert_torch.convert(graph, args,
                                        quant_config=QuantConfig(pt2e_quantizer=quantizer))
            edge.export(str(dst))
    except Exception as exc:  # litert-torch raises many unrelated types
        raise ConvertError(f"TFLite int8 conversion failed: "
                           f"{str(exc).splitlines()[0][:300]}; int8 ONNX alone: "
                           "--quantize-formats '[\"onnx\"]'") from exc
    loaded = open_tflite(dst)
    io_dtype = loaded.inputs[0].dtype + "/" + loaded.outputs[0].dtype
    return TfliteResult(dst, per_channel, io_dtype)
