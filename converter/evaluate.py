"""Honest figures: accuracy, agreement, sizes, MACs, latency, memory, operators.

Everything is measured on the held-out test split with the same runtime code the device uses
(`agent.serving.runtime`), after conversion, from the files that go into the bundle.

- MACs come from the float ONNX graph at batch 1 (Conv: output elements x Cin/groups x kH x
  kW; Gemm/MatMul: M x N x K).
- Peak memory is an estimate: weights plus the largest set of simultaneously live
  activations, walking the graph in order at batch 1 (4 bytes/element in float, 1 in int8).
- Latency is single-sample, `threads` intra-op threads, after warm-up; p50 and p95.
"""

from __future__ import annotations

import gzip
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from agent.serving.runtime import LoadedModel
from converter.data import F32, I64


def scores(logits: F32, truth: I64 | None, teacher_pred: I64) -> dict[str, float | None]:
    pred = logits.argmax(1)
    return {
        "accuracy": None if truth is None else float((pred == truth).mean()),
        "teacher_agreement": float((pred == teacher_pred).mean()),
    }


def latency(model: LoadedModel, x: F32, runs: int) -> dict[str, float]:
    sample = x[:1]
    for _ in range(min(20, runs)):
        model.run(sample)
    times = []
    for i in range(runs):
        one = x[i % len(x):i % len(x) + 1]
        t0 = time.perf_counter()
        model.run(one)
        times.append((time.perf_counter() - t0) * 1000)
    arr = np.asarray(times)
    return {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
            "mean_ms": float(arr.mean()), "runs": runs}


def sizes(path: Path) -> dict[str, int]:
    raw = path.read_bytes()
    return {"raw_bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, compresslevel=9))}


def _shapes_at_batch1(path: Path) -> tuple[Any, dict[str, list[int]]]:
    import onnx  # noqa: PLC0415  # heavy or optional: loaded only when used
    from onnx import shape_inference  # noqa: PLC0415  # heavy or optional: loaded only when used

    model = onnx.load(str(path))
    for inp in model.graph.input:
        for dim in inp.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return model, shapes


def onnx_profile(path: Path) -> dict[str, Any]:
    """MACs, parameter count, operator counts and a peak-memory estimate of an ONNX file."""
    model, shapes = _shapes_at_batch1(path)
    inits = {i.name: i for i in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        macs += _node_macs(node, shapes)
    weights = {n: int(np.prod(i.dims)) for n, i in inits.items()}
    ops = Counter(n.op_type for n in model.graph.node)
    peak_act = _peak_live(model, shapes, inits)
    return {"macs": macs, "parameters": sum(weights.values()), "operators": dict(ops),
            "peak_activation_elements": peak_act}


def _node_macs(node: Any, shapes: dict[str, list[int]]) -> int:
    out = shapes.get(node.output[0], [])
    if node.op_type == "Conv" and len(node.input) > 1 and out:
        w = shapes.get(node.input[1], [])
        return int(np.prod(out)) * int(np.prod(w[1:])) if w else 0
    if node.op_type in ("Gemm", "MatMul") and out:
        a = shapes.get(node.input[0], [])
        k = a[-1] if a else 0
        return int(np.prod(out)) * k
    return 0


def _peak_live(model: Any, shapes: dict[str, list[int]], inits: dict[str, Any]) -> int:
    last_use: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            last_use[name] = i
    outputs = {o.name for o in model.graph.output}
    live = {i.name for i in model.graph.input if i.name not in inits}
    peak = 0
    for i, node in enumerate(model.graph.node):
        live.update(o for o in node.output if o)
        peak = max(peak, sum(int(np.prod(shapes.get(t, [0]))) for t in live))
        live = {t for t in live if last_use.get(t, -1) > i or t in outputs}
    return peak


def memory_estimate(weight_bytes: int, peak_activation_elements: int,
                    bytes_per_activation: int) -> dict[str, int]:
    arena = peak_activation_elements * bytes_per_activation
    return {"model_bytes": weight_bytes, "arena_bytes": arena,
            "peak_memory_bytes": weight_bytes + arena}
