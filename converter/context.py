"""The work directory of one conversion: the artifact names every stage agrees on, and the
`Context` the stages share (recipe, profile, data and its split, results so far).

Its own module so that the stages (`converter.pipeline`), the report
(`converter.report`) and the bundle (`converter.bundle`) depend on it, and not on one
another: no import cycle among them (tests/test_layering.py checks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ProfileError
from agent.profiles import FirmwareProfile, load_profile
from converter import normalize
from converter.data import (
    Dataset,
    Split,
    calibration_indices,
    load_dataset,
    order_inputs,
    split,
)
from converter.errors import DataError, RecipeError, TeacherError
from converter.normalize import Normalization
from converter.recipe import Recipe

STUDENT_FILE = "student.pt"
FP32_ONNX = "model_fp32.onnx"
PRE_ONNX = "model_fp32.pre.onnx"
INT8_ONNX = "model_int8.onnx"
INT8_TFLITE = "model_int8.tflite"
RESULTS = "results.json"
TEACHER_LOGITS = "teacher_logits.npy"
NORMALIZATION = "normalization.npz"
# The pipeline's stages in order (converter.pipeline.STAGES implements them; named here so
# the CLI can list them without importing torch).
STAGE_NAMES = ("teacher", "distill", "prune", "export", "quantize", "compile", "evaluate",
               "report", "bundle")


@dataclass
class Context:
    recipe: Recipe
    profile: FirmwareProfile
    work: Path
    data: Dataset  # raw samples: what the teacher and the device get
    split: Split
    norm: Normalization  # raw -> the student's input, fitted on the training split
    results: dict[str, Any] = field(default_factory=dict)
    say: Callable[[str], None] = print

    @property
    def classes(self) -> int:
        return int(self.teacher_logits.shape[1])

    @cached_property
    def x(self) -> np.ndarray:
        """Every sample as the student sees it (normalized)."""
        return self.norm.apply(self.data.x)

    @cached_property
    def teacher_logits(self) -> np.ndarray:
        """Cached on first use, which comes after the teacher stage wrote the file."""
        return np.asarray(np.load(self.work / TEACHER_LOGITS), dtype=np.float32)

    def truth(self, idx: np.ndarray) -> np.ndarray:
        """Labels where the data has them, else the teacher's predictions."""
        if self.data.y is not None:
            return np.asarray(self.data.y[idx])
        return np.asarray(self.teacher_logits[idx].argmax(1))

    def save(self) -> None:
        tmp = self.work / (RESULTS + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        os.replace(tmp, self.work / RESULTS)

    def calib(self) -> np.ndarray:
        r = self.recipe.data
        """Calibration samples, normalized (the student's inputs)."""
        return self.x[calibration_indices(self.split, r.calibration_samples, r.seed)]


def onnx_input_names(path: Path) -> list[str]:
    """The graph inputs of an ONNX model that are not initializers, in order."""
    import onnx  # noqa: PLC0415  # host-only dependency

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise TeacherError(f"model {path} is not a valid ONNX model: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
                           ) from exc
    weights = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in weights]


def _model_inputs(recipe: Recipe, data: Dataset) -> Dataset:
    """Data for a model with several inputs, in the model's input order; refused where
    several inputs are not supported (a teacher to distill, a torch model).

    Raises:
        DataError: the data and the model disagree on the inputs, or several inputs where
            only one is taken.
    """
    m = recipe.model
    names = onnx_input_names(Path(m.onnx)) if recipe.quantize_only and m.onnx and Path(
        m.onnx).is_file() else None
    if names is not None and len(names) > 1:
        return order_inputs(data, names)
    if data.inputs is not None:
        given = ", ".join(n for n, _ in data.inputs)
        raise DataError(f"data {data.source} holds several inputs ({given}) and no x: that is "
                        "for quantize-only of an ONNX model with those inputs (--model-onnx); "
                        "a teacher, a student or a torch model takes one input x")
    return data


def open_context(recipe: Recipe, work: Path, say: Callable[[str], None] = print) -> Context:
    """Load profile and data, split them, and pick up earlier stages' results."""
    try:
        profile = load_profile(recipe.target.profile)
    except ProfileError as exc:
        raise RecipeError(str(exc)) from exc
    data = load_dataset(recipe.data.source, recipe.model.task)
    data = _model_inputs(recipe, data)
    if recipe.model.gate != "output_error" and data.targets is None:
        raise DataError(f"data {data.source}: model.gate = {recipe.model.gate!r} compares "
                        "with the true outputs, and the data has no y (the targets)")
    if data.y is not None and data.y.max() >= 10_000:
        raise DataError(f"data {data.source}: labels go up to {data.y.max()}, not class ids")
    r = recipe.data
    sp = split(len(data.x), data.y, seed=r.seed, val_fraction=r.val_fraction,
               test_fraction=r.test_fraction)
    work.mkdir(parents=True, exist_ok=True)
    # Fitted once per work directory: every later stage (and a re-bundle) uses what the
    # student was trained on, whatever its own recipe says.
    if (work / NORMALIZATION).is_file():
        norm = normalize.load(work / NORMALIZATION)
    elif recipe.quantize_only:  # a trained model takes the samples it was trained on
        norm = normalize.identity("a trained model takes its samples as given")
        normalize.save(norm, work / NORMALIZATION)
    else:
        norm = normalize.fit(data.x[sp.train], r.normalize)
        normalize.save(norm, work / NORMALIZATION)
    results = json.loads((work / RESULTS).read_text()) if (work / RESULTS).is_file() else {}
    return Context(recipe, profile, work, data, sp, norm, results, say)
