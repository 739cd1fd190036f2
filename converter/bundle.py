"""Assemble the bundle directory the device installs (docs/architecture.md, Bundle).

The model for the profile's first runtime preference goes in (the Vela-compiled file for
Ethos-U targets), with `selftest.npz` (golden inputs and the outputs this model gave for
them here) and reference statistics of inputs and outputs on the calibration data, which the
device compares live traffic with to detect drift. The manifest is unsigned here; signing
adds `signatures.json` without touching anything else.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__ as agent_version
from agent.serving.runtime import LoadedModel, open_onnx, open_tflite
from agent.serving.scheduler import reconstruction_error
from agent.trust.bundle import file_entry
from agent.trust.manifest import (
    MANIFEST_FILE,
    SELFTEST_FILE,
    Histogram,
    InputReference,
    Manifest,
    OutputReference,
    ReferenceStats,
    ResourceEstimate,
    ScoreReference,
    SelfTest,
    TensorSpec,
    canonical_json,
)
from converter.context import INT8_ONNX, INT8_TFLITE, Context
from converter.errors import ConvertError
from converter.normalize import layout_for

INPUT_BINS = 20
CONFIDENCE_BINS = 10
MAX_FEATURE_STATS = 4096
SCORE_BINS = 20
SCORE_SAMPLES = 4096


def _choose(ctx: Context) -> tuple[str, Path, Path]:
    """(runtime, file to ship, file to run here for golden outputs)."""
    vela = ctx.results.get("compile", {}).get("model")
    for runtime in ctx.profile.runtime.preference:
        if runtime == "tflite" and (ctx.work / INT8_TFLITE).is_file():
            ship = ctx.work / vela if vela else ctx.work / INT8_TFLITE
            return "tflite", ship, ctx.work / INT8_TFLITE
        if runtime == "onnx" and (ctx.work / INT8_ONNX).is_file():
            return "onnx", ctx.work / INT8_ONNX, ctx.work / INT8_ONNX
    raise ConvertError(f"no model for {ctx.profile.name}'s runtimes "
                       f"{ctx.profile.runtime.preference}; check quantize.formats")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def reference_stats(x: np.ndarray, out: np.ndarray, task: str = "classify",
                    score: ScoreReference | None = None) -> ReferenceStats:
    """Input and output statistics of the calibration data, for drift detection: class
    distribution and confidence for a classifier, the anomaly score's reference for an
    autoencoder, inputs only for regression."""
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(x, bins=INPUT_BINS, range=(lo, hi))
    flat = x.reshape(len(x), -1)
    if flat.shape[1] > MAX_FEATURE_STATS and x.ndim >= 3:
        flat = x.reshape(len(x), x.shape[1], -1).mean(axis=2)  # per channel
    output = OutputReference(score=score)
    if task == "classify":
        probs = _softmax(out)
        conf_counts, conf_edges = np.histogram(probs.max(axis=1), bins=CONFIDENCE_BINS,
                                               range=(0.0, 1.0))
        classes = np.bincount(probs.argmax(axis=1), minlength=out.shape[1])
        output = OutputReference(
            class_fractions=[float(c) / len(x) for c in classes],
            confidence=Histogram(bin_edges=[float(e) for e in conf_edges],
                                 fractions=[float(c) / len(x) for c in conf_counts]))
    return ReferenceStats(
        samples=len(x),
        input=InputReference(
            histogram=Histogram(bin_edges=[float(e) for e in edges],
                                fractions=[float(c) / counts.sum() for c in counts]),
            mean=float(x.mean()), std=float(x.std()),
            feature_mean=[float(v) for v in flat.mean(axis=0)],
            feature_std=[float(v) for v in flat.std(axis=0)]),
        output=output,
    )


def score_reference(ctx: Context, loaded: LoadedModel) -> ScoreReference:
    """The autoencoder's anomaly score (reconstruction error) on normal training samples
    (label 0 where the data has labels), run by the model the device gets: the threshold
    is its `model.anomaly_quantile`, the histogram spans twice the threshold (higher scores
    fall in the last bin)."""
    train = ctx.split.train
    if ctx.data.y is not None:
        train = train[ctx.data.y[train] == 0]
    x = ctx.x[train[:SCORE_SAMPLES]]
    err = reconstruction_error(x, loaded.run(x))
    q = ctx.recipe.model.anomaly_quantile
    threshold = max(float(np.quantile(err, q)), 1e-12)
    counts, edges = np.histogram(np.clip(err, 0, 2 * threshold), bins=SCORE_BINS,
                                 range=(0.0, 2 * threshold))
    return ScoreReference(histogram=Histogram(bin_edges=[float(e) for e in edges],
                                              fractions=[float(c) / len(x) for c in counts]),
                          threshold=threshold, quantile=q)


def build_bundle(ctx: Context) -> Manifest:
    """Write `<work>/bundle/` and return its manifest."""
    runtime, ship, runnable = _choose(ctx)
    bundle = ctx.work / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.mkdir()
    model_name = f"model{ship.suffix}" if "vela" not in ship.name else "model_vela.tflite"
    shutil.copyfile(ship, bundle / model_name)
    loaded: LoadedModel = (open_tflite(runnable) if runtime == "tflite" else open_onnx(runnable))
    opts = ctx.recipe.bundle
    # Golden inputs are raw samples: the device normalizes them as it does live inputs.
    golden_idx = ctx.split.val[:opts.selftest_samples]
    golden = ctx.data.x[golden_idx]
    expected = loaded.run(ctx.x[golden_idx])
    np.savez(bundle / SELFTEST_FILE, inputs=golden, outputs=expected)
    calib = ctx.calib()
    task = ctx.recipe.model.task
    score = score_reference(ctx, loaded) if task == "reconstruct" else None
    ref = reference_stats(calib, loaded.run(calib), task, score)
    span = float(expected.max() - expected.min()) or 1.0
    labels = class_labels(ctx, int(expected.shape[1])) if task == "classify" else []
    manifest = Manifest(
        name=bundle_name(ctx), version=opts.version, created=(now := datetime.now(UTC)),
        expires=now + timedelta(days=opts.expires_days), min_agent_version=agent_version,
        profiles=[ctx.profile.name], runtime=runtime, task=task, model_file=model_name,
        files={model_name: file_entry(bundle / model_name),
               SELFTEST_FILE: file_entry(bundle / SELFTEST_FILE)},
        inputs=_input_names(ctx, loaded.inputs), outputs=loaded.outputs, labels=labels,
        preprocessing=ctx.norm.preprocessing(layout_for(ctx.data.sample_shape),
                                             len(ctx.split.train)),
        reference=ref,
        resources=_resources(ctx, bundle / model_name),
        # 2 % of the golden outputs' range is about five int8 steps: room for rounding
        # differences between CPUs, far below a wrong model's error.
        selftest=SelfTest(atol=0.02 * span,
                          min_top1_agreement=0.9 if task == "classify" else 0.0),
        provenance=_provenance(ctx),
    )
    (bundle / MANIFEST_FILE).write_bytes(canonical_json(manifest))
    return manifest


def _input_names(ctx: Context, inputs: list[TensorSpec]) -> list[TensorSpec]:
    """The inputs as clients name them: for several, the model's own names (TFLite's
    converter renames them `serving_default_args_0`, `…_1`, …), in the packed order."""
    if ctx.data.inputs is None:
        return inputs
    return [spec.model_copy(update={"name": name})
            for spec, (name, _) in zip(inputs, ctx.data.inputs, strict=True)]


def bundle_name(ctx: Context) -> str:
    """bundle.name, else the data file's name (`digits` for the built-in set), else the
    teacher file's, made to fit the manifest's name pattern."""
    if ctx.recipe.bundle.name:
        return ctx.recipe.bundle.name
    t, m = ctx.recipe.teacher, ctx.recipe.model
    source = ctx.data.source
    stem = source if source == "digits" else Path(source).stem
    if not stem:
        stem = Path(t.onnx or t.weights or m.onnx or m.weights or "model").stem
    name = re.sub(r"[^a-z0-9_.-]+", "-", stem.lower()).strip("-._")
    return name or "model"


def class_labels(ctx: Context, classes: int) -> list[str]:
    """bundle.labels, else bundle.labels_file (one per line), else the data's `labels`,
    else "0".."n-1".

    Raises:
        ConvertError: the labels file cannot be read, or the count is not the model's.
    """
    opts = ctx.recipe.bundle
    labels, where = opts.labels, "bundle.labels"
    if not labels and opts.labels_file:
        where = f"labels file {opts.labels_file}"
        try:
            text = Path(opts.labels_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConvertError(f"{where} cannot be read: {exc}") from exc
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels and ctx.data.labels is not None:
        labels, where = ctx.data.labels, f"the data's labels array ({ctx.data.source})"
    if not labels:
        return [str(i) for i in range(classes)]
    if len(labels) != classes:
        raise ConvertError(f"{where} has {len(labels)} class names; the model has "
                           f"{classes} outputs")
    return list(labels)


def _resources(ctx: Context, model: Path) -> ResourceEstimate:
    mem = ctx.results["evaluate"]["memory_int8"]
    size = model.stat().st_size
    return ResourceEstimate(model_bytes=size, arena_bytes=mem["arena_bytes"],
                            peak_memory_bytes=size + mem["arena_bytes"])


def _provenance(ctx: Context) -> dict[str, Any]:
    ev = ctx.results["evaluate"]
    acc = {f"{m['name']} ({m['runtime']})": m.get("accuracy") for m in ev["models"]}
    return {"tool": f"edge-convert {agent_version}", "profile": ctx.profile.name,
            "teacher": ctx.results["teacher"]["description"],
            "student": ctx.results["student"]["family"], "test_accuracy": acc,
            "recipe_sha256": hashlib.sha256(
                ctx.recipe.model_dump_json().encode()).hexdigest()}
