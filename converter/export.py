"""Export the float student to a single self-contained ONNX file.

BatchNorm is folded first, so ONNX and TFLite see the same arithmetic. The dynamo exporter
(torch.export + onnxscript) is used with `external_data=False`: a bundle carries one model
file, never a sidecar `.data`. The batch dimension stays dynamic. After export the file is
run with onnxruntime and compared with torch on real samples; the largest difference goes into
the report.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agent.serving.runtime import open_onnx
from converter.data import F32
from converter.errors import ConvertError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float


def export_onnx(model: nn.Module, sample: F32, path: Path) -> ExportResult:
    """Write `model` (eval mode, BN folded) as ONNX and check it against torch.

    Raises:
        ConvertError: the exporter fails or the exported model disagrees with torch.
    """
    model.eval()
    example = torch.from_numpy(sample[:2])
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress
            torch.onnx.export(
                model, (example,), str(path), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamo=True, external_data=False,
                opset_version=OPSET, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                optimize=True,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise ConvertError(f"ONNX export failed: {str(exc).splitlines()[0][:300]}") from exc
    leftovers = [p.name for p in path.parent.glob(path.name + "*.data")]
    if leftovers:
        raise ConvertError(f"ONNX export wrote external data {leftovers}; refusing")
    with torch.no_grad():
        want = model(torch.from_numpy(sample)).numpy()
    got = open_onnx(path).run(sample)
    diff = float(np.max(np.abs(want - got)))
    if diff > 1e-3 * max(1.0, float(np.max(np.abs(want)))):
        raise ConvertError(f"exported ONNX disagrees with torch by {diff:.3g}")
    return ExportResult(path, diff)
