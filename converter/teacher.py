"""Teachers: anything that maps samples to class logits.

An ONNX file from any framework runs in onnxruntime; a torch module comes as a factory
`package.module:function` (or `path/to/file.py:function`) plus a weights file (state_dict).
Either way the teacher is run once over all samples and its logits are cached: offline
distillation needs nothing more.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from agent.serving.runtime import in_fixed_batches
from converter.data import F32
from converter.errors import TeacherError


@dataclass(frozen=True)
class TeacherOutputs:
    logits: F32
    parameters: int
    description: str
    kind: str  # "onnx" | "torch"
    probabilities: bool = False  # the teacher gave probabilities (logits = their log)
    fixed_batch: int | None = None  # the batch an ONNX teacher was exported with, if fixed


def import_factory(spec: str, what: str) -> Any:
    """Resolve `package.module:function` (importable) or `path/to/file.py:function` (loaded
    from that file, its directory added to the import path for its own imports).

    Raises:
        TeacherError: the module, file or attribute cannot be found.
    """
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise TeacherError(f"{what} {spec!r} must look like 'package.module:function' or "
                           "'path/to/file.py:function'")
    try:
        if module_name.endswith(".py"):
            module = _module_from_file(Path(module_name), what)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError, SyntaxError) as exc:
        raise TeacherError(f"{what} {spec!r} cannot be imported: {exc}") from exc


def _module_from_file(path: Path, what: str) -> ModuleType:
    """Import a file once per process under a name derived from its absolute path (so a
    saved student pickled with classes from it loads again in a later stage)."""
    if not path.is_file():
        raise TeacherError(f"{what} file {path} does not exist")
    path = path.resolve()
    name = f"edge_convert_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TeacherError(f"{what} file {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _as_logits(out: F32, n: int, source: str) -> tuple[F32, bool]:
    """The teacher's scores as logits, and whether they were probabilities."""
    if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 2:
        raise TeacherError(f"teacher {source} gave output shape {out.shape}; "
                           f"expected ({n}, classes)")
    if not np.isfinite(out).all():
        raise TeacherError(f"teacher {source} produced NaN/inf outputs")
    # A teacher that ends in softmax gives probabilities; distillation wants logits.
    if (out >= 0).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.clip(out, 1e-8, 1.0)).astype(np.float32), True
    return out, False


FLOAT_TENSORS = ("tensor(float)", "tensor(double)", "tensor(float16)")


def choose_output(outputs: list[Any], name: str | None, source: str) -> Any:
    """The teacher output that holds class scores: `name` when given; else the one float
    tensor of rank 2 (N, classes); else the one sequence of {class: probability} maps
    (scikit-learn's ZipMap, skl2onnx's default). Integer label outputs are skipped.

    Raises:
        TeacherError: `name` is not an output, or no or several outputs qualify; the message
            lists every output with its type and shape and names the option that picks one.
    """
    def listing() -> str:
        return "; ".join(f"{o.name} {o.type} {list(o.shape) if o.shape is not None else '?'}"
                         for o in outputs)

    if name is not None:
        for o in outputs:
            if o.name == name:
                if o.type not in FLOAT_TENSORS and not _is_zipmap(o):
                    raise TeacherError(f"teacher output {name!r} of {source} is {o.type}, not "
                                       f"a float tensor of class scores (outputs: {listing()})")
                return o
        raise TeacherError(f"teacher {source} has no output {name!r} (outputs: {listing()})")
    found = [o for o in outputs if o.type in FLOAT_TENSORS and o.shape is not None
             and len(o.shape) == 2]
    if len(found) == 1:
        return found[0]
    maps = [o for o in outputs if _is_zipmap(o)]
    if not found and len(maps) == 1:
        return maps[0]
    what = "no output is" if not found else f"{len(found)} outputs are"
    raise TeacherError(f"teacher {source}: {what} a float tensor shaped (N, classes) "
                       f"(outputs: {listing()}); --teacher-output NAME picks one")


def _is_zipmap(output: Any) -> bool:
    return str(output.type).startswith("seq(map(") and "tensor(float)" in str(output.type)


def _scores(out: Any) -> np.ndarray:
    """A batch of one output as an array: tensors as they are, ZipMap's list of
    {class: probability} dicts as rows ordered by class."""
    if isinstance(out, list):
        keys = sorted(out[0]) if out else []
        return np.array([[row[k] for k in keys] for row in out], dtype=np.float32)
    return np.asarray(out)


_ONNX_DTYPES: dict[str, Any] = {"tensor(double)": np.float64, "tensor(float16)": np.float16}


class OnnxTeacher:
    """An ONNX teacher in onnxruntime that runs only its output of class scores (`select`
    picks it); `run` returns them as a float32 array. Used by the teacher stage and to time
    the teacher in the report."""

    def __init__(self, path: Path, threads: int = 0) -> None:  # 0: onnxruntime's default
        import onnxruntime as ort  # noqa: PLC0415  # heavy or optional: loaded only when used

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.path = path
        self._sess = ort.InferenceSession(str(path), opts,
                                          providers=["CPUExecutionProvider"])
        self.inputs = self._sess.get_inputs()
        self.input = self.inputs[0]
        self._dtype = _ONNX_DTYPES.get(self.input.type, np.float32)
        self._output: list[str] | None = None

    def select(self, output: str | None) -> OnnxTeacher:
        """Choose the output of class scores (`choose_output`).

        Raises:
            TeacherError: no unambiguous output of class scores.
        """
        self._output = [choose_output(self._sess.get_outputs(), output, self.path.name).name]
        return self

    @property
    def fixed_batch(self) -> int | None:
        """The batch the model was exported with, where it is fixed."""
        first = self.input.shape[0] if self.input.shape else None
        return first if isinstance(first, int) else None

    def run(self, x: F32) -> F32:
        """Class scores of `x`; a model with a fixed batch runs on chunks of exactly it."""
        return in_fixed_batches(self.fixed_batch, x, self._run)

    def _run(self, x: F32) -> F32:
        assert self._output is not None, "select an output first"
        out = self._sess.run(self._output, {self.input.name: x.astype(self._dtype,
                                                                        copy=False)})[0]
        return _scores(out).astype(np.float32)


