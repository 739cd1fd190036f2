"""Runtimes behind one small interface: ONNX Runtime and TFLite.

`open_model` gives a `LoadedModel` whose `run` takes and returns real (float) values: for
quantized inputs/outputs it applies the tensor's scale and zero point, so clients never see
int8. TFLite comes from `ai-edge-litert` (tflite-runtime's successor, works with numpy 2) or,
where that is what a distribution ships, `tflite-runtime`. Third-party errors are translated
into `RuntimeLoadError` at this edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from agent.errors import RuntimeLoadError
from agent.profiles import TfliteDelegate
from agent.trust.manifest import Manifest, Preprocessing, QuantParams, TensorSpec

F32 = npt.NDArray[np.float32]


class LoadedModel(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, x: F32) -> F32:
        """Run one batch of float inputs; returns float outputs of the first output."""
        ...


def sample_shapes(specs: list[TensorSpec]) -> list[tuple[int, ...]]:
    """Each input's shape for one sample (batch dimension dropped).

    Raises:
        ValueError: a dimension besides the batch is not fixed (several inputs travel
            packed side by side, which needs their sizes).
    """
    out = []
    for spec in specs:
        if any(d is None for d in spec.shape[1:]):
            raise ValueError(f"input {spec.name} has a dynamic dimension besides the batch "
                             f"{spec.shape}: a model with several inputs needs them fixed")
        out.append(tuple(int(d) for d in spec.shape[1:]))  # type: ignore[arg-type]
    return out


def packed_width(shapes: list[tuple[int, ...]]) -> int:
    """Values per sample of several inputs packed side by side."""
    return sum(math.prod(s) for s in shapes)


def pack(parts: list[npt.NDArray[Any]]) -> F32:
    """Several inputs' batches (N, ...) as one float32 array (N, values): each sample's
    values of the first input, then of the second, and so on. A model with several inputs
    goes through the agent (queues, batches, drift statistics) in this form; its runtime
    adapter unpacks it (`unpack`)."""
    n = len(parts[0])
    return np.concatenate([np.asarray(p, dtype=np.float32).reshape(n, -1) for p in parts],
                          axis=1)


def unpack(x: F32, shapes: list[tuple[int, ...]]) -> list[F32]:
    """`pack`'s inverse: the inputs of `shapes` (per sample) from packed rows `x`."""
    out, at = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(x[:, at:at + size].reshape(len(x), *shape))
        at += size
    return out


def quantize(x: F32, q: QuantParams, dtype: Any) -> npt.NDArray[Any]:
    info = np.iinfo(dtype)
    out: npt.NDArray[Any] = np.clip(np.round(x / q.scale) + q.zero_point, info.min,
                                    info.max).astype(dtype)
    return out


def dequantize(v: npt.NDArray[Any], q: QuantParams) -> F32:
    return ((v.astype(np.float32) - q.zero_point) * q.scale).astype(np.float32)


class _Feed:
    """How one input reaches its tensor, worked out once at load: `quantize` for an int8
    tensor, a cast otherwise.

    An 8-bit tensor is quantized by lookup: `quantize` is monotone in x, so each of the
    255 steps between its 256 levels sits at one float32 value, found at load
    (`_steps`), and a sample's level is the number of steps at or below it
    (`searchsorted`, one numpy call and a `take`, instead of the arithmetic's six: the
    request path runs them cold, 9 µs of an inference on the digits model). Equal to
    `quantize` for every float32 but NaN, which the API refuses before it gets here. A
    wider integer tensor keeps the arithmetic (its bounds and types looked up once)."""

    __slots__ = ("dtype", "hi", "levels", "lo", "scale", "steps", "zero_point")

    def __init__(self, spec: TensorSpec) -> None:
        self.dtype = np.dtype(spec.dtype)
        q = spec.quantization
        self.scale = None if q is None else np.float32(q.scale)
        self.zero_point = 0 if q is None else q.zero_point
        info = np.iinfo(self.dtype) if q is not None else None
        self.lo, self.hi = (info.min, info.max) if info is not None else (0, 0)
        self.steps: F32 | None = None
        self.levels: npt.NDArray[Any] | None = None
        if (self.scale is not None and self.dtype.itemsize == 1
                and np.isfinite(self.scale) and self.scale > 0):
            scale = self.scale
            self.steps = _steps(lambda v: self._arithmetic(v, scale), self.lo, self.hi)
            self.levels = np.arange(self.lo, self.hi + 1).astype(self.dtype)

    def __call__(self, x: F32) -> npt.NDArray[Any]:
        if self.steps is not None and x.dtype == np.float32:
            return self.levels.take(self.steps.searchsorted(x, side="right"))  # type: ignore[union-attr]
        if self.scale is None:
            return x.astype(self.dtype, copy=False)
        return self._arithmetic(x, self.scale)

    def _arithmetic(self, x: F32, scale: np.float32) -> npt.NDArray[Any]:
        v = np.divide(x, scale, dtype=np.float32)  # as quantize: x / scale, rounded
        np.rint(v, out=v)  # np.round's rounding (half to even), without its wrappers
        v += self.zero_point
        np.minimum(v, self.hi, out=v)  # np.clip, without its Python wrapper, the last
        out = np.empty(v.shape, self.dtype)  # step writing the integers (exact: in range)
        np.maximum(v, self.lo, out=out, casting="unsafe")
        return out


