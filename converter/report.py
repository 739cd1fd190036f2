"""The report: every figure measured on the test split, as JSON, Markdown and a PNG plot.

`evaluate_all` measures; `write_report` renders. The Markdown says in words what the numbers
mean for the target (what falls back to the CPU, which external step remains) so nobody has
to read the JSON to decide whether to ship.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from agent.serving.runtime import LoadedModel, open_onnx, open_tflite
from agent.serving.scheduler import reconstruction_error
from converter import evaluate as ev
from converter.context import FP32_ONNX, INT8_ONNX, INT8_TFLITE, Context
from converter.stats import (
    bootstrap,
    gap_text,
    mcnemar,
    paired_difference,
    pct_ci,
    value_ci,
    wilson,
)
from converter.task import nrmse, regression_scores, roc_auc, value_scores
from converter.teacher import OnnxTeacher


def _role(ctx: Context) -> str:
    """What the report calls the converted network: the distilled student, or the trained
    model quantized as it is."""
    return "model" if ctx.recipe.quantize_only else "student"


def _scores(ctx: Context, out: np.ndarray, teacher_pred: np.ndarray) -> dict[str, Any]:
    """Test-split figures of some outputs with their 95 % intervals: accuracy and agreement
    for a classifier (Wilson), output error against the fp32 model (and MAE, RMSE, R²
    against the targets, or the anomaly AUC) otherwise (bootstrap)."""
    test = ctx.split.test
    task = ctx.recipe.model.task
    if task == "classify":
        truth = ctx.truth(test)
        row: dict[str, Any] = ev.scores(out, truth, teacher_pred)
        pred = out.argmax(1)
        row["accuracy_ci"] = _interval(None if truth is None else wilson(pred == truth))
        row["teacher_agreement_ci"] = _interval(wilson(pred == teacher_pred))
        return row
    labels = None if ctx.data.y is None else ctx.data.y[test]
    targets = None if ctx.data.targets is None else ctx.data.targets[test]
    x, reference = ctx.x[test], ctx.teacher_logits[test]
    row = dict(value_scores(task, x, out, reference, labels, targets))
    n = len(test)
    row["output_error_ci"] = bootstrap(lambda i: nrmse(out[i], reference[i]), n)
    if row.get("r2") is not None and targets is not None:
        for key in ("mae", "rmse", "r2"):
            row[f"{key}_ci"] = _bootstrap_regression(out, targets, key)
    if row.get("anomaly_auc") is not None and labels is not None:
        err = reconstruction_error(np.asarray(x, np.float32), np.asarray(out, np.float32))
        row["anomaly_auc_ci"] = bootstrap(lambda i: roc_auc(err[i], labels[i] != 0), n)
    return row


def _bootstrap_regression(out: np.ndarray, targets: np.ndarray, key: str
                          ) -> tuple[float, float] | None:
    return bootstrap(lambda i: regression_scores(out[i], targets[i])[key], len(targets))


def _interval(p: dict[str, float] | None) -> list[float] | None:
    return None if p is None else [p["low"], p["high"]]


def _model_row(ctx: Context, name: str, runtime: str, path: Path, loaded: LoadedModel | None,
               params: int, teacher_pred: np.ndarray, outs: dict[tuple[str, str], np.ndarray]
               ) -> dict[str, Any]:
    test = ctx.split.test
    row: dict[str, Any] = {"name": name, "runtime": runtime, "file": path.name,
                           "parameters": params, **ev.sizes(path)}
    if loaded is not None:
        out = loaded.run(ctx.x[test])
        outs[(name, runtime)] = out
        row.update(_scores(ctx, out, teacher_pred))
        row["latency"] = ev.latency(loaded, ctx.x[test], ctx.recipe.evaluate.latency_runs)
    return row


def evaluate_all(ctx: Context) -> dict[str, Any]:
    threads = ctx.recipe.evaluate.threads
    test = ctx.split.test
    logits = ctx.teacher_logits[test]
    teacher_pred = logits.argmax(1) if logits.ndim == 2 else logits  # a classifier's, or as is
    t = ctx.results["teacher"]
    models = []
    outs: dict[tuple[str, str], np.ndarray] = {}  # each run model's test outputs
    who = _role(ctx)
    if not ctx.recipe.quantize_only:
        teacher_file = Path(ctx.recipe.teacher.onnx or ctx.recipe.teacher.weights or "")
        # Scores from the cached logits (the output the teacher stage chose); an ONNX teacher
        # is timed running that output only.
        teacher_row = _model_row(ctx, "teacher", t["kind"], teacher_file, None,
                                 t["parameters"], teacher_pred, outs)
        teacher_row.update(_scores(ctx, ctx.teacher_logits[test], teacher_pred))
        outs[("teacher", t["kind"])] = ctx.teacher_logits[test]
        if t["kind"] == "onnx":
            timed = OnnxTeacher(teacher_file, threads=threads).select(ctx.recipe.teacher.output)
            teacher_row["latency"] = ev.latency(timed, ctx.data.x[test],  # type: ignore[arg-type]
                                                ctx.recipe.evaluate.latency_runs)
        models.append(teacher_row)
    fp32 = ev.onnx_profile(ctx.work / FP32_ONNX)
    student_params = fp32["parameters"]
    models.append(_model_row(ctx, f"{who} fp32", "onnx", ctx.work / FP32_ONNX,
                             open_onnx(ctx.work / FP32_ONNX, threads=threads), student_params,
                             teacher_pred, outs))
    if (ctx.work / INT8_ONNX).is_file():
        models.append(_model_row(ctx, f"{who} int8", "onnx", ctx.work / INT8_ONNX,
                                 open_onnx(ctx.work / INT8_ONNX, threads=threads),
                                 student_params, teacher_pred, outs))
    if (ctx.work / INT8_TFLITE).is_file():
        models.append(_model_row(ctx, f"{who} int8", "tflite", ctx.work / INT8_TFLITE,
                                 open_tflite(ctx.work / INT8_TFLITE, threads=threads),
                                 student_params, teacher_pred, outs))
    vela = ctx.results.get("compile", {}).get("model")
    if vela:
        models.append(_model_row(ctx, f"{who} int8 (Vela)", "tflite+ethos-u", ctx.work / vela,
                                 None, student_params, teacher_pred, outs))
    teacher_macs = (ev.onnx_profile(Path(ctx.recipe.teacher.onnx))["macs"]
                    if t["kind"] == "onnx" and ctx.recipe.teacher.onnx else None)
    return {
        "task": ctx.recipe.model.task,
        "role": who,
        "test_samples": len(test),
        "labels": "the dataset's labels" if ctx.data.y is not None
        else "the teacher's predictions (the data has no labels)",
        "threads": threads,
        "models": models,
        "student_macs": fp32["macs"],
        "teacher_macs": teacher_macs,
        "onnx_operators": fp32["operators"],
        "memory_fp32": ev.memory_estimate(student_params * 4, fp32["peak_activation_elements"], 4),
        "memory_int8": ev.memory_estimate(student_params, fp32["peak_activation_elements"], 1),
        "checks": _checks(ctx, models, outs),
    }


def _checks(ctx: Context, models: list[dict[str, Any]],
            outs: dict[tuple[str, str], np.ndarray]) -> dict[str, Any]:
    who = _role(ctx)
    by = {(m["name"], m["runtime"]): m for m in models}
    fp32 = by[(f"{who} fp32", "onnx")]
    out: dict[str, Any] = {}
    paired = _Paired(ctx, outs[(f"{who} fp32", "onnx")])
    if not ctx.recipe.quantize_only:
        out.update(_teacher_checks(models[0], fp32, models))
        out["student_vs_teacher_test"] = paired.classified(
            outs[("teacher", models[0]["runtime"])], "teacher")
    task = ctx.recipe.model.task
    for rt in ("onnx", "tflite"):
        m = by.get((f"{who} int8", rt))
        if m is None:
            continue
        int8_out = outs[(f"{who} int8", rt)]
        if task == "classify":
            tol = ctx.recipe.quantize.tolerance_points
            drop = (fp32["accuracy"] - m["accuracy"]) * 100
            out[f"int8_{rt}_drop_points"] = drop
            out[f"int8_{rt}_within_tolerance"] = drop <= tol + 1e-9
            out[f"int8_{rt}_vs_fp32_test"] = paired.classified(int8_out, "fp32")
        else:
            out[f"int8_{rt}_output_error"] = m["output_error"]
            out[f"int8_{rt}_within_tolerance"] = (m["output_error"]
                                                  <= ctx.recipe.model.max_output_error)
            if m.get("r2") is not None and fp32.get("r2") is not None:
                out[f"int8_{rt}_r2_drop"] = fp32["r2"] - m["r2"]
                out[f"int8_{rt}_rmse_change"] = m["rmse"] / max(fp32["rmse"], 1e-12) - 1
                out[f"int8_{rt}_mae_change"] = m["mae"] / max(fp32["mae"], 1e-12) - 1
                out[f"int8_{rt}_vs_fp32_test"] = paired.r2_drop(int8_out)
            if m.get("anomaly_auc") is not None and fp32.get("anomaly_auc") is not None:
                out[f"int8_{rt}_auc_drop_points"] = (fp32["anomaly_auc"]
                                                     - m["anomaly_auc"]) * 100
                out[f"int8_{rt}_vs_fp32_test"] = paired.auc_drop(int8_out)
    return out


class _Paired:
    """Paired tests of another model's test outputs against the fp32 model's."""

    def __init__(self, ctx: Context, fp32_out: np.ndarray) -> None:
        self.ctx, self.fp32 = ctx, fp32_out
        test = ctx.split.test
        self.n = len(test)
        self.x = np.asarray(ctx.x[test], np.float32)
        self.truth = ctx.truth(test) if ctx.recipe.model.task == "classify" else None
        self.labels = None if ctx.data.y is None else ctx.data.y[test]
        self.targets = None if ctx.data.targets is None else ctx.data.targets[test]

    def classified(self, other: np.ndarray, other_is: str) -> dict[str, Any] | None:
        """McNemar's test: the other model (the teacher, or int8 against fp32) first."""
        if self.truth is None:
            return None
        fp32_right = self.fp32.argmax(1) == self.truth
        other_right = other.argmax(1) == self.truth
        res = mcnemar(other_right, fp32_right) if other_is == "teacher" else mcnemar(
            fp32_right, other_right)
        return {**res, "a": other_is if other_is == "teacher" else "fp32",
                "b": "fp32" if other_is == "teacher" else "int8"}

    def r2_drop(self, int8: np.ndarray) -> dict[str, Any] | None:
        t = self.targets
        assert t is not None
        return paired_difference(lambda i: regression_scores(self.fp32[i], t[i])["r2"]
                                 - regression_scores(int8[i], t[i])["r2"], self.n,
                                 "R² fp32 - int8")

    def auc_drop(self, int8: np.ndarray) -> dict[str, Any] | None:
        labels = self.labels
        assert labels is not None
        e32 = reconstruction_error(self.x, np.asarray(self.fp32, np.float32))
        e8 = reconstruction_error(self.x, np.asarray(int8, np.float32))

        def drop(i: np.ndarray) -> float | None:
            a, b = roc_auc(e32[i], labels[i] != 0), roc_auc(e8[i], labels[i] != 0)
            return None if a is None or b is None else a - b
        return paired_difference(drop, self.n, "anomaly AUC fp32 - int8")


