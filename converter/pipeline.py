"""The conversion pipeline: stages over one work directory.

Each stage reads what earlier stages left in the work directory (`results.json`, model
files) and adds its own, so every stage is also a subcommand. `run` executes them all in a
temporary directory next to the output and renames it into place only when every stage
succeeded: a failure leaves no partial output behind.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.serving.runtime import open_onnx, open_tflite, sample_shapes
from agent.trust.manifest import TensorSpec
from converter import npu
from converter import prune as pr
from converter.bundle import build_bundle
from converter.context import (
    FP32_ONNX,
    INT8_ONNX,
    INT8_TFLITE,
    PRE_ONNX,
    STAGE_NAMES,
    STUDENT_FILE,
    TEACHER_LOGITS,
    Context,
    open_context,
)
from converter.distill import KDSettings, distill
from converter.errors import (
    AccuracyGateError,
    ConvertError,
    DataError,
    DistillGapError,
    RecipeError,
    TeacherError,
)
from converter.export import export_onnx
from converter.normalize import input_levels, minmax_step
from converter.onnx_torch import onnx_to_torch
from converter.quantize import OnnxQuantSettings, gate_onnx, preprocess_onnx, quantize_tflite
from converter.recipe import Recipe
from converter.report import evaluate_all, write_report
from converter.stats import (
    bootstrap,
    gap_text,
    mcnemar,
    paired_difference,
    pct_ci,
    value_ci,
    wilson,
)
from converter.students import build_student, fold_batchnorm, param_count, resolve_family
from converter.task import (
    REGRESSION_GATES,
    Quality,
    classification,
    nrmse,
    output_error,
    regression_gate,
    regression_scores,
    value_scores,
)
from converter.teacher import (
    import_factory,
    load_torch_model,
    onnx_parameters,
    run_onnx_teacher,
    run_torch_model,
    run_torch_teacher,
)

log = logging.getLogger("edge.convert")

def _need(ctx: Context, *files: str) -> None:
    for f in files:
        if not (ctx.work / f).is_file():
            raise ConvertError(f"{ctx.work / f} is missing: run the earlier stages first")


def stage_teacher(ctx: Context) -> None:
    if ctx.recipe.quantize_only:
        _stage_model(ctx)
        return
    t = ctx.recipe.teacher
    if t.onnx:
        out = run_onnx_teacher(Path(t.onnx), ctx.data.x, t.batch_size, t.output)
    elif t.torch:
        assert t.weights is not None
        out = run_torch_teacher(t.torch, Path(t.weights), ctx.data.x, t.batch_size)
    else:
        raise RecipeError("no teacher: set teacher.onnx, or teacher.torch and teacher.weights")
    if ctx.data.y is not None and out.logits.shape[1] <= int(ctx.data.y.max()):
        raise DataError(f"labels go up to {int(ctx.data.y.max())} but the teacher has "
                        f"{out.logits.shape[1]} outputs")
    gate = _teacher_gate(ctx, out.logits, out.description)
    np.save(ctx.work / TEACHER_LOGITS, out.logits)
    test = ctx.split.test
    acc = wilson(out.logits[test].argmax(1) == ctx.truth(test))
    ctx.results["teacher"] = {"kind": out.kind, "description": out.description,
                              "outputs": "probabilities" if out.probabilities else "logits",
                              "parameters": out.parameters, **_acc_fields("test_accuracy", acc),
                              "classes": int(out.logits.shape[1]),
                              "batch": batch_kind(out.fixed_batch), **gate}
    size = (f"{out.parameters:,} parameters" if out.parameters or not t.onnx else
            "no parameter tensors (sizes in operator attributes), "
            f"{Path(t.onnx).stat().st_size / 1024:.1f} KiB file")
    ctx.say(f"teacher ({'onnxruntime' if out.kind == 'onnx' else 'torch'}): "
            f"{out.description}, {size}, batch {ctx.results['teacher']['batch']}, "
            f"test accuracy {pct_ci(acc)}")


def _acc_fields(key: str, acc: dict[str, float] | None) -> dict[str, Any]:
    """An accuracy for results: its value under `key`, its 95 % Wilson interval under
    `key`_ci."""
    if acc is None:
        return {key: None}
    return {key: acc["value"], f"{key}_ci": [acc["low"], acc["high"]]}


def _stage_model(ctx: Context) -> None:
    """Quantize only: the trained model takes the teacher's and the student's places. Its
    fp32 outputs are the reference the gates compare int8 with (and the truth for a
    classifier on unlabelled data); a torch model is saved as the student, an ONNX one
    becomes the fp32 model the quantizer reads."""
    m = ctx.recipe.model
    x = ctx.x
    if m.torch:
        assert m.weights is not None
        model = load_torch_model(m.torch, Path(m.weights), "model")
        out = run_torch_model(model, x, ctx.recipe.teacher.batch_size, f"model {m.torch}")
        torch.save(model, ctx.work / STUDENT_FILE)
        params, description, kind = param_count(model), f"torch {m.torch}", "torch"
        batch = batch_kind(None)
    else:
        assert m.onnx is not None
        src = Path(m.onnx)
        try:
            loaded = open_onnx(src)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise TeacherError(f"model {src} is not a valid ONNX model: "
                               f"{str(exc).splitlines()[0][:200]}") from exc
        if len(loaded.inputs) > 1:
            _several_inputs(ctx, loaded.inputs, src)
        try:
            fixed = loaded.inputs[0].shape[0]  # runs in chunks of a fixed batch, if any
            step = fixed * max(1, 256 // fixed) if fixed else 256
            out = np.concatenate([loaded.run(x[i:i + step]) for i in range(0, len(x), step)])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise TeacherError(f"model {src} does not run on the data's samples "
                               f"{ctx.data.sample_shape}: {str(exc).splitlines()[0][:200]}"
                               ) from exc
        shutil.copyfile(src, ctx.work / FP32_ONNX)
        params = onnx_parameters(src)
        description, kind = f"ONNX {src.name}", "onnx"
        batch = batch_kind(fixed)
    out = np.asarray(out, dtype=np.float32)
    _check_outputs(ctx, out, description)
    np.save(ctx.work / TEACHER_LOGITS, out)
    figures, shown = _model_figures(ctx, out)
    common = {"kind": kind, "description": description, "parameters": params,
              "task": m.task, "quantize_only": True, "batch": batch, **figures}
    ctx.results["teacher"] = {**common, "outputs": "model outputs"}
    ctx.results["student"] = {**common, "family": "trained model"}
    ctx.say(f"model ({'onnxruntime' if kind == 'onnx' else 'torch'}): {description}, "
            f"{params:,} parameters, task {m.task}, batch {batch}, {shown}; quantized as "
            "trained (no teacher, no distillation)")


def _several_inputs(ctx: Context, inputs: list[TensorSpec], src: Path) -> None:
    """A model with several inputs takes the data's arrays of the same names and shapes
    (`open_context` put them in the model's order).

    Raises:
        TeacherError: a shape that differs, or a dimension besides the batch not fixed.
    """
    assert ctx.data.inputs is not None  # open_context refuses several inputs without them
    try:
        shapes = sample_shapes(inputs)
    except ValueError as exc:
        raise TeacherError(f"model {src.name}: {exc}") from exc
    for spec, shape, (name, given) in zip(inputs, shapes, ctx.data.inputs, strict=True):
        if shape != given:
            raise TeacherError(f"model {src.name}: input {spec.name} takes samples shaped "
                               f"{shape}; the data's {name} holds {given}")


def _check_outputs(ctx: Context, out: np.ndarray, description: str) -> None:
    """A trained model's outputs fit its task (and a regressor's its targets).

    Raises:
        TeacherError: they do not; the message gives both shapes.
    """
    m, x, targets = ctx.recipe.model, ctx.x, ctx.data.targets
    if m.task == "reconstruct" and out.shape[1:] != x.shape[1:]:
        raise TeacherError(f"model.task = 'reconstruct' needs outputs shaped like the inputs "
                           f"{tuple(x.shape[1:])}; {description} gives {tuple(out.shape[1:])}")
    if m.task == "classify" and out.ndim != 2:
        raise TeacherError(f"a classifier gives class scores shaped (N, classes); "
                           f"{description} gives {tuple(out.shape[1:])} per sample (for "
                           "another kind of output set model.task)")
    if targets is not None and out.reshape(len(out), -1).shape[1] != targets.shape[1]:
        raise TeacherError(f"{description} gives {tuple(out.shape[1:])} per sample; the "
                           f"data's y holds {targets.shape[1]} target(s) per sample")


def _model_figures(ctx: Context, out: np.ndarray) -> tuple[dict[str, Any], str]:
    """A trained model's test figures, and how the console shows them."""
    task, test, targets = ctx.recipe.model.task, ctx.split.test, ctx.data.targets
    if task == "classify":
        acc = wilson(out[test].argmax(1) == ctx.truth(test))
        return _acc_fields("test_accuracy", acc), f"test accuracy {pct_ci(acc)}"
    figures = value_scores(task, ctx.x[test], out[test], out[test], _labels(ctx, test),
                           None if targets is None else targets[test])
    if figures.get("r2") is not None:
        return figures, (f"test R² {figures['r2']:.4f}, RMSE {figures['rmse']:.4g}, "
                         f"MAE {figures['mae']:.4g} against the targets")
    auc = figures.get("anomaly_auc")
    return figures, (f"test anomaly AUC {auc:.4f}" if auc is not None else
                     f"mean reconstruction error {figures.get('reconstruction_error_mean', 0):.4g}"
                     if task == "reconstruct" else "outputs are the reference (no targets)")