def _steps(level: Callable[[F32], npt.NDArray[Any]], lo: int, hi: int) -> F32:
    """For each level k in lo+1..hi, the least float32 x with `level(x) >= k`, for a
    `level` monotone in x: bisected over float32's values in order (as integers: a
    float's bits, negatives mirrored), all levels at once, 33 halvings from -inf to
    +inf."""
    def floats(keys: npt.NDArray[np.int64]) -> F32:
        bits = np.where(keys >= 0, keys, -keys | 0x80000000).astype(np.uint32)
        return bits.view(np.float32)

    want = np.arange(lo + 1, hi + 1)
    inf = 0x7F800000  # +inf's bits; -inf's key is its negative
    below = np.full(len(want), -inf, np.int64)  # level(below) < k <= level(above)
    above = np.full(len(want), inf, np.int64)
    while np.any(above - below > 1):
        mid = (below + above) // 2
        with np.errstate(over="ignore"):  # huge x / scale: inf, the top level
            reached = level(floats(mid)).astype(np.int64) >= want
        above, below = np.where(reached, mid, above), np.where(reached, below, mid)
    return floats(above)


@dataclass
class OnnxModel:
    session: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def __post_init__(self) -> None:
        # several inputs come packed (`pack`): their per-sample shapes, to unpack them
        self._shapes = sample_shapes(self.inputs) if len(self.inputs) > 1 else None

    def run(self, x: F32) -> F32:
        """A model exported with a fixed batch runs in chunks of exactly that size."""
        return in_fixed_batches(self.inputs[0].shape[0], x, self._run)

    def _run(self, x: F32) -> F32:
        if self._shapes is None:
            feed = {self.inputs[0].name: x.astype(np.float32)}
        else:
            feed = {spec.name: part for spec, part in zip(self.inputs, unpack(
                np.asarray(x, dtype=np.float32), self._shapes), strict=True)}
        out = self.session.run(None, feed)
        return np.asarray(out[0], dtype=np.float32)


def in_fixed_batches(fixed: int | None, x: F32, run: Callable[[F32], F32]) -> F32:
    """`run` over `x` for a model whose batch is fixed at `fixed` (None: any batch): chunks
    of exactly `fixed` samples, the last one padded with copies of its last sample and the
    padded outputs dropped."""
    if not fixed or len(x) == fixed or not len(x):
        return run(x)
    outs = []
    for i in range(0, len(x), fixed):
        chunk = x[i:i + fixed]
        n = len(chunk)
        if n < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
        outs.append(run(chunk)[:n])
    return np.concatenate(outs)


_ORT_TYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float16)": "float16"}


def _ort_spec(arg: Any) -> TensorSpec:
    shape = [d if isinstance(d, int) else None for d in arg.shape]
    return TensorSpec(name=arg.name, dtype=_ORT_TYPES.get(arg.type, "float32"), shape=shape)


def _label(source: Path | bytes) -> str:
    return source.name if isinstance(source, Path) else f"model ({len(source)} bytes in memory)"


def _onnxruntime() -> Any:
    try:
        import onnxruntime as ort  # noqa: PLC0415  # heavy or optional: loaded only when used
    except ImportError as exc:
        raise RuntimeLoadError("no ONNX Runtime here: install it (pip install "
                               "'edgekeeper[onnx]') or ship this model for TFLite") from exc
    return ort


