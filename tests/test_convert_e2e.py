"""End to end on digits with fast settings: both teacher paths, the report's figures checked
against accuracy recomputed here with bare onnxruntime / LiteRT and scikit-learn's split."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import FAST
from sklearn.model_selection import train_test_split

from converter.cli import main as convert


def _test_split(y: np.ndarray, seed: int = 0) -> np.ndarray:
    """The documented split, recomputed independently of converter.data."""
    _, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y)
    return np.sort(test)


def _tflite_right(path: Path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    s_in, z_in = inp["quantization"]
    preds = []
    for sample in x:
        q = np.clip(np.round(sample[None] / s_in) + z_in, -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], q)
        it.invoke()
        preds.append(int(it.get_tensor(out["index"]).argmax()))
    return np.asarray(preds) == y


def _onnx_right(path: Path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return np.asarray(logits.argmax(1) == y)


def _tflite_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return float(_tflite_right(path, x, y).mean())


def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return float(_onnx_right(path, x, y).mean())


def _wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval at 95 %, written out (Wilson 1927)."""
    z, p = 1.959963984540054, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _mcnemar_exact(a_right: np.ndarray, b_right: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test, written out: the two-sided binomial tail of the discordant
    pairs at one half."""
    b, c = int((a_right & ~b_right).sum()), int((b_right & ~a_right).sum())
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n if n else 0.5
    return b, c, min(1.0, 2 * tail)


def test_onnx_teacher_run_writes_report_bundle_and_curves(onnx_run: Path) -> None:
    for name in ("report.json", "report.md", "report.png", "model_int8.onnx",
                 "model_int8.tflite", "bundle/manifest.json", "bundle/selftest.npz"):
        assert (onnx_run / name).is_file(), name
    assert not list(onnx_run.parent.glob(".pi4.*")), "temporary build directory left behind"
    png = (onnx_run / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (onnx_run / "report.md").read_text()
    assert "| student int8 | tflite |" in md and "fewer parameters" in md


def test_report_accuracy_matches_independent_recomputation(onnx_run: Path, example: Path) -> None:
    data = np.load(example / "digits.npz")
    test = _test_split(data["y"])
    x, y = data["x"][test].astype(np.float32), data["y"][test]
    rep = json.loads((onnx_run / "report.json").read_text())
    models = {(m["name"], m["runtime"]): m for m in rep["evaluate"]["models"]}
    assert rep["evaluate"]["test_samples"] == len(test)
    assert models[("teacher", "onnx")]["accuracy"] == pytest.approx(
        _onnx_accuracy(example / "teacher.onnx", x, y))
    assert models[("student fp32", "onnx")]["accuracy"] == pytest.approx(
        _onnx_accuracy(onnx_run / "model_fp32.onnx", x, y))
    assert models[("student int8", "onnx")]["accuracy"] == pytest.approx(
        _onnx_accuracy(onnx_run / "model_int8.onnx", x, y))
    assert models[("student int8", "tflite")]["accuracy"] == pytest.approx(
        _tflite_accuracy(onnx_run / "model_int8.tflite", x, y))
    # Even with fast settings the student learns digits and int8 holds the gate.
    assert models[("student fp32", "onnx")]["accuracy"] > 0.85
    checks = rep["evaluate"]["checks"]
    assert checks["int8_onnx_within_tolerance"] and checks["int8_tflite_within_tolerance"]
    assert checks["size_ratio"]["by"] == "parameters" and checks["size_ratio"]["ratio"] > 20


def test_every_accuracy_carries_its_interval_and_every_gap_its_paired_test(
        onnx_run: Path, example: Path) -> None:
    """The report's 95 % intervals equal Wilson's written out here on the right answers
    recomputed with bare runtimes; the student-vs-teacher and int8-vs-fp32 gaps carry
    McNemar's exact test on those paired answers, and the Markdown says which tests the
    gates use."""
    data = np.load(example / "digits.npz")
    test = _test_split(data["y"])
    x, y = data["x"][test].astype(np.float32), data["y"][test]
    rep = json.loads((onnx_run / "report.json").read_text())
    models = {(m["name"], m["runtime"]): m for m in rep["evaluate"]["models"]}
    right = {("teacher", "onnx"): _onnx_right(example / "teacher.onnx", x, y),
             ("student fp32", "onnx"): _onnx_right(onnx_run / "model_fp32.onnx", x, y),
             ("student int8", "onnx"): _onnx_right(onnx_run / "model_int8.onnx", x, y),
             ("student int8", "tflite"): _tflite_right(onnx_run / "model_int8.tflite", x, y)}
    for key, r in right.items():
        assert models[key]["accuracy_ci"] == pytest.approx(
            _wilson(int(r.sum()), len(r)), abs=1e-9), key
    checks = rep["evaluate"]["checks"]
    fp32 = right[("student fp32", "onnx")]
    for name, a, b in (("student_vs_teacher_test", right[("teacher", "onnx")], fp32),
                       ("int8_onnx_vs_fp32_test", fp32, right[("student int8", "onnx")]),
                       ("int8_tflite_vs_fp32_test", fp32, right[("student int8", "tflite")])):
        a_only, b_only, p = _mcnemar_exact(a, b)
        got = checks[name]
        assert (got["a_only"], got["b_only"]) == (a_only, b_only), name
        assert got["p_value"] == pytest.approx(p, rel=1e-9), name
        assert got["significant"] is (p < 0.05), name
    teacher = rep["teacher"]
    assert teacher["test_accuracy_ci"] == pytest.approx(models[("teacher", "onnx")]
                                                        ["accuracy_ci"])
    for gate in (rep["student"]["val_test"], rep["quantize"]["onnx"]["val_test"],
                 rep["quantize"]["tflite"]["val_test"]):
        assert gate["test"] == "McNemar exact" and 0 < gate["p_value"] <= 1
    md = (onnx_run / "report.md").read_text()
    lo, hi = models[("student fp32", "onnx")]["accuracy_ci"]
    assert f"[{lo * 100:.1f}, {hi * 100:.1f}]" in md
    assert "accuracy [95 % CI]" in md and "Wilson score intervals" in md
    assert "teacher gate (point estimate)" in md and "int8 gate (point estimates)" in md
    assert md.count("McNemar p = ") >= 6  # three gaps on the test split, three gates


def test_model_files_are_single_self_contained_and_int8(onnx_run: Path) -> None:
    import onnx

    assert not list(onnx_run.glob("*.data"))
    q = onnx.load(str(onnx_run / "model_int8.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    conv_scales = [i for i in q.graph.initializer if "weight" in i.name and "scale" in i.name]
    assert any(len(i.dims) == 1 and i.dims[0] > 1 for i in conv_scales), "per-channel scales"
    manifest = json.loads((onnx_run / "bundle/manifest.json").read_text())
    assert manifest["runtime"] == "tflite"  # raspberry-pi-4 prefers TFLite
    assert manifest["inputs"][0]["dtype"] == "int8"
    assert manifest["inputs"][0]["quantization"]["scale"] > 0
    assert sum(manifest["reference"]["output"]["class_fractions"]) == pytest.approx(1.0)


def test_bundle_self_test_and_inspection_pass(onnx_run: Path) -> None:
    bundle = str(onnx_run / "bundle")
    st = subprocess.run([sys.executable, "-m", "agent.cli", "selftest", bundle],
                        capture_output=True, text=True, check=False)
    assert st.returncode == 0, st.stderr
    assert "self-test passed" in st.stdout
    ins = subprocess.run([sys.executable, "-m", "fleet.cli", "bundle", "inspect", bundle],
                         capture_output=True, text=True, check=False)
    assert ins.returncode == 0 and "all sizes and sha256 match" in ins.stdout


def test_tensorboard_curves_hold_teacher_and_student_scalars(onnx_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(onnx_run / "tensorboard" / "distill"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"student/val_acc", "student/train_loss", "teacher/val_acc"} <= tags
    epochs = json.loads((onnx_run / "results.json").read_text())["student"]["history"]["epochs"]
    assert len(acc.Scalars("student/val_acc")) == len(epochs)


def test_torch_teacher_stage_by_stage_with_structured_pruning_for_ethos_u(
        example: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    common = ["--work", str(work), "--data-source", str(example / "digits.npz"),
              "--teacher-torch", "converter.examples.digits:teacher",
              "--teacher-weights", str(example / "teacher.pt"),
              "--target-profile", "arm-ethos-u55-128", "--prune-method", "structured",
              "--prune-sparsity", "0.5", "--prune-finetune-epochs", "4", *FAST]
    for stage in ("teacher", "distill", "prune", "export", "quantize", "compile", "evaluate",
                  "report", "bundle"):
        assert convert([stage, *common]) == 0, stage
    res = json.loads((work / "results.json").read_text())
    assert res["teacher"]["kind"] == "torch"
    assert res["prune"]["params_after"] < 0.75 * res["prune"]["params_before"]
    comp = res["compile"]
    assert comp["compiler"] == "vela" and comp["npu_ops"] >= 1
    assert comp["summary"]["sram_kib"] > 0 and comp["summary"]["cycles_total"] > 0
    manifest = json.loads((work / "bundle/manifest.json").read_text())
    assert manifest["model_file"] == "model_vela.tflite"
    assert "Vela" in (work / "report.md").read_text()