ONE_INPUT = ("edge-convert feeds a model one input of samples shaped (features,), (time, "
             "features) or (channels, height, width), batch first")


def _shape_text(shape: list[Any]) -> str:
    """A tensor's shape as the user reads it: [N, 3] for a dynamic batch of 3 features."""
    return "[" + ", ".join(str(d) if isinstance(d, int) else "N" if i == 0 else "?"
                           for i, d in enumerate(shape)) + "]"


def _dtype_text(kind: str) -> str:
    """onnxruntime's tensor(float) as numpy names it: float32."""
    bare = str(kind).removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(bare, bare)


def one_input(inputs: list[tuple[str, str, list[Any]]], what: str) -> None:
    """Refuse a model with several inputs in one line naming them (name, type, shape).

    Raises:
        TeacherError: more than one input.
    """
    if len(inputs) <= 1:
        return
    named = ", ".join(f"{name} {_dtype_text(kind)} {_shape_text(shape)}"
                      for name, kind, shape in inputs)
    raise TeacherError(f"{what} has {len(inputs)} inputs ({named}); {ONE_INPUT}: join them "
                       "into one in the model (one input, sliced inside the graph), or "
                       "quantize it outside edge-convert")


def run_onnx_teacher(path: Path, x: F32, batch_size: int,
                     output: str | None = None) -> TeacherOutputs:
    """Run an ONNX teacher over x; `output` names the output of class scores (default: the
    one float (N, classes) output, see `choose_output`).

    Raises:
        TeacherError: missing or corrupt file, inputs that do not fit the model, or no
            unambiguous output of class scores.
    """
    if not path.is_file():
        raise TeacherError(f"teacher file {path} does not exist")
    try:
        teacher = OnnxTeacher(path)
        params = onnx_parameters(path)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise TeacherError(f"teacher file {path} is not a valid ONNX model: "
                           f"{str(exc).splitlines()[0][:200]}") from exc
    one_input([(i.name, i.type, i.shape) for i in teacher.inputs], f"teacher {path.name}")
    inp = teacher.input
    want = [d if isinstance(d, int) else None for d in inp.shape]
    got = list(x.shape)
    if len(want) != len(got) or any(w is not None and w != g
                                    for w, g in zip(want[1:], got[1:], strict=True)):
        raise TeacherError(f"data samples have shape {tuple(got[1:])} but teacher {path.name} "
                           f"expects {tuple(want[1:])} (input {inp.name!r})")
    teacher.select(output)
    fixed = teacher.fixed_batch  # then it runs on chunks of exactly that, the tail padded
    step = fixed * max(1, batch_size // fixed) if fixed else batch_size
    try:
        out = np.concatenate([teacher.run(x[i:i + step]) for i in range(0, len(x), step)])
    except TeacherError:
        raise
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise TeacherError(f"teacher {path.name} fails on the data's samples: "
                           f"{str(exc).splitlines()[0][:200]}") from exc
    logits, probs = _as_logits(out.astype(np.float32), len(x), path.name)
    return TeacherOutputs(logits, params, f"ONNX {path.name}", "onnx", probs, fixed)


def onnx_parameters(path: Path) -> int:
    """Elements in an ONNX model's initializers (its weights)."""
    import onnx  # noqa: PLC0415  # heavy or optional: loaded only when used

    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def run_torch_teacher(factory: str, weights: Path, x: F32, batch_size: int) -> TeacherOutputs:
    """Build a torch teacher from its factory and weights, run it over x.

    Raises:
        TeacherError: factory not importable, weights missing/corrupt or not matching, or
            inputs that do not fit the model.
    """
    model = load_torch_model(factory, weights, "teacher")
    outs = run_torch_model(model, x, batch_size, f"teacher {factory}")
    params = sum(p.numel() for p in model.parameters())
    logits, probs = _as_logits(outs, len(x), factory)
    return TeacherOutputs(logits, params, f"torch {factory}", "torch", probs)


def load_torch_model(factory: str, weights: Path, what: str) -> Any:
    """`factory()` with the state_dict in `weights` loaded, in eval mode.

    Raises:
        TeacherError: factory not importable, weights missing, corrupt or not matching.
    """
    import torch  # noqa: PLC0415  # heavy or optional: loaded only when used

    make = import_factory(factory, f"{what} factory")
    if not weights.is_file():
        raise TeacherError(f"{what} weights {weights} do not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = make()
        model.load_state_dict(state)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/... for bad files
        raise TeacherError(f"{what} weights {weights} cannot be loaded into {factory}: "
                           f"{str(exc).splitlines()[0][:200]}") from exc
    return model.eval()


def run_torch_model(model: Any, x: F32, batch_size: int, what: str) -> F32:
    """The model's float32 outputs over x, in batches.

    Raises:
        TeacherError: the samples do not fit the model.
    """
    import torch  # noqa: PLC0415  # heavy or optional: loaded only when used

    outs = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                outs.append(model(torch.from_numpy(x[i:i + batch_size])).numpy())
    except RuntimeError as exc:
        raise TeacherError(f"data samples of shape {x.shape[1:]} do not fit {what}: "
                           f"{str(exc).splitlines()[0][:200]}") from exc
    return np.concatenate(outs).astype(np.float32)