def batch_kind(fixed: int | None) -> str:
    """How a model takes batches, for the report: "dynamic", or "fixed N" (fed in chunks
    of exactly N, the last padded and its padded outputs dropped)."""
    return f"fixed {fixed}" if fixed else "dynamic"


def _labels(ctx: Context, idx: np.ndarray) -> np.ndarray | None:
    return None if ctx.data.y is None else np.asarray(ctx.data.y[idx])


def _teacher_gate(ctx: Context, logits: np.ndarray, description: str) -> dict[str, Any]:
    """The teacher must beat chance on the validation labels by
    `teacher.min_margin_points`; chance is the share of the most common class there (what
    always answering it scores). A teacher below it almost always means labels in another
    order than the teacher's outputs.

    Raises:
        TeacherError: the teacher does not clear chance by the margin.
    """
    if ctx.data.y is None:  # no labels: the teacher defines the truth
        return {}
    val = ctx.split.val
    y = ctx.data.y[val]
    acc = float((logits[val].argmax(1) == y).mean())
    chance = float(np.bincount(y).max() / len(y))
    margin = ctx.recipe.teacher.min_margin_points
    if (acc - chance) * 100 < margin:
        raise TeacherError(
            f"teacher {description} scores {acc:.1%} on the validation labels, not "
            f"{margin:g} points above chance ({chance:.1%}, always the most common class): "
            "are the data's labels in the order of the teacher's outputs? (or lower "
            "--teacher-min-margin-points)")
    return {**_acc_fields("val_accuracy", wilson(logits[val].argmax(1) == y)), "chance": chance}


