"""The recipe: every option of every stage, from a TOML file and the command line.

Source order is explicit: command-line options override the recipe file, which overrides the
defaults here. Every field of every section is also a command-line option named
`--<section>-<field>` (generated from these models, so the two never drift apart). Relative
paths in a recipe file are relative to that file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from converter.errors import RecipeError


class _Section(BaseModel):
    # A docstring under a field is its description: the option's help (option_help).
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class DataOptions(_Section):
    """Where samples come from and how they are split."""

    source: str = "digits"
    """`digits` (scikit-learn's load_digits, 8x8 images in [0, 1]) or an .npz with `x`,
    optionally `y` (integer labels) and `labels` (class names)"""
    seed: int = 0
    """seed of the split, the calibration sample and training"""
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    """share of samples for validation (early stopping, quality gates)"""
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    """share of samples for the report's accuracies, used for nothing else"""
    calibration_samples: int = Field(256, ge=8)
    """training samples that calibrate int8 quantization"""
    normalize: Literal["auto", "none", "standard", "minmax"] = "auto"
    """input normalization fitted on the training split and applied by the agent; auto:
    standard per feature (vectors) or channel when their scales differ or are far from 1"""


class TeacherOptions(_Section):
    """An ONNX file, or a torch factory (`package.module:function` or
    `path/to/file.py:function`) plus a weights file (a state_dict)."""

    onnx: str | None = None
    """teacher as an ONNX file from any framework"""
    torch: str | None = None
    """teacher as a torch factory, package.module:function or path/to/file.py:function"""
    weights: str | None = None
    """state_dict file for the torch factory"""
    batch_size: int = Field(256, ge=1)
    """samples per teacher run"""
    output: str | None = None
    """ONNX output of class scores; default the one float output shaped (N, classes)
    (integer labels and scikit-learn's ZipMap are skipped)"""
    min_margin_points: float = Field(10.0, ge=0, le=100)
    """gate: the teacher's validation accuracy must beat chance (the most common class) by
    this many points"""

    @model_validator(mode="after")
    def _one_kind(self) -> TeacherOptions:
        if self.onnx and self.torch:
            raise ValueError("give either teacher.onnx or teacher.torch, not both")
        if self.torch and not self.weights:
            raise ValueError("teacher.torch needs teacher.weights")
        if self.output and not self.onnx:
            raise ValueError("teacher.output names an output of an ONNX teacher")
        return self


class ModelOptions(_Section):
    """A model you already trained, quantized as it is: no teacher, no distillation, the
    same int8 export, gates and report. An ONNX file, or a torch factory plus weights."""

    onnx: str | None = None
    """trained fp32 model as an ONNX file (int8 TFLite from it through onnx2torch)"""
    torch: str | None = None
    """trained model as a torch factory, package.module:function or path/to/file.py:function"""
    weights: str | None = None
    """state_dict file for the torch factory"""
    task: Literal["classify", "reconstruct", "regress"] = "classify"
    """classify: outputs are class scores, gated on label accuracy; reconstruct: an
    autoencoder whose output is its input, gated on output error, its reconstruction error
    the anomaly score on the device; regress: other outputs, gated on output error; the
    data's y, where given, holds the true outputs (float, (N,) or (N, k)) and the report
    scores against them"""
    max_output_error: float = Field(0.1, gt=0)
    """gate for reconstruct and regress: the int8 outputs' RMS error against the fp32
    outputs on validation, relative to the fp32 outputs' standard deviation"""
    gate: Literal["output_error", "mae", "rmse", "r2"] = "output_error"
    """regress: what the int8 gate compares with fp32 on validation: output_error (against
    the fp32 outputs, model.max_output_error), or mae, rmse or r2 against the data's
    targets (model.max_metric_change)"""
    max_metric_change: float = Field(0.05, ge=0)
    """gate on mae or rmse: int8 at most this share above fp32 (0.05 = 5 %); on r2: at most
    this much below fp32"""
    anomaly_quantile: float = Field(0.99, gt=0.5, lt=1)
    """reconstruct: the device flags a sample whose reconstruction error exceeds this
    quantile of the errors on normal training samples (label 0 where the data has labels)"""

    @property
    def given(self) -> bool:
        return bool(self.onnx or self.torch)

    @model_validator(mode="after")
    def _one_kind(self) -> ModelOptions:
        if self.onnx and self.torch:
            raise ValueError("give either model.onnx or model.torch, not both")
        if self.torch and not self.weights:
            raise ValueError("model.torch needs model.weights")
        if self.gate != "output_error" and self.task != "regress":
            raise ValueError(f"model.gate = {self.gate!r} scores a regressor against its "
                             "targets: it needs model.task = 'regress'")
        if self.task != "classify" and not self.given:
            raise ValueError(f"model.task = {self.task!r} needs a trained model (model.onnx "
                             "or model.torch): distillation is for classifiers")
        return self


class StudentOptions(_Section):
    """The student network."""

    family: Literal["auto", "mlp", "cnn", "dscnn", "resnet8", "kws-dscnn", "mobilenet-v1",
                    "fc-autoencoder", "module"] = "auto"
    """auto: mlp for vectors (F,), cnn for sequences (C, L) and images (C, H, W); cnn and
    dscnn are 1-D for sequences, 2-D for images of any H x W; resnet8, kws-dscnn,
    mobilenet-v1 and fc-autoencoder are the MLPerf Tiny reference models"""
    hidden: list[int] = Field(default_factory=lambda: [32])
    """mlp: hidden layer widths"""
    channels: list[int] | None = None
    """cnn/dscnn: stage widths; default [8, 16] for images, [16, 32] for sequences"""
    module: str | None = None
    """family module: package.module:factory or path/to/file.py:factory, called as
    factory(input_shape, classes)"""

    @model_validator(mode="after")
    def _module_given(self) -> StudentOptions:
        if self.family == "module" and not self.module:
            raise ValueError("student.family = 'module' needs student.module")
        return self


class DistillOptions(_Section):
    """Knowledge distillation (Hinton's soft-target loss plus the labels)."""

    epochs: int = Field(80, ge=1)
    """most training epochs"""
    batch_size: int = Field(64, ge=1)
    """samples per training step"""
    lr: float = Field(3e-3, gt=0)
    """AdamW learning rate (cosine schedule)"""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW weight decay"""
    temperature: float | None = Field(None, gt=0)
    """KD temperature; default 4 for teachers that give logits, 1 for teachers that give
    probabilities (trees, scikit-learn), whose log is already soft"""
    alpha: float = Field(0.7, ge=0, le=1)
    """weight of the soft (teacher) loss against the labels' loss"""
    patience: int = Field(12, ge=1)
    """early stopping: epochs without a better validation loss"""
    max_gap_points: float = Field(3.0, ge=0, le=100)
    """gate: the fp32 student within this many points of the teacher on validation"""
    tensorboard: bool = False
    """write TensorBoard event files under <out>/tensorboard"""
    progress: bool = True
    """show a progress bar"""


class PruneOptions(_Section):
    """Optional pruning after distillation, then KD fine-tuning."""

    method: Literal["none", "unstructured", "structured"] = "none"
    """unstructured: global L1 over weights; structured: whole channels (Torch-Pruning)"""
    sparsity: float = Field(0.5, ge=0, lt=1)
    """share of weights, or of channels if structured"""
    finetune_epochs: int = Field(20, ge=0)
    """KD fine-tuning epochs after pruning"""


class QuantizeOptions(_Section):
    """int8 quantization and its accuracy gate."""

    formats: list[Literal["onnx", "tflite"]] = Field(
        default_factory=lambda: ["onnx", "tflite"])  # type: ignore[arg-type]  # literal list
    """int8 models to build"""
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    """ONNX calibration method tried first"""
    per_channel: bool = True
    """per-channel weights (forced off where the profile disallows it)"""
    tolerance_points: float = Field(1.0, ge=0)
    """gate: int8 at most this many points below fp32 on validation"""
    mitigate: bool = True
    """on a failed gate try other calibrations, then float layers"""
    max_float_layers: int = Field(3, ge=0)
    """most layers kept in float by the mitigation (where the profile allows)"""
    min_input_levels: int = Field(8, ge=0, le=256)
    """refuse inputs whose int8 quantization leaves a feature (channel) fewer levels than
    min(this, its distinct training values); 0 turns the check off"""


class EvaluateOptions(_Section):
    """The report's measurements."""

    latency_runs: int = Field(200, ge=1)
    """timed runs per model (host CPU, batch 1)"""
    threads: int = Field(1, ge=1)
    """runtime threads while timing"""


class BundleOptions(_Section):
    """The bundle the device installs."""

    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    """model name; default the data file's name (digits for the built-in set), else the
    teacher's"""
    version: int = Field(1, ge=1)
    """version, strictly increasing per name"""
    expires_days: int = Field(365, ge=1)
    """days until the bundle expires"""
    labels: list[str] = Field(default_factory=list)
    """class names; default labels_file, else the data's labels array, else 0..n-1"""
    labels_file: str | None = None
    """a file of class names, one per line"""
    selftest_samples: int = Field(16, ge=1)
    """golden samples the device re-runs before it serves the model"""


class TargetOptions(_Section):
    """The device the model is for."""

    profile: str = "x86_64-generic"
    """firmware profile (edge-convert profiles lists them)"""
    require_full_offload: bool | None = None
    """refuse operators the accelerator cannot run even where the profile's compiler would
    let them fall back to the CPU; default the profile decides"""


class Recipe(_Section):
    data: DataOptions = DataOptions()
    teacher: TeacherOptions = TeacherOptions()
    model: ModelOptions = ModelOptions()
    student: StudentOptions = StudentOptions()
    distill: DistillOptions = DistillOptions()
    prune: PruneOptions = PruneOptions()
    quantize: QuantizeOptions = QuantizeOptions()
    evaluate: EvaluateOptions = EvaluateOptions()
    bundle: BundleOptions = BundleOptions()
    target: TargetOptions = TargetOptions()
    out: str = "build/convert"
    """output directory"""

    @property
    def quantize_only(self) -> bool:
        """A trained model is quantized as it is (model.*), not distilled from a teacher."""
        return self.model.given

    @model_validator(mode="after")
    def _model_or_teacher(self) -> Recipe:
        if not self.model.given:
            return self
        if self.teacher.onnx or self.teacher.torch:
            raise ValueError("give a teacher to distill (teacher.*) or a trained model to "
                             "quantize as it is (model.*), not both")
        if self.prune.method != "none":
            raise ValueError("pruning fine-tunes against a teacher; a trained model "
                             "(model.*) is quantized as it is: prune.method must be none")
        if self.data.normalize in ("standard", "minmax"):
            raise ValueError("a trained model (model.*) takes the samples as it was "
                             "trained on them: data.normalize must be auto or none")
        return self


PATH_FIELDS = {("teacher", "onnx"), ("teacher", "weights"), ("model", "onnx"),
               ("model", "weights"), ("bundle", "labels_file"), (None, "out")}
FACTORY_FIELDS = {("teacher", "torch"), ("model", "torch"), ("student", "module")}


def option_names() -> dict[str, tuple[str | None, str]]:
    """Command-line option name -> (section, field) for every recipe field."""
    names: dict[str, tuple[str | None, str]] = {"--out": (None, "out"),
                                                "--labels": ("bundle", "labels_file")}
    for section, info in Recipe.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, _Section):
            for field in model.model_fields:
                names[f"--{section}-{field}".replace("_", "-")] = (section, field)
    return names


