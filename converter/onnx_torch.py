"""An ONNX model as a torch module, so a model given as ONNX reaches int8 TFLite through
the same PT2E -> LiteRT path as a torch model (`converter.quantize.quantize_tflite`).

The route is onnx2torch (ONNX -> torch.fx), chosen over onnx2tf: it keeps the host free of
TensorFlow (litert-torch writes the flatbuffer), and the one quantizer, its per-channel
settings and its calibration serve torch and ONNX models alike. `bench/bench_convert.py
--cases onnx` puts this route beside the torch route on the MLPerf Tiny reference models;
docs/convert-routes.md says how onnx2tf compared.

Before conversion the graph is made static and folded: a dynamic batch is fixed at 1
(TFLite models for microcontrollers and NPUs take one sample; a fixed batch stays),
onnxruntime's basic graph optimizations fold the shape arithmetic of dynamic exports into
constants, and onnx2torch's Reshape and Gather modules with a constant shape or index
become plain torch calls (its own compute from the constant at run time, which
torch.export or the LiteRT lowering cannot trace). An operator onnx2torch cannot convert
at any opset is refused in one line naming it; a model whose opset is newer than its
converters is first converted down (onnx's
version converter). The torch module is checked against onnxruntime on real samples.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import operator
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from agent.serving.runtime import in_fixed_batches, open_onnx, sample_shapes
from converter.data import F32
from converter.errors import ConvertError
from converter.quantize import torch_args

OLDEST_OPSET = 11  # the lowest opset a model is converted down to for onnx2torch


@contextlib.contextmanager
def _torchvision_or_standin() -> Iterator[None]:
    """onnx2torch imports torchvision for two detection operators (NonMaxSuppression,
    RoiAlign) at import time. The host's torch is the CPU build, for which no torchvision
    wheel exists here; where none imports, a stand-in serves the import and is removed
    after it. Models with those operators are refused before conversion
    (`_unsupported`), so the stand-in is never called."""
    if "onnx2torch" in sys.modules or _torchvision_imports():
        yield
        return

    def absent(*_a: Any, **_k: Any) -> Any:
        raise ConvertError("this operator needs torchvision, which is not installed")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = absent  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    try:
        yield
    finally:
        for name in ("torchvision", "torchvision.ops"):
            if sys.modules.get(name) in (tv, ops):
                del sys.modules[name]


def _torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401, PLC0415  # only whether it loads
    except Exception:  # a build for another torch fails at import in assorted ways
        return False
    return True


def _registry() -> tuple[Any, Any]:
    with _torchvision_or_standin():
        import onnx2torch  # noqa: PLC0415  # heavy or optional: loaded only when used
        from onnx2torch.node_converters import registry  # noqa: PLC0415
    return onnx2torch, registry


def static_graph(src: Path, dst: Path) -> Any:
    """`src` with a dynamic batch fixed at 1 (a fixed batch stays) and its constants folded
    by onnxruntime (basic level: standard ONNX operators only), written to `dst` and
    returned as a ModelProto."""
    import onnx  # noqa: PLC0415  # heavy or optional: loaded only when used
    import onnxruntime as ort  # noqa: PLC0415

    model = onnx.load(str(src))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:  # a dynamic batch; a fixed one stays as exported
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    onnx.save(model, str(dst))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    try:
        ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ConvertError(f"the ONNX model does not load at batch 1: "
                           f"{str(exc).splitlines()[0][:200]}") from exc
    return onnx.load(str(dst))


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _unsupported(model: Any, registry: Any) -> list[str]:
    """`op (domain, opset N)` for each operator type onnx2torch has no converter for."""
    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[str, None] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        try:
            registry.get_converter(operation_type=node.op_type, domain=domain,
                                   version=opsets.get(domain, 1))
        except NotImplementedError:
            where = f"{domain}, " if domain not in ("", "ai.onnx") else ""
            missing[f"{node.op_type} ({where}opset {opsets.get(domain, 1)})"] = None
    return list(missing)


def _convertible(model: Any, registry: Any) -> Any:
    """`model`, converted down to an older opset when that gives every operator a
    converter.

    Raises:
        ConvertError: an operator has no converter at any opset; the message names it.
    """
    from onnx import version_converter  # noqa: PLC0415  # heavy or optional

    missing = _unsupported(model, registry)
    if not missing:
        return model
    for target in range(_opset(model) - 1, OLDEST_OPSET - 1, -1):
        try:
            older = version_converter.convert_version(model, target)
        except Exception:  # the version converter cannot reach this opset: try the next
            continue
        if not _unsupported(older, registry):
            return older
    raise ConvertError(f"int8 TFLite from ONNX: onnx2torch cannot convert operator"
                       f"{'s' if len(missing) > 1 else ''} {', '.join(missing)}; build "
                       "int8 ONNX only (--quantize-formats '[\"onnx\"]') or give the model "
                       "as torch (--model-torch, --model-weights)")


def _constant_reshapes(model: Any) -> None:
    """Drop Reshape's `allowzero = 1` where the (folded) shape is a constant with no zero
    (then it means nothing, and onnx2torch refuses the attribute)."""
    from onnx import numpy_helper  # noqa: PLC0415  # heavy or optional

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    for node in model.graph.node:
        allow = [a for a in node.attribute if a.name == "allowzero" and a.i == 1]
        shape = consts.get(node.input[1]) if node.op_type == "Reshape" else None
        if allow and shape is not None and (shape != 0).all():
            node.attribute.remove(allow[0])


def _traceable(gm: fx.GraphModule) -> fx.GraphModule:
    """onnx2torch's Reshape, Gather, Squeeze and Unsqueeze modules whose shape, index or
    axes are a constant, as plain `torch.reshape`, `torch.select` / `torch.index_select`,
    `torch.squeeze` and `torch.unsqueeze` calls: its modules compute from the constant's
    values at run time (a data-dependent reshape; a tensor index; axes sorted at run time,
    as torch's exporter writes a global average pool: Unsqueeze, ReduceMean, Squeeze),
    which torch.export or the LiteRT lowering cannot trace."""
    from onnx2torch.node_converters.gather import OnnxGather  # noqa: PLC0415
    from onnx2torch.node_converters.reshape import OnnxReshape  # noqa: PLC0415
    from onnx2torch.node_converters.squeeze import OnnxSqueezeDynamicAxes  # noqa: PLC0415
    from onnx2torch.node_converters.unsqueeze import OnnxUnsqueezeDynamicAxes  # noqa: PLC0415

    kinds = OnnxReshape | OnnxGather | OnnxSqueezeDynamicAxes | OnnxUnsqueezeDynamicAxes
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if (not isinstance(module, kinds) or len(node.args) < 2
                or getattr(node.args[1], "op", None) != "get_attr"):
            continue  # computed at run time: torch.export says what it cannot trace
        x, const = node.args[0], operator.attrgetter(node.args[1].target)(gm)
        with gm.graph.inserting_before(node):
            if isinstance(module, OnnxSqueezeDynamicAxes):  # Squeeze with constant axes
                axes = tuple(int(v) for v in const.reshape(-1).tolist())
                plain = gm.graph.call_function(torch.squeeze, (x, axes))
            elif isinstance(module, OnnxUnsqueezeDynamicAxes):
                axes = tuple(sorted(int(v) for v in const.reshape(-1).tolist()))
                if any(a < 0 for a in axes):
                    continue  # counted from the output's end: left to onnx2torch
                plain = x
                for a in axes:
                    plain = gm.graph.call_function(torch.unsqueeze, (plain, a))
            elif isinstance(module, OnnxReshape):
                sizes = tuple(gm.graph.call_method("size", (x, i)) if d == 0 else d
                              for i, d in enumerate(int(v) for v in const.tolist()))
                plain = gm.graph.call_function(torch.reshape, (x, sizes))
            elif const.ndim == 0:
                plain = gm.graph.call_function(torch.select, (x, module._axis, int(const)))
            elif const.ndim == 1:
                plain = gm.graph.call_function(torch.index_select,
                                               (x, module._axis, node.args[1]))
            else:
                continue
        node.replace_all_uses_with(plain)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def onnx_to_torch(src: Path, work: Path, samples: F32) -> tuple[torch.nn.Module, int]:
    """The ONNX model at `src` as a torch module that computes what onnxruntime computes on
    `samples` (checked on up to 16), and the batch it takes: 1 where `src`'s batch is
    dynamic, else the fixed batch it was exported with.

    Raises:
        ConvertError: an operator onnx2torch cannot convert (named), a model that does not
            run at batch 1, or a torch module that disagrees with onnxruntime.
    """
    onnx2torch, registry = _registry()
    model = static_graph(src, work / "model.static.onnx")
    batch = int(model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 1)
    _constant_reshapes(model)
    model = _convertible(model, registry)
    try:
        gm = _traceable(onnx2torch.convert(model)).eval()
    except Exception as exc:  # onnx2torch raises NotImplementedError, ValueError, ...
        raise ConvertError(f"int8 TFLite from ONNX: onnx2torch failed: "
                           f"{str(exc).splitlines()[0][:200]}") from exc
    x = samples[:16]
    reference = open_onnx(src)
    want = reference.run(x)
    specs = reference.inputs
    shapes = sample_shapes(specs) if len(specs) > 1 else None  # several: packed in x

    def run(chunk: F32) -> F32:
        with torch.no_grad():
            return np.asarray(gm(*torch_args(chunk, shapes)).numpy())

    try:  # a failing fx module prints its generated code to stderr: the error says enough
        with contextlib.redirect_stderr(io.StringIO()):
            got = in_fixed_batches(batch, x, run)
    except Exception as exc:
        raise ConvertError(f"int8 TFLite from ONNX: the model converted to torch does not "
                           f"run at batch {batch}: {str(exc).splitlines()[-1][:200]}") from exc
    worst = float(np.max(np.abs(got - want)))
    scale = max(1.0, float(np.max(np.abs(want))))
    if worst > 1e-3 * scale:
        raise ConvertError(f"int8 TFLite from ONNX: the model converted to torch differs "
                           f"from onnxruntime by {worst:.3g} (max |output| {scale:.3g})")
    return gm, batch