def _kd(ctx: Context, epochs: int, tag: str) -> KDSettings:
    d = ctx.recipe.distill
    tb = ctx.work / "tensorboard" if d.tensorboard else None
    return KDSettings(epochs=epochs, batch_size=d.batch_size, lr=d.lr,
                      weight_decay=d.weight_decay, temperature=temperature(ctx), alpha=d.alpha,
                      patience=d.patience, seed=ctx.recipe.data.seed, progress=d.progress,
                      tensorboard_dir=tb, tag=tag)


def temperature(ctx: Context) -> float:
    """distill.temperature, else 1 for a teacher that gave probabilities, 4 for logits."""
    if ctx.recipe.distill.temperature is not None:
        return ctx.recipe.distill.temperature
    return 1.0 if ctx.results.get("teacher", {}).get("outputs") == "probabilities" else 4.0


def _torch_right(ctx: Context, model: torch.nn.Module, idx: np.ndarray | None = None
                 ) -> np.ndarray:
    """Which samples of `idx` (default: the test split) the model gets right."""
    idx = ctx.split.test if idx is None else idx
    with torch.no_grad():
        pred = model(torch.from_numpy(ctx.x[idx])).argmax(1).numpy()
    return np.asarray(pred == ctx.truth(idx))


def _torch_accuracy(ctx: Context, model: torch.nn.Module) -> dict[str, float]:
    """Test accuracy with its 95 % Wilson interval."""
    acc = wilson(_torch_right(ctx, model))
    assert acc is not None  # the split is never empty
    return acc


def _family(ctx: Context) -> str:
    """The student family, `auto` resolved by the sample's rank."""
    return resolve_family(ctx.recipe.student.family, ctx.data.sample_shape)