def option_help(section: str | None, field: str) -> str:
    """`section.field`, its default and, for a fixed set, its choices (from the model)."""
    import typing  # noqa: PLC0415

    if section is None:
        info = Recipe.model_fields[field]
    else:
        model = Recipe.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        info = model.model_fields[field]
    text = f"{section + '.' if section else ''}{field}"
    if info.description:
        text += f": {' '.join(info.description.split())}"
    default = info.get_default(call_default_factory=True)
    text += f" (default: {'unset' if default is None else default})"
    args = [a for a in typing.get_args(info.annotation) if a is not type(None)]
    literal = next((a for a in [info.annotation, *args]
                    if typing.get_origin(a) is Literal), None)
    if literal is not None:
        text += f"; one of {', '.join(map(str, typing.get_args(literal)))}"
    return text.replace("%", "%%")


def parse_value(raw: str) -> Any:
    """A command-line value as TOML (numbers, booleans, lists), else as a plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for section, field in PATH_FIELDS:
        holder = data if section is None else data.get(section)
        if isinstance(holder, dict) and isinstance(holder.get(field), str):
            holder[field] = str((base / holder[field]).resolve())
    for section, field in FACTORY_FIELDS:  # `file.py:function` is a path too
        holder = data.get(section)
        spec = holder.get(field) if isinstance(holder, dict) else None
        if not (isinstance(holder, dict) and isinstance(spec, str)):
            continue
        file, _, function = spec.rpartition(":")
        if file.endswith(".py"):
            holder[field] = f"{(base / file).resolve()}:{function}"
    source = data.get("data", {}).get("source")
    if isinstance(source, str) and source != "digits":
        data["data"]["source"] = str((base / source).resolve())


def load_recipe(path: Path | None, overrides: dict[tuple[str | None, str], Any]) -> Recipe:
    """Build the recipe from a file (optional) and command-line overrides.

    Raises:
        RecipeError: unreadable file, unknown key or invalid value, naming the key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RecipeError(f"recipe {path}: cannot read: {exc}") from exc
        _resolve_paths(data, path.parent)
    cli: dict[str, Any] = {}
    for (section, field), value in overrides.items():
        if section is None:
            cli[field] = value
        else:
            cli.setdefault(section, {})[field] = value
    _resolve_paths(cli, Path.cwd())
    for key, value in cli.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        where = f"recipe {path}" if path else "options"
        raise RecipeError(f"{where}: {problems}") from exc


def _problem(err: Any) -> str:
    """One of pydantic's errors as the user's words: `section.field: what is wrong`, without
    pydantic's framing (a `<root>` location, "Value error, " before a validator's own
    message)."""
    msg = str(err["msg"])
    if err.get("type") == "value_error":
        msg = msg.removeprefix("Value error, ")
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {msg}" if where else msg