def _teacher_checks(teacher: dict[str, Any], fp32: dict[str, Any],
                    models: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "student_drop_vs_teacher_points": (teacher["accuracy"] - fp32["accuracy"]) * 100,
    }
    # Trees and linear models keep their sizes outside initializers (skl2onnx attributes):
    # with no parameter count the ratio is by bytes, teacher file over int8 student file.
    smallest = min((m for m in models[1:] if m["name"].startswith("student")),
                   key=lambda m: m["raw_bytes"])
    if teacher["parameters"] > 0:
        out["size_ratio"] = {"by": "parameters", "teacher": teacher["parameters"],
                             "student": fp32["parameters"],
                             "ratio": teacher["parameters"] / max(fp32["parameters"], 1)}
    else:
        out["size_ratio"] = {"by": "bytes", "teacher": teacher["raw_bytes"],
                             "student": smallest["raw_bytes"],
                             "student_file": smallest["file"],
                             "ratio": teacher["raw_bytes"] / max(smallest["raw_bytes"], 1)}
    return out


def write_report(ctx: Context) -> None:
    """Write report.json, report.md and report.png into the work directory."""
    report = _report_data(ctx)
    (ctx.work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _plot(ctx, report, ctx.work / "report.png")
    (ctx.work / "report.md").write_text(render_markdown(report))


def _report_data(ctx: Context) -> dict[str, Any]:
    r = ctx.results
    return {
        "profile": ctx.profile.name,
        "profile_description": ctx.profile.description,
        "data": {"source": ctx.data.source, "samples": len(ctx.data.x),
                 "train": len(ctx.split.train), "val": len(ctx.split.val),
                 "test": len(ctx.split.test), "sample_shape": list(ctx.data.sample_shape),
                 # several inputs: each one's name and sample shape, side by side in that
                 # order in sample_shape's values
                 **({"model_inputs": [{"name": n, "shape": list(shape)}
                                      for n, shape in ctx.data.inputs]}
                    if ctx.data.inputs else {})},
        "inputs": r.get("inputs"), "teacher": r.get("teacher"),
        "student": {k: v for k, v in r.get("student", {}).items() if k != "history"},
        "prune": r.get("prune"), "export": r.get("export"), "quantize": r.get("quantize"),
        "compile": r.get("compile"), "evaluate": r.get("evaluate"),
        "timings_s": r.get("timings_s"),
        "history": r.get("student", {}).get("history"),
    }


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def _score_columns(ev_: dict[str, Any]) -> tuple[str, Any]:
    """The table's quality columns for the task: header and a row formatter."""
    if ev_.get("task", "classify") == "classify":
        return ("| accuracy [95 % CI] | agrees with teacher [95 % CI] |",
                lambda m: f"| {_pct_ci(m, 'accuracy')} | {_pct_ci(m, 'teacher_agreement')} |")

    def values(m: dict[str, Any]) -> str:
        return (f"| {value_ci(m.get('output_error'), m.get('output_error_ci'), '.4f')} | "
                f"{value_ci(m.get('anomaly_auc'), m.get('anomaly_auc_ci'), '.4f')} |")

    def regression(m: dict[str, Any]) -> str:
        return "| " + " | ".join(value_ci(m.get(k), m.get(f"{k}_ci"))
                                 for k in ("output_error", "mae", "rmse", "r2")) + " |"
    if any(m.get("r2") is not None for m in ev_["models"]):
        return ("| output error vs fp32 (NRMSE) [95 % CI] | MAE [95 % CI] | RMSE [95 % CI] | "
                "R² [95 % CI] |"), regression
    return ("| output error vs fp32 (NRMSE) [95 % CI] | anomaly AUC [95 % CI] |"), values


def _pct_ci(m: dict[str, Any], key: str) -> str:
    """A row's accuracy (or agreement) with its Wilson interval."""
    v, ci = m.get(key), m.get(f"{key}_ci")
    if v is None:
        return "n/a"
    return pct_ci(None if ci is None else {"value": v, "low": ci[0], "high": ci[1]})


def render_markdown(rep: dict[str, Any]) -> str:
    ev_ = rep["evaluate"]
    head, cells = _score_columns(ev_)
    measured = ("accuracy is measured against " + ev_["labels"]
                if ev_.get("task", "classify") == "classify" else
                "output error is against the fp32 model on the same samples, and MAE, RMSE "
                "and R² against the data's targets,"
                if any(m.get("r2") is not None for m in ev_["models"]) else
                "output error is against the fp32 model on the same samples, and the anomaly "
                "AUC (where the data has labels) against the labels,")
    lines = [f"# edge-convert report: {rep['profile']}", "",
             f"Target: {rep['profile_description']}.  ",
             f"Data: {rep['data']['source']}, {rep['data']['samples']} samples "
             f"(train {rep['data']['train']}, val {rep['data']['val']}, test "
             f"{rep['data']['test']}); {measured} on the "
             f"test split, never used for training, calibration or the quality gate.", ""]
    if ev_.get("role") == "model":
        lines += [f"Quantize only: the trained model ({rep['teacher']['description']}, task "
                  f"{ev_['task']}, batch {rep['teacher'].get('batch', 'dynamic')}) is "
                  "converted as it is; no teacher, no distillation.", ""]
    elif (rep.get("teacher") or {}).get("batch", "dynamic") != "dynamic":
        lines += [f"The teacher ({rep['teacher']['description']}) takes a batch "
                  f"{rep['teacher']['batch']}: it ran on chunks of exactly that many samples, "
                  "the last padded and its padded outputs dropped.", ""]
    header = f"| model | runtime {head} parameters | size | gzip | p50 latency | p95 latency |"
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for m in ev_["models"]:
        lat = m.get("latency") or {}
        p50 = f"{lat['p50_ms']:.3f} ms" if lat else ""
        p95 = f"{lat['p95_ms']:.3f} ms" if lat else ""
        lines.append(
            f"| {m['name']} | {m['runtime']} {cells(m)} {m['parameters']:,} | "
            f"{_fmt_bytes(m['raw_bytes'])} | {_fmt_bytes(m['gzip_bytes'])} | {p50} | {p95} |")
    c = ev_["checks"]
    lines += ["", f"Latency: host CPU, batch 1, {ev_['threads']} thread(s); device figures "
              "differ. ", "", UNCERTAINTY, "", "## Checks", ""]
    if "size_ratio" in c:
        lines.append(f"- {_ratio_text(c['size_ratio'])}; the student's accuracy is "
                     f"{c['student_drop_vs_teacher_points']:.2f} points below the teacher's "
                     f"({gap_text(c.get('student_vs_teacher_test'))})")
    lines.append(f"- MACs per sample: {ev_.get('role', 'student')} {ev_['student_macs']:,}"
                 + (f", teacher {ev_['teacher_macs']:,}" if ev_["teacher_macs"] else ""))
    lines += _gate_lines(rep)
    for rt in ("onnx", "tflite"):
        ok = "within" if c.get(f"int8_{rt}_within_tolerance") else "OUTSIDE"
        if f"int8_{rt}_drop_points" in c:
            lines.append(f"- int8 {rt}: {c[f'int8_{rt}_drop_points']:.2f} points below fp32 "
                         f"({ok} tolerance; {gap_text(c.get(f'int8_{rt}_vs_fp32_test'))})")
        if f"int8_{rt}_output_error" in c:
            auc = c.get(f"int8_{rt}_auc_drop_points")
            lines.append(f"- int8 {rt}: output error {c[f'int8_{rt}_output_error']:.4f} of "
                         f"the fp32 outputs' spread ({ok} the gate)"
                         + (f"; anomaly AUC {auc:.2f} points below fp32" if auc is not None
                            else "")
                         + (f"; R² {c[f'int8_{rt}_r2_drop']:.4g} below fp32"
                            if f"int8_{rt}_r2_drop" in c else "")
                         + (f" ({gap_text(c[f'int8_{rt}_vs_fp32_test'])})"
                            if f"int8_{rt}_vs_fp32_test" in c else ""))
    m8, m32 = ev_["memory_int8"], ev_["memory_fp32"]
    lines += [f"- estimated peak memory: int8 {_fmt_bytes(m8['peak_memory_bytes'])} (weights "
              f"{_fmt_bytes(m8['model_bytes'])} + arena {_fmt_bytes(m8['arena_bytes'])}); fp32 "
              f"{_fmt_bytes(m32['peak_memory_bytes'])}"]
    lines += _quant_lines(rep) + _target_lines(rep)
    if rep.get("prune") and rep["prune"].get("method") != "none":
        p = rep["prune"]
        lines += ["", "## Pruning", "",
                  f"{p['method']}: parameters {p['params_before']:,} -> {p['params_after']:,}, "
                  f"non-zero {p['nonzero_after']:,}, weight sparsity {p['sparsity']:.0%}; test "
                  f"accuracy {_pct_ci(p, 'test_accuracy_before')} -> "
                  f"{_pct_ci(p, 'test_accuracy_pruned')} pruned -> "
                  f"{_pct_ci(p, 'test_accuracy_finetuned')} fine-tuned."]
        if p["method"] == "unstructured":
            lines.append("Unstructured zeros shrink the gzipped size, not the raw file or the "
                         "latency of dense kernels.")
    lines += ["", "![quality and training curves](report.png)", "",
              f"Stage timings (s): {rep['timings_s']}", ""]
    return "\n".join(lines)


UNCERTAINTY = (
    "Intervals are 95 %: Wilson score intervals for accuracies, percentile bootstrap "
    "intervals (1,000 resamples of the test samples, fixed seed) for error metrics. A gap "
    "between two models on the same samples is tested on their paired predictions: "
    "McNemar's exact test for accuracies (only the samples exactly one of the two gets "
    "right count), a paired bootstrap interval of the difference for error metrics; "
    "'within noise' means this split cannot tell the gap from chance. The gates decide on "
    "point estimates against their tolerances and show the same tests beside them.")


def _ratio_text(r: dict[str, Any]) -> str:
    if r["by"] == "parameters":
        return (f"student has {r['ratio']:.1f}x fewer parameters than the teacher "
                f"({r['student']:,} against {r['teacher']:,})")
    return (f"the teacher has no parameter count (its sizes live in operator attributes): "
            f"its file is {r['ratio']:.1f}x the bytes of the student's {r['student_file']} "
            f"({_fmt_bytes(r['teacher'])} against {_fmt_bytes(r['student'])})")


def _gate_lines(rep: dict[str, Any]) -> list[str]:
    """The quality gates the run passed, with their figures (validation split)."""
    out = []
    t, st, q = rep.get("teacher") or {}, rep.get("student") or {}, rep.get("quantize") or {}
    if inp := rep.get("inputs"):
        out.append(f"- inputs: normalize {inp['normalize']}"
                   f"{' per ' + inp['axis'] if inp['normalize'] != 'none' else ''} "
                   f"({inp['reason']}), applied by the agent before the model; int8 levels per "
                   f"{inp['unit']} on the training split: min {inp['levels_min']}, median "
                   f"{inp['levels_median']:g} (at least min({inp['min_levels']}, its distinct "
                   f"values) required)")
    if "chance" in t:
        out.append(f"- teacher gate (point estimate): {_pct_ci(t, 'val_accuracy')} on the "
                   f"validation labels against chance {_pct(t['chance'])} (the most common "
                   "class)")
    if "gap_points" in st:
        out.append(f"- distillation gate (point estimate): fp32 student "
                   f"{_pct_ci(st, 'val_accuracy')}, {st['gap_points']:.2f} points below the "
                   f"teacher's {_pct(st['teacher_val_accuracy'])} (at most "
                   f"{st['max_gap_points']:.2f}; {gap_text(st.get('val_test'))})")
    tests = "; ".join(f"{rt}: {gap_text(q[rt].get('val_test'))}" for rt in ("onnx", "tflite")
                      if rt in q)
    tests = f" ({tests})" if tests else ""
    if "gate_metric" in q:
        change = q["max_metric_change"]
        out.append(f"- int8 gate (point estimates): {q['gate_metric'].upper()} against the "
                   f"targets on "
                   f"{q['val_samples']} validation samples, "
                   + (f"at most {change:g} below fp32" if q["gate_metric"] == "r2" else
                      f"at most {change:.0%} above fp32") + tests)
    elif "max_output_error" in q:
        out.append(f"- int8 gate (point estimate): output error at most "
                   f"{q['max_output_error']:g} of the fp32 outputs' standard deviation on "
                   f"{q['val_samples']} validation samples{tests}")
    elif "val_samples" in q:
        out.append(f"- int8 gate (point estimates): at most {q['tolerance_points']:.2f} points "
                   f"below fp32; the validation split has {q['val_samples']} samples, so one "
                   f"sample is {q['val_resolution_points']:.2f} points{tests}")
    return out


def _quant_lines(rep: dict[str, Any]) -> list[str]:
    q = rep.get("quantize") or {}
    lines = ["", "## Quantization", "",
             f"{'per-channel' if q.get('per_channel') else 'per-tensor'} int8 weights, "
             f"{q.get('calibration_samples')} calibration samples from the training split."]
    if "onnx" in q:
        o = q["onnx"]
        lines.append(f"- ONNX QDQ: {o['calibration']} calibration; float layers: "
                     f"{', '.join(o['float_layers']) or 'none'}")
        lines += [f"  - {s}" for s in o["steps"]]
    if "tflite" in q:
        t = q["tflite"]
        lines.append(f"- TFLite (litert-torch {t.get('route', 'PT2E')}): I/O {t['io_dtype']}, "
                     f"batch {t.get('batch', 'dynamic')}; operators "
                     f"{', '.join(t['operators'])}")
        lines += [f"  - {s}" for s in t["steps"]]
    return lines


def _target_lines(rep: dict[str, Any]) -> list[str]:
    lines = ["", "## Target", ""]
    q = rep.get("quantize") or {}
    unsupported = q.get("tflite", {}).get("unsupported", [])
    lines.append(f"- operators outside {rep['profile']}'s set (run on the CPU): "
                 f"{', '.join(unsupported) or 'none'}")
    comp = rep.get("compile") or {}
    if comp.get("summary"):
        s = comp["summary"]
        lines.append(f"- Vela ({s.get('accelerator')}, {s.get('system_config')}): SRAM "
                     f"{s.get('sram_kib', 0):.2f} KiB, off-chip flash {s.get('flash_kib', 0):.2f} "
                     f"KiB, {s.get('cycles_total')} cycles "
                     f"({s.get('inference_time_s', 0) * 1e6:.1f} us at the NPU clock), "
                     f"{comp['npu_ops']} NPU op(s), CPU fallback: "
                     f"{', '.join(comp['cpu_fallback_ops']) or 'none'}")
    for step in comp.get("external_steps", []):
        lines.append(f"- external step remains: `{step}`")
    return lines


def _plot(ctx: Context, rep: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415  # heavy or optional: loaded only when used

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  # heavy or optional: loaded only when used

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    key, label = (("accuracy", "test accuracy (%)") if rep["evaluate"].get("task", "classify")
                  == "classify" else ("anomaly_auc", "test anomaly AUC (%)"))
    rows = [m for m in rep["evaluate"]["models"] if m.get(key) is not None]
    names = [f"{m['name']}\n({m['runtime']})" for m in rows]
    accs = [m[key] * 100 for m in rows]
    bars = ax1.bar(names, accs, color=["#777", "#1f77b4", "#ff7f0e", "#2ca02c"][:len(rows)])
    ax1.bar_label(bars, fmt="%.1f")
    ax1.set_ylim(max(0, min(accs, default=0) - 10), 100.5)
    ax1.set_ylabel(label)
    ax1.set_title(f"{rep['profile']}")
    hist = rep.get("history") or {}
    epochs = hist.get("epochs") or []
    if epochs:
        xs = [e["epoch"] for e in epochs]
        ax2.plot(xs, [e["train_acc"] * 100 for e in epochs], label="student train")
        ax2.plot(xs, [e["val_acc"] * 100 for e in epochs], label="student val")
        ax2.plot(xs, [e["teacher_val_acc"] * 100 for e in epochs], "--", label="teacher val")
        ax2.axvline(hist.get("best_epoch", 0), color="#999", lw=0.8)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("accuracy (%)")
        ax2.set_title("distillation")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