def open_onnx(source: Path | bytes, *, threads: int = 1,
              providers: list[str] | None = None) -> OnnxModel:
    ort = _onnxruntime()
    if hasattr(ort, "disable_telemetry_events"):  # no usage telemetry from the device
        ort.disable_telemetry_events()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    available = set(ort.get_available_providers())
    wanted = [p for p in (providers or ["CPUExecutionProvider"]) if p in available]
    try:
        where = str(source) if isinstance(source, Path) else source
        sess = ort.InferenceSession(where, opts, providers=wanted or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's exceptions are not part of a stable hierarchy
        raise RuntimeLoadError(f"onnxruntime cannot load {_label(source)}: "
                               f"{str(exc).splitlines()[0][:200]}") from exc
    return OnnxModel(sess, [_ort_spec(a) for a in sess.get_inputs()],
                     [_ort_spec(a) for a in sess.get_outputs()])


def _tflite_module() -> Any:
    try:
        import ai_edge_litert.interpreter as mod  # noqa: PLC0415  # optional: when used
    except ImportError:
        try:
            import tflite_runtime.interpreter as mod  # noqa: PLC0415  # optional: when used
        except ImportError as exc:
            raise RuntimeLoadError("no TFLite runtime: install ai-edge-litert "
                                   "(pip install 'edgekeeper[tflite]') or tflite-runtime") from exc
    return mod


def import_runtime(runtime: Literal["onnx", "tflite"]) -> None:
    """Import the runtime's library (once per process), so that measuring what a model
    adds does not charge the library to the first model loaded (LiteRT: about 9 MiB).

    Raises:
        RuntimeLoadError: the runtime is not installed.
    """
    if runtime == "tflite":
        _tflite_module()
    else:
        _onnxruntime()


def tflite_interpreter_class() -> Any:
    """The TFLite Interpreter class from whichever runtime is installed."""
    return _tflite_module().Interpreter


def load_tflite_delegates(specs: list[TfliteDelegate], *, required: bool
                          ) -> tuple[list[Any], list[str]]:
    """Load the profile's external delegates (NPU/TPU libraries on the device).

    Returns:
        the loaded delegates, and one line per delegate that could not be loaded (the
        model then runs those operators on the CPU).

    Raises:
        RuntimeLoadError: a delegate is missing and `required` (the accelerator has no
            CPU fallback, e.g. the Edge TPU).
    """
    loaded, problems = [], []
    for spec in specs:
        try:
            loaded.append(_tflite_module().load_delegate(spec.library, dict(spec.options)))
        except (ValueError, OSError, RuntimeError) as exc:
            problem = f"delegate {spec.name} ({spec.library}) not loaded: {str(exc)[:160]}"
            if required:
                raise RuntimeLoadError(problem) from exc
            problems.append(problem)
    return loaded, problems


def _tfl_spec(d: dict[str, Any]) -> TensorSpec:
    scale, zp = d["quantization"]
    dtype = np.dtype(d["dtype"]).name
    q = QuantParams(scale=float(scale), zero_point=int(zp)) if scale else None
    return TensorSpec(name=d["name"], dtype=dtype, shape=[int(v) for v in d["shape"]],
                      quantization=q)


@dataclass
class TfliteModel:
    interpreter: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    _in_index: int
    _out_index: int
    _in_indices: list[int] = field(default_factory=list)  # of every input, packed order

    def __post_init__(self) -> None:
        self._shapes = sample_shapes(self.inputs) if len(self.inputs) > 1 else None
        self._feeds = [_Feed(spec) for spec in self.inputs]
        out, dtype = self.outputs[0].quantization, np.dtype(self.outputs[0].dtype)
        # an 8-bit output dequantizes through a table of its 256 values, computed as
        # `dequantize` computes each (one lookup per request instead of three operations)
        self._out_table = None
        if out is not None and dtype.itemsize == 1:
            values = np.arange(256, dtype=np.uint8).view(dtype)
            self._out_table = dequantize(values, out)

    def run(self, x: F32) -> F32:
        """Runs in chunks of the model's batch where it is fixed (sample by sample at 1)."""
        return in_fixed_batches(self.inputs[0].shape[0], x, self._run)

    def _run(self, x: F32) -> F32:
        it = self.interpreter
        if self._shapes is None:
            it.set_tensor(self._in_index, self._feeds[0](x))
        else:
            for index, feed, part in zip(self._in_indices, self._feeds,
                                         unpack(x, self._shapes), strict=True):
                it.set_tensor(index, feed(part))
        it.invoke()
        raw = it.get_tensor(self._out_index)
        if self._out_table is not None:
            return self._out_table.take(raw.view(np.uint8))  # type: ignore[no-any-return]
        q = self.outputs[0].quantization
        return np.asarray(raw, dtype=np.float32) if q is None else dequantize(raw, q)


def open_tflite(source: Path | bytes, *, threads: int = 1,
                delegates: list[Any] | None = None) -> TfliteModel:
    interpreter_cls = tflite_interpreter_class()
    try:
        where = ({"model_path": str(source)} if isinstance(source, Path)
                 else {"model_content": source})
        it = interpreter_cls(**where, num_threads=threads,
                             experimental_delegates=delegates or None)
        it.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise RuntimeLoadError(f"TFLite cannot load {_label(source)}: "
                               f"{str(exc).splitlines()[0][:200]}") from exc
    ins, outs = _signature_order(it.get_input_details()), it.get_output_details()
    return TfliteModel(it, [_tfl_spec(d) for d in ins], [_tfl_spec(d) for d in outs],
                       ins[0]["index"], outs[0]["index"], [d["index"] for d in ins])


def _signature_order(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Inputs in the order of the converted function's arguments: LiteRT names them
    `…args_0`, `…args_1`, … but lists them in tensor order, which need not be the same."""
    numbers = []
    for d in details:
        _, found, tail = str(d["name"]).rpartition("args_")
        if not found or not tail.isdigit():
            return details
        numbers.append(int(tail))
    return [d for _, d in sorted(zip(numbers, details, strict=True), key=lambda p: p[0])]


def open_model(source: Path | bytes, runtime: Literal["onnx", "tflite"], *,
               threads: int = 1, providers: list[str] | None = None,
               delegates: list[Any] | None = None) -> LoadedModel:
    """Load a model, from its file or from bytes in memory (a sealed model), with the named
    runtime.

    Raises:
        RuntimeLoadError: the runtime is missing or refuses the file.
    """
    if runtime == "onnx":
        return open_onnx(source, threads=threads, providers=providers)
    return open_tflite(source, threads=threads, delegates=delegates)


def normalization(p: Preprocessing, sample_shape: list[int | None]) -> tuple[F32, F32] | None:
    """`scale` and `offset` as arrays that broadcast over a batch of samples of this shape
    (None for the identity, which costs nothing on the request path)."""
    if p.identity:
        return None
    rank = len(sample_shape)
    if p.axis == "tensor":
        shape = [1] * (rank + 1)
    elif p.axis == "channel":
        shape = [1] * (rank + 1)
        shape[p.layout.index("C")] = len(p.scale)
    else:
        shape = [1, *[int(d or 1) for d in sample_shape]]
    return (np.asarray(p.scale, dtype=np.float32).reshape(shape),
            np.asarray(p.offset, dtype=np.float32).reshape(shape))


@dataclass
class Normalized:
    """A model behind its bundle's preprocessing: `run` takes raw samples, applies
    `x = raw * scale + offset` (`Preprocessing`), then the model (and its int8 input
    quantization)."""

    model: LoadedModel
    scale: F32
    offset: F32
    inputs: list[TensorSpec] = field(init=False)
    outputs: list[TensorSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.inputs, self.outputs = self.model.inputs, self.model.outputs

    def prepare(self, x: F32) -> F32:
        return np.asarray(x * self.scale + self.offset, dtype=np.float32)

    def run(self, x: F32) -> F32:
        return self.model.run(self.prepare(x))


def with_preprocessing(model: LoadedModel, manifest: Manifest) -> LoadedModel:
    """The model as the agent serves it: behind the manifest's preprocessing, if any."""
    arrays = normalization(manifest.preprocessing, manifest.inputs[0].shape[1:])
    if arrays is None:
        return model
    return Normalized(model, *arrays)


def prepared(model: LoadedModel, x: F32) -> F32:
    """What `model` feeds its runtime for raw samples `x` (the drift statistics look at
    the model's inputs, which the manifest's reference statistics describe)."""
    return model.prepare(x) if isinstance(model, Normalized) else x
