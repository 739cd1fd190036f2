"""Teachers from another framework: scikit-learn classifiers converted with skl2onnx, whose
first output is the integer label (`output_label`) and whose probabilities come as a
tensor or, with ZipMap on (skl2onnx's default), as a sequence of maps. edge-convert picks
the float (N, classes) output by itself, or the one `--teacher-output` names, and says
which outputs there are when it cannot tell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import FAST
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from converter.cli import main as convert

TEACHERS: dict[str, Any] = {
    "mlp": lambda: MLPClassifier((64,), max_iter=300, random_state=0),
    "gradient_boosting": lambda: GradientBoostingClassifier(n_estimators=20, max_depth=2,
                                                            random_state=0),
    "random_forest": lambda: RandomForestClassifier(n_estimators=40, random_state=0),
    "logistic_regression": lambda: LogisticRegression(max_iter=2000),
}


@pytest.fixture(scope="module")
def digits_flat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw, unscaled digits as flat 64-feature rows (what a tabular model sees)."""
    d = load_digits()
    path = tmp_path_factory.mktemp("flat") / "digits64.npz"
    np.savez(path, x=d.data.astype(np.float32), y=d.target.astype(np.int64))
    return path


def teacher_onnx(kind: str, data: Path, out: Path, *, zipmap: bool) -> Path:
    with np.load(data) as npz:
        x, y = npz["x"], npz["y"]
    model = TEACHERS[kind]().fit(x[:1200], y[:1200])
    onx = to_onnx(model, x[:1], options={"zipmap": zipmap}, target_opset=17)
    assert onx.graph.output[0].name in ("label", "output_label")  # the label first
    path = out / f"{kind}.onnx"
    path.write_bytes(onx.SerializeToString())
    return path


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_every_scikit_learn_teacher_gives_its_class_scores(kind: str, digits_flat: Path,
                                                           tmp_path: Path) -> None:
    """The teacher stage alone, for all four (ZipMap on: its sequence of maps is skipped)."""
    teacher = teacher_onnx(kind, digits_flat, tmp_path, zipmap=True)
    work = tmp_path / "work"
    assert convert(["teacher", "--work", str(work), "--data-source", str(digits_flat),
                    "--teacher-onnx", str(teacher), "--student-family", "mlp", *FAST]) == 0
    res = json.loads((work / "results.json").read_text())
    assert res["teacher"]["kind"] == "onnx"
    assert res["teacher"]["val_accuracy"] > 0.8, res["teacher"]
    assert res["teacher"]["chance"] < 0.2


def test_a_scikit_learn_mlp_teacher_runs_end_to_end(digits_flat: Path, tmp_path: Path) -> None:
    teacher = teacher_onnx("mlp", digits_flat, tmp_path, zipmap=False)
    out = tmp_path / "out"
    assert convert(["run", "--out", str(out), "--data-source", str(digits_flat),
                    "--teacher-onnx", str(teacher), "--student-family", "mlp",
                    "--student-hidden", "[64]", "--target-profile", "x86_64-generic",
                    *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    models = {(m["name"], m["runtime"]): m for m in report["evaluate"]["models"]}
    assert models[("teacher", "onnx")]["accuracy"] > 0.9, models
    assert models[("teacher", "onnx")]["latency"]["p50_ms"] > 0
    assert models[("student int8", "tflite")]["accuracy"] > 0.8, models
    assert (out / "bundle/manifest.json").exists()
    text = (out / "report.md").read_text()
    for gate in ("teacher gate", "distillation gate", "int8 gate", "one sample is"):
        assert gate in text, gate


def test_an_ambiguous_or_wrong_teacher_output_is_one_line_listing_the_outputs(
        digits_flat: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two float (N, 10) outputs: the error lists both and names --teacher-output; naming
    the label output is refused for its type; naming one of the two works."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).normal(
        0, 0.1, (64, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["scores"]),
         helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
         helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0)],
        "two", [x], [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                     helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10]),
                     helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                                   ["N", 10])], [w])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    common = ["teacher", "--data-source", str(digits_flat), "--teacher-onnx", str(path),
              "--student-family", "mlp", *FAST]
    assert convert([*common, "--work", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-convert: error:"), err
    for name in ("label", "scores", "probabilities", "--teacher-output"):
        assert name in err[0], err[0]
    assert convert([*common, "--work", str(tmp_path / "b"), "--teacher-output", "label"]) == 2
    assert "tensor(int64)" in capsys.readouterr().err
    assert convert([*common, "--work", str(tmp_path / "c"), "--teacher-output",
                    "probabilities", "--teacher-min-margin-points", "0"]) == 0  # random weights


def test_labels_in_another_order_than_the_teacher_fail_the_teacher_gate(
        digits_flat: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A good teacher scored against labels shifted by one class: 0 % against them, which
    used to exit 0 with a bundle ready to sign."""
    teacher = teacher_onnx("logistic_regression", digits_flat, tmp_path, zipmap=False)
    with np.load(digits_flat) as npz:
        shifted = tmp_path / "shifted.npz"
        np.savez(shifted, x=npz["x"], y=(npz["y"] + 1) % 10)
    assert convert(["teacher", "--work", str(tmp_path / "w"), "--data-source", str(shifted),
                    "--teacher-onnx", str(teacher), "--student-family", "mlp", *FAST]) == 2
    err = capsys.readouterr().err
    assert "above chance" in err and "order of the teacher's outputs" in err, err
    assert not (tmp_path / "w" / "teacher_logits.npy").exists()


def test_a_student_far_below_its_teacher_fails_the_distillation_gate(
        digits_flat: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 2-unit MLP after 2 epochs is ~30 points below a 95 % teacher: the run fails with
    what to try instead of a bundle ready to sign; with room, the figures are recorded."""
    teacher = teacher_onnx("logistic_regression", digits_flat, tmp_path, zipmap=False)
    common = ["--data-source", str(digits_flat), "--teacher-onnx", str(teacher),
              "--student-family", "mlp", "--student-hidden", "[2]", "--distill-epochs", "2",
              "--distill-progress", "false"]
    work = tmp_path / "w"
    assert convert(["teacher", "--work", str(work), *common]) == 0
    assert convert(["distill", "--work", str(work), *common]) == 2
    err = capsys.readouterr().err
    assert "points below the teacher" in err and "--distill-max-gap-points" in err, err
    assert not (work / "student.pt").exists()
    assert convert(["distill", "--work", str(work), *common,
                    "--distill-max-gap-points", "100"]) == 0
    student = json.loads((work / "results.json").read_text())["student"]
    assert student["gap_points"] > 3 and student["max_gap_points"] == 100


def test_no_gate_is_finer_than_one_validation_sample() -> None:
    from converter.pipeline import gate_points

    assert gate_points(1.0, 36) == pytest.approx(100 / 36)  # wine's validation split
    assert gate_points(1.0, 270) == 1.0