def _student_gate(ctx: Context, student: torch.nn.Module) -> dict[str, Any]:
    """The fp32 student must come within `distill.max_gap_points` of the teacher on the
    validation split (never finer than one sample).

    Raises:
        DistillGapError: it did not; the message says what to try.
    """
    val = ctx.split.val
    student_right = _torch_right(ctx, student.eval(), val)
    teacher_right = ctx.teacher_logits[val].argmax(1) == ctx.truth(val)
    student_acc, teacher_acc = float(student_right.mean()), float(teacher_right.mean())
    gap = (teacher_acc - student_acc) * 100
    allowed = gate_points(ctx.recipe.distill.max_gap_points, len(val))
    if gap > allowed + 1e-9:
        raise DistillGapError(
            f"the fp32 student ({_family(ctx)}, {param_count(student):,} "
            f"parameters) scores {student_acc:.1%} on validation, {gap:.1f} points below the "
            f"teacher's {teacher_acc:.1%} (at most {allowed:.1f}: --distill-max-gap-points); "
            "try a bigger student (--student-hidden, --student-channels), more epochs "
            "(--distill-epochs) or another --student-family")
    return {**_acc_fields("val_accuracy", wilson(student_right)),
            "teacher_val_accuracy": teacher_acc, "gap_points": gap, "max_gap_points": allowed,
            "val_test": {**mcnemar(teacher_right, student_right), "a": "teacher",
                         "b": "student"}}


def _inputs_gate(ctx: Context) -> None:
    """Report the normalization and the int8 input levels per feature (channel) on the
    training split, with the step min-max calibration gives the input tensor; refuse inputs
    where a feature gets fewer than min(its distinct values, quantize.min_input_levels)
    levels: int8 would erase it. For a trained model (quantize only) it is a warning: the
    model may normalize in its own graph, and the int8 gate decides.

    Raises:
        DataError: a starved feature when distilling; the message names them and what
            to try.
    """
    norm, train = ctx.norm, ctx.x[ctx.split.train]
    step, zero = minmax_step(ctx.calib())
    lv = input_levels(train, step, zero, ctx.recipe.quantize.min_input_levels)
    ctx.results["inputs"] = {"normalize": norm.method, "axis": norm.axis,
                             "reason": norm.reason, "int8_step": step, **lv.as_dict()}
    ctx.say(f"inputs: normalize {norm.method}"
            f"{f' per {norm.axis}' if norm.method != 'none' else ''} ({norm.reason}); "
            f"int8 levels per {lv.unit}: min {int(lv.levels.min())}, median "
            f"{float(np.median(lv.levels)):g}")
    if lv.min_levels and (starved := lv.starved):
        shown = ", ".join(f"{i} ({lv.levels[i]} of {lv.distinct[i]} values)"
                          for i in starved[:8])
        what = (f"int8 input quantization (step {step:.3g}) leaves {len(starved)} of "
                f"{len(lv.levels)} {lv.unit}s fewer than {lv.min_levels} levels: {shown}"
                f"{' ...' if len(starved) > 8 else ''}")
        if ctx.recipe.quantize_only:  # it may normalize inside its graph: the gate decides
            ctx.results["inputs"]["warning"] = what
            ctx.say(f"inputs: warning: {what}; a model that normalizes its inputs in its own "
                    "graph quantizes well even so: the int8 gate decides")
            return
        raise DataError(f"{what}; normalize the inputs (--data-normalize standard or minmax) "
                        "or lower --quantize-min-input-levels")


def stage_distill(ctx: Context) -> None:
    _need(ctx, TEACHER_LOGITS)
    _inputs_gate(ctx)
    if ctx.recipe.quantize_only:
        ctx.say("distill: skipped (a trained model is quantized as it is)")
        return
    torch.manual_seed(ctx.recipe.data.seed)
    student = build_student(ctx.recipe.student, ctx.data.sample_shape, ctx.classes)
    hist = distill(student, ctx.x, ctx.teacher_logits, ctx.data.y, ctx.split.train,
                   ctx.split.val, _kd(ctx, ctx.recipe.distill.epochs, "distill"))
    gap = _student_gate(ctx, student)
    torch.save(student, ctx.work / STUDENT_FILE)
    acc = _torch_accuracy(ctx, student)
    ctx.results["student"] = {"family": _family(ctx),
                              "parameters": param_count(student), "history": hist.as_dict(),
                              **gap, **_acc_fields("test_accuracy", acc)}
    ctx.results["student"]["temperature"] = temperature(ctx)
    ctx.say(f"student (torch fp32): {_family(ctx)}, {param_count(student):,} parameters, "
            f"KD temperature {temperature(ctx):g}, "
            f"{len(hist.epochs)} epochs (best {hist.best_epoch}), test accuracy {pct_ci(acc)}; "
            f"validation gap to the teacher {gap['gap_points']:.2f} points "
            f"({gap_text(gap['val_test'])})")


def load_student(ctx: Context) -> torch.nn.Module:
    _need(ctx, STUDENT_FILE)
    # Its classes must be importable to unpickle the student.
    if ctx.recipe.student.module:
        import_factory(ctx.recipe.student.module, "student module")
    if ctx.recipe.model.torch:
        import_factory(ctx.recipe.model.torch, "model factory")
    model = torch.load(ctx.work / STUDENT_FILE, weights_only=False)
    assert isinstance(model, torch.nn.Module)
    return model.eval()


def stage_prune(ctx: Context) -> None:
    p = ctx.recipe.prune
    if p.method == "none":
        ctx.results["prune"] = {"method": "none"}
        return
    student = load_student(ctx)
    before = param_count(student)
    acc_before = _torch_accuracy(ctx, student)
    if p.method == "unstructured":
        pr.apply_unstructured(student, p.sparsity)
    else:
        example = torch.from_numpy(ctx.x[:1])
        student = pr.apply_structured(student, p.sparsity, example)
    acc_pruned = _torch_accuracy(ctx, student)
    if p.finetune_epochs:
        distill(student, ctx.x, ctx.teacher_logits, ctx.data.y, ctx.split.train,
                ctx.split.val, _kd(ctx, p.finetune_epochs, "prune_finetune"))
    if p.method == "unstructured":
        pr.finalize_unstructured(student)
    res = pr.summary(p.method, before, student)
    acc_after = _torch_accuracy(ctx, student)
    torch.save(student, ctx.work / STUDENT_FILE)
    ctx.results["prune"] = {**res.__dict__, "target_sparsity": p.sparsity,
                            **_acc_fields("test_accuracy_before", acc_before),
                            **_acc_fields("test_accuracy_pruned", acc_pruned),
                            **_acc_fields("test_accuracy_finetuned", acc_after)}
    ctx.results.setdefault("student", {})["parameters"] = res.params_after
    ctx.results["student"].update(_acc_fields("test_accuracy", acc_after))
    ctx.say(f"prune ({p.method}): parameters {before:,} -> {res.params_after:,} "
            f"(non-zero {res.nonzero_after:,}, weight sparsity {res.sparsity:.0%}), "
            f"test accuracy {pct_ci(acc_before)} -> {pct_ci(acc_pruned)} -> "
            f"{pct_ci(acc_after)} fine-tuned")


def stage_export(ctx: Context) -> None:
    if ctx.recipe.model.onnx:
        _need(ctx, FP32_ONNX)
        ctx.results["export"] = {"file": FP32_ONNX, "source": ctx.recipe.model.onnx}
        ctx.say(f"export: {FP32_ONNX} is the trained model as given")
        return
    student = fold_batchnorm(load_student(ctx))
    torch.save(student, ctx.work / STUDENT_FILE)
    res = export_onnx(student, ctx.x[ctx.split.val[:64]], ctx.work / FP32_ONNX)
    ctx.results["export"] = {"file": FP32_ONNX, "max_abs_diff_vs_torch": res.max_abs_diff}
    ctx.say(f"export: {FP32_ONNX} (max |onnx - torch| = {res.max_abs_diff:.2e})")


def stage_quantize(ctx: Context) -> None:
    _need(ctx, FP32_ONNX)
    q, prof = ctx.recipe.quantize, ctx.profile
    per_channel = q.per_channel and prof.quantization.per_channel
    calib = ctx.calib()
    val = ctx.split.val
    x_val = ctx.x[val]
    quality = _quality(ctx, x_val)
    out: dict[str, Any] = {"per_channel": per_channel, "calibration_samples": len(calib),
                           "gate": quality.name, "val_samples": len(val),
                           **_gate_limits(ctx)}
    if "onnx" in q.formats:
        preprocess_onnx(ctx.work / FP32_ONNX, ctx.work / PRE_ONNX)
        base = OnnxQuantSettings(per_channel, prof.quantization.activation_symmetric,
                                 q.calibration)
        gate = gate_onnx(ctx.work / PRE_ONNX, ctx.work / INT8_ONNX, calib, x_val, quality,
                         base, mitigate=q.mitigate,
                         float_fallback_allowed=prof.quantization.float_fallback_allowed,
                         max_float_layers=q.max_float_layers)
        test = _val_test(ctx, open_onnx(ctx.work / FP32_ONNX).run(x_val),
                         open_onnx(ctx.work / INT8_ONNX).run(x_val))
        _gate(ctx, quality, "ONNX", gate.fp32_val, gate.int8_val, gate.steps, test)
        out["onnx"] = {"calibration": gate.settings.calibration,
                       "float_layers": list(gate.settings.exclude), "steps": gate.steps,
                       "sensitivity": gate.sensitivity, "val_fp32": gate.fp32_val,
                       "val_int8": gate.int8_val, "gate_passed": gate.passed,
                       "val_test": test}
        ctx.say(f"quantize (onnxruntime): {INT8_ONNX} ({gate.settings.calibration} "
                f"calibration, "
                f"{'per-channel' if per_channel else 'per-tensor'}, val {quality.name} "
                f"{quality.show(gate.fp32_val)} fp32 -> {quality.show(gate.int8_val)} int8; "
                f"{gap_text(test)})")
    if "tflite" in q.formats:
        out["tflite"] = _quantize_tflite(ctx, calib, x_val, quality, per_channel)
    ctx.results["quantize"] = out


def _quality(ctx: Context, x_val: np.ndarray) -> Quality:
    """The int8 gate's score for this task on the validation split."""
    m = ctx.recipe.model
    if m.task == "classify":
        tol = gate_points(ctx.recipe.quantize.tolerance_points, len(x_val))
        return classification(ctx.truth(ctx.split.val), tol)
    if m.gate != "output_error":
        assert ctx.data.targets is not None  # open_context refuses a metric gate without y
        return regression_gate(ctx.data.targets[ctx.split.val], m.gate, m.max_metric_change)
    reference = open_onnx(ctx.work / FP32_ONNX).run(x_val)
    return output_error(reference, m.max_output_error)


def _gate_limits(ctx: Context) -> dict[str, Any]:
    n = len(ctx.split.val)
    m = ctx.recipe.model
    if m.task != "classify" and m.gate != "output_error":
        return {"gate_metric": m.gate, "max_metric_change": m.max_metric_change}
    if m.task != "classify":
        return {"max_output_error": m.max_output_error}
    return {"tolerance_points": gate_points(ctx.recipe.quantize.tolerance_points, n),
            "val_resolution_points": 100 / n}


def gate_points(points: float, samples: int) -> float:
    """A gate's tolerance in accuracy points, never finer than one validation sample (on
    178 samples one sample is 0.56 points: a finer gate passes or fails on noise)."""
    return max(points, 100 / samples)


def _gate(ctx: Context, quality: Quality, what: str, fp32: float, int8: float,
          steps: list[str], test: dict[str, Any] | None) -> None:
    """Refuse an int8 model whose validation figure misses the gate. The gate decides on
    the point estimates; the message adds the paired test on the same samples, so that a
    user can tell a real loss from a few samples' noise on a small validation split."""
    if not quality.passes(fp32, int8):
        raise AccuracyGateError(
            f"{what} int8 {quality.name} {quality.show(int8)} against fp32 "
            f"{quality.show(fp32)} on {len(ctx.split.val)} validation samples "
            f"({gap_text(test)}) fails the gate after: {'; '.join(steps)}; "
            f"{_gate_advice(ctx, what)}", fp32_score=fp32, int8_score=int8)


def _gate_advice(ctx: Context, what: str) -> str:
    """What to try when int8 fails its gate: options this run's mode accepts."""
    m = ctx.recipe.model
    limit = ("--quantize-tolerance-points" if m.task == "classify" else
             "--model-max-output-error" if m.gate == "output_error" else
             "--model-max-metric-change")
    tips = [f"allow more ({limit})", "calibrate on more samples (--data-calibration-samples)"]
    if what == "TFLite" and "onnx" in ctx.recipe.quantize.formats:
        tips.append("build int8 ONNX only (--quantize-formats '[\"onnx\"]')")
    warning = (ctx.results.get("inputs") or {}).get("warning")
    if warning and ctx.recipe.quantize_only:
        tips.append("normalize the inputs inside the model (int8 input quantization erases "
                    "features: see the inputs warning)")
    elif not ctx.recipe.quantize_only and ctx.norm.method == "none":
        tips.append("normalize the inputs (--data-normalize standard or minmax)")
    return "try: " + "; ".join(tips)


def _quantize_tflite(ctx: Context, calib: np.ndarray, x_val: np.ndarray, quality: Quality,
                     per_channel: bool) -> dict[str, Any]:
    if ctx.recipe.model.onnx:  # a model given as ONNX: onnx2torch into the same PT2E path
        student, batch = onnx_to_torch(ctx.work / FP32_ONNX, ctx.work, x_val)
        route = "onnx2torch -> PT2E"
    else:
        student, route, batch = load_student(ctx), "PT2E", 1
    shapes = None if ctx.data.inputs is None else [s for _, s in ctx.data.inputs]
    res = quantize_tflite(student, calib, ctx.work / INT8_TFLITE, per_channel=per_channel,
                          batch=batch, shapes=shapes)
    fp32_out = open_onnx(ctx.work / FP32_ONNX).run(x_val)
    int8_out = open_tflite(ctx.work / INT8_TFLITE).run(x_val)
    fp32, int8 = quality.score(fp32_out), quality.score(int8_out)
    steps = [f"{route} {'per-channel' if per_channel else 'per-tensor'}, histogram observers: "
             f"int8 {quality.show(int8)} vs fp32 {quality.show(fp32)}"]
    if not quality.passes(fp32, int8) and ctx.recipe.quantize.mitigate:
        all_train = ctx.x[ctx.split.train]
        res = quantize_tflite(student, all_train, ctx.work / INT8_TFLITE,
                              per_channel=per_channel, batch=batch, shapes=shapes)
        int8_out = open_tflite(ctx.work / INT8_TFLITE).run(x_val)
        int8 = quality.score(int8_out)
        steps.append(f"calibrated on all {len(all_train)} training samples: int8 "
                     f"{quality.show(int8)}")
    test = _val_test(ctx, fp32_out, int8_out)
    _gate(ctx, quality, "TFLite", fp32, int8, steps, test)
    loaded = open_tflite(ctx.work / INT8_TFLITE)
    ops = npu.tflite_ops(ctx.work / INT8_TFLITE)
    check = npu.check_target(ctx.profile, ops, res.io_dtype, loaded.inputs[0].shape,
                             require_full_offload=ctx.recipe.target.require_full_offload)
    ctx.say(f"quantize (LiteRT, {route}): {INT8_TFLITE} (I/O {res.io_dtype}"
            f"{f', batch fixed {batch}' if batch > 1 else ''}, val {quality.name} "
            f"{quality.show(fp32)} fp32 (onnxruntime) -> {quality.show(int8)} int8 "
            f"({gap_text(test)}), ops {', '.join(check.operators)})")
    return {"io_dtype": res.io_dtype, "route": route,
            "batch": batch_kind(batch if batch > 1 else None), "steps": steps,
            "val_fp32": fp32, "val_int8": int8, "val_test": test, "operators": ops,
            "unsupported": check.unsupported, "notes": check.notes}


def _val_test(ctx: Context, fp32_out: np.ndarray, int8_out: np.ndarray
              ) -> dict[str, Any] | None:
    """The int8 gate's figures on the validation split as a paired test: McNemar's for a
    classifier; for a gate on MAE, RMSE or R², the paired bootstrap interval of int8's
    change; for the output-error gate, the bootstrap interval of int8's NRMSE."""
    val, m = ctx.split.val, ctx.recipe.model
    if m.task == "classify":
        truth = ctx.truth(val)
        return {**mcnemar(fp32_out.argmax(1) == truth, int8_out.argmax(1) == truth),
                "a": "fp32", "b": "int8"}
    if m.gate != "output_error" and ctx.data.targets is not None:
        t, key = ctx.data.targets[val], m.gate
        return paired_difference(lambda i: regression_scores(int8_out[i], t[i])[key]
                                 - regression_scores(fp32_out[i], t[i])[key], len(val),
                                 f"{REGRESSION_GATES[key]} int8 - fp32")
    ci = bootstrap(lambda i: nrmse(int8_out[i], fp32_out[i]), len(val))
    return None if ci is None else {"test": "interval", "low": ci[0], "high": ci[1]}


def stage_compile(ctx: Context) -> None:
    acc = ctx.profile.accelerator
    out: dict[str, Any] = {"compiler": acc.compiler if acc else "none",
                           "external_steps": npu.external_steps(ctx.profile)}
    if acc is not None and acc.compiler == "vela":
        _need(ctx, INT8_TFLITE)
        res = npu.compile_vela(ctx.work / INT8_TFLITE, ctx.work / "vela", acc.compiler_args)
        out.update({"model": f"vela/{res.path.name}", "summary": res.summary,
                    "npu_ops": res.npu_ops, "cpu_fallback_ops": res.cpu_ops})
        ctx.say(f"compile: Vela {res.summary.get('accelerator')}: SRAM "
                f"{res.summary.get('sram_kib', 0):.1f} KiB, flash "
                f"{res.summary.get('flash_kib', 0):.1f} KiB, {res.summary.get('cycles_total')} "
                f"cycles/inference, CPU fallback: {', '.join(res.cpu_ops) or 'none'}")
    for step in out["external_steps"]:
        ctx.say(f"compile: external step remains: {step}")
    ctx.results["compile"] = out


def stage_evaluate(ctx: Context) -> None:
    ctx.results["evaluate"] = evaluate_all(ctx)
    ctx.say("evaluate (test split): " + ", ".join(
        f"{m['name']} ({m['runtime']}) {_figure(m)}"
        for m in ctx.results["evaluate"]["models"]
        if m.get("accuracy") is not None or m.get("output_error") is not None))
    if gaps := _gaps(ctx.results["evaluate"]["checks"]):
        ctx.say(f"evaluate (test split, paired): {gaps}")


def _figure(row: dict[str, Any]) -> str:
    """A model's headline test figure with its 95 % interval: accuracy, or output error
    (and R² or the anomaly AUC)."""
    if row.get("accuracy") is not None:
        ci = row.get("accuracy_ci")
        return pct_ci({"value": row["accuracy"], "low": ci[0], "high": ci[1]} if ci else None)
    err = f"output error {value_ci(row['output_error'], row.get('output_error_ci'), '.4f')}"
    if row.get("r2") is not None:
        return (f"R² {value_ci(row['r2'], row.get('r2_ci'), '.4f')}, RMSE "
                f"{value_ci(row['rmse'], row.get('rmse_ci'))}, {err}")
    auc = row.get("anomaly_auc")
    return err + (f", anomaly AUC {value_ci(auc, row.get('anomaly_auc_ci'), '.4f')}"
                  if auc is not None else "")


def _gaps(checks: dict[str, Any]) -> str:
    """The paired tests of the evaluation's gaps, for the console."""
    named = [("student vs teacher", "student_vs_teacher_test")] + [
        (f"int8 {rt} vs fp32", f"int8_{rt}_vs_fp32_test") for rt in ("onnx", "tflite")]
    return "; ".join(f"{label}: {gap_text(checks[key])}" for label, key in named
                     if key in checks)


def stage_report(ctx: Context) -> None:
    write_report(ctx)
    ctx.say("report: report.md, report.json, report.png")


def stage_bundle(ctx: Context) -> None:
    manifest = build_bundle(ctx)
    ctx.results["bundle"] = {"dir": "bundle", "runtime": manifest.runtime,
                             "model_file": manifest.model_file, "version": manifest.version}
    ctx.say(f"bundle: bundle/ ({manifest.name} v{manifest.version}, "
            f"{manifest.runtime}, {manifest.model_file})")


STAGES: dict[str, Callable[[Context], None]] = {
    "teacher": stage_teacher, "distill": stage_distill, "prune": stage_prune,
    "export": stage_export, "quantize": stage_quantize, "compile": stage_compile,
    "evaluate": stage_evaluate, "report": stage_report, "bundle": stage_bundle,
}
assert tuple(STAGES) == STAGE_NAMES


def run_stage(name: str, ctx: Context) -> None:
    t0 = time.perf_counter()
    STAGES[name](ctx)
    ctx.results.setdefault("timings_s", {})[name] = round(time.perf_counter() - t0, 3)
    ctx.save()


def run(recipe: Recipe, say: Callable[[str], None] = print, *, force: bool = False,
        check_stop: Callable[[], None] = lambda: None) -> Path:
    """Run every stage into a temporary directory, then move it to `recipe.out`.
    `check_stop` runs before each stage and before the move, and raises to stop (the CLI:
    a SIGTERM whose exception a library caught mid-stage).

    Raises:
        ConvertError: any stage failed; nothing is left at `recipe.out`.
    """
    out = Path(recipe.out)
    if out.exists() and not force:
        raise RecipeError(f"output {out} exists; remove it or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The name first, the directory inside the `try`: a signal's exception raised between
    # `mkdtemp` making the directory and the `try` (a few bytecodes, but a loaded machine
    # can stop there) left it behind, seen once in CI. `mkdir` refuses a name that exists,
    # so what the cleanup removes is this run's.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(8)}"
    t0 = time.perf_counter()
    try:
        tmp.mkdir(mode=0o700)
        ctx = open_context(recipe, tmp, say)
        ctx.results["recipe"] = recipe.model_dump(mode="json")
        for name in STAGES:
            check_stop()
            run_stage(name, ctx)
        ctx.results["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
        ctx.save()
        check_stop()
        _replace_dir(tmp, out)
    except FileExistsError as exc:  # from `tmp.mkdir`, 2**-64: not ours to remove
        if exc.filename not in (tmp, str(tmp)):  # os.mkdir names it as it was given
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
