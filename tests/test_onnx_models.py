"""Models as people bring them, through `edge-convert run` at defaults: a trained model given
only as ONNX becomes int8 TFLite (onnx2torch into the PT2E path), for a CPU target and
through Vela for Ethos-U, and a real agent serves it; a model or teacher exported with a
fixed batch is fed chunks of exactly that batch; an operator the route cannot convert is
refused in one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import FAST
from fixture_agent import AgentProcess, make_keys, write_config
from onnx import TensorProto, helper

from agent.serving.runtime import open_model, open_tflite, pack
from agent.trust.manifest import parse_manifest
from converter.cli import main as convert
from converter.data import split
from converter.examples import digits, fusion
from converter.examples import tiny as examples
from fleet.trust.keys import KeyDir
from fleet.trust.release import pack_bundle, sign_bundle

QUICK = ["--evaluate-latency-runs", "10", "--data-calibration-samples", "64"]


def _export(model: torch.nn.Module, sample: torch.Tensor, path: Path, *,
            dynamic: bool) -> Path:
    """`model` as ONNX the way a user exports it: torch's exporter, a dynamic batch or the
    example's batch fixed."""
    torch.onnx.export(model.eval(), (sample,), str(path), input_names=["features"],
                      dynamo=True, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None)
    return path


@pytest.fixture(scope="module")
def kws(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, ONNX with a dynamic batch, ONNX with the batch fixed at 8) of the DS-CNN
    keyword spotter trained on generated features: a model that exists only as ONNX
    for the converter (its torch factory is not given)."""
    where = tmp_path_factory.mktemp("kws")
    examples.write_example(where, case="kws", small=True, epochs=6)
    model = examples.kws()
    model.load_state_dict(torch.load(where / "model.pt", weights_only=True))
    return (where / "data.npz",
            _export(model, torch.zeros(2, 1, 49, 10), where / "kws.onnx", dynamic=True),
            _export(model, torch.zeros(8, 1, 49, 10), where / "kws8.onnx", dynamic=False))


def test_an_onnx_only_model_becomes_int8_tflite_that_a_real_agent_serves(
        kws: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Quantize-only of an ONNX model for a TFLite target at defaults (it was refused:
    "int8 TFLite is built from a torch model"): full-int8 I/O through onnx2torch and PT2E,
    the accuracy gate on it, signed and installed on a real agent with the TFLite runtime,
    whose answers to raw samples are the int8 model's."""
    data, onnx_file, _ = kws
    out = tmp_path / "out"
    assert convert(["run", "--data-source", str(data), "--model-onnx", str(onnx_file),
                    "--target-profile", "raspberry-pi-4", "--out", str(out), *QUICK]) == 0
    rep = json.loads((out / "report.json").read_text())
    t = rep["quantize"]["tflite"]
    assert (t["route"], t["io_dtype"], t["batch"]) == ("onnx2torch -> PT2E", "int8/int8",
                                                        "dynamic")
    assert (t["val_fp32"] - t["val_int8"]) * 100 <= rep["quantize"]["tolerance_points"] + 1e-9
    assert "onnx2torch -> PT2E" in (out / "report.md").read_text()
    bundle = out / "bundle"
    m = parse_manifest((bundle / "manifest.json").read_bytes())
    assert m.runtime == "tflite" and m.inputs[0].dtype == "int8"

    with np.load(data) as npz:
        x = npz["x"].astype(np.float32)[:12]
    keys = make_keys(tmp_path / "keys")
    kd = KeyDir(keys)
    sign_bundle(bundle, kd.keys_of(kd.root(), "release", None))
    agent = AgentProcess(write_config(tmp_path / "dev", keys,
                                      profile="raspberry-pi-4")).start()
    try:
        status, body = agent.install(pack_bundle(bundle, tmp_path / "kws.tar.zst"))
        assert status == 200 and "passed" in str(body["selftest"]), body
        status, res = agent.call("POST", f"/v2/models/{m.name}/infer", {
            "inputs": [{"name": m.inputs[0].name, "shape": list(x.shape),
                        "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200, res
    finally:
        assert agent.stop() == 0, agent.log
    got = np.asarray(res["outputs"][0]["data"], np.float32).reshape(len(x), -1)
    want = open_model(bundle / m.model_file, "tflite").run(x)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_fixed_batch_onnx_model_reaches_ethos_u_through_vela_at_its_batch(
        kws: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Exported with its batch fixed at 8 (it crashed: the tail was fed one sample at a
    time): every run feeds chunks of exactly 8, the last padded; the int8 TFLite keeps
    the batch of 8, Vela compiles it for the U55, and the report says so."""
    data, dynamic, fixed = kws
    out = tmp_path / "out"
    assert convert(["run", "--data-source", str(data), "--model-onnx", str(fixed),
                    "--target-profile", "arm-ethos-u55-128", "--out", str(out), *QUICK]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["teacher"]["batch"] == "fixed 8"
    assert rep["quantize"]["tflite"]["batch"] == "fixed 8"
    assert rep["compile"]["summary"]["sram_kib"] > 0
    assert rep["compile"]["cpu_fallback_ops"] == []
    int8 = open_tflite(out / "model_int8.tflite")
    assert int8.inputs[0].shape[0] == 8
    with np.load(data) as npz:
        x = npz["x"].astype(np.float32)[:13]  # not a multiple of 8
    assert int8.run(x).shape == (13, 12)
    # the same figures the dynamic export gives: padding changes no answer
    rows = {(r["name"], r["runtime"]): r.get("accuracy") for r in rep["evaluate"]["models"]}
    assert convert(["run", "--data-source", str(data), "--model-onnx", str(dynamic),
                    "--quantize-formats", '["onnx"]', "--out", str(tmp_path / "dyn"),
                    *QUICK]) == 0
    dyn = json.loads((tmp_path / "dyn" / "report.json").read_text())
    dyn_rows = {(r["name"], r["runtime"]): r.get("accuracy") for r in dyn["evaluate"]["models"]}
    assert dyn_rows == {k: v for k, v in rows.items() if k[1] == "onnx"}


def test_a_teacher_exported_with_a_fixed_batch_is_distilled(example: Path,
                                                             tmp_path: Path) -> None:
    """The digits teacher exported with batch 8: its 1,797 samples are not a multiple of 8;
    the run completes and the report says how the teacher was fed."""
    teacher = digits.teacher()
    teacher.load_state_dict(torch.load(example / "teacher.pt", weights_only=True))
    onnx_file = _export(teacher, torch.zeros(8, 1, 8, 8), tmp_path / "teacher8.onnx",
                        dynamic=False)
    out = tmp_path / "out"
    assert convert(["run", "--teacher-onnx", str(onnx_file), "--out", str(out),
                    "--quantize-formats", '["onnx"]', *FAST]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["teacher"]["batch"] == "fixed 8"
    assert rep["teacher"]["test_accuracy"] > 0.9
    assert "takes a batch fixed 8" in (out / "report.md").read_text()


def test_an_operator_the_onnx_route_cannot_convert_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A regressor whose graph holds Shrink, which onnx2torch has no converter for: int8
    ONNX would do, int8 TFLite is refused in one line naming the operator and the options
    that avoid it; no traceback, nothing left behind."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Shrink", ["h"], ["y"], lambd=0.1)],
        "shrink", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [8, 3], w.ravel().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "shrink.onnx")
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(200, 8)).astype(np.float32))
    out = tmp_path / "out"
    rc = convert(["run", "--data-source", str(tmp_path / "data.npz"), "--model-onnx",
                  str(tmp_path / "shrink.onnx"), "--model-task", "regress",
                  "--target-profile", "raspberry-pi-4", "--out", str(out), *QUICK])
    err = capsys.readouterr().err
    assert rc != 0 and not out.exists()
    line = next(ln for ln in err.splitlines() if "error" in ln)
    assert "onnx2torch cannot convert operator Shrink (opset 17)" in line, err
    assert "--quantize-formats" in line and "Traceback" not in err


def _two_inputs(path: Path, classes: int) -> Path:
    """A classifier with two inputs, u (N, 3) and v (N, 5), as the issue's crashed."""
    rng = np.random.default_rng(1)
    wu, wv = (rng.normal(size=(k, classes)).astype(np.float32) for k in (3, 5))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["u", "wu"], ["a"]),
         helper.make_node("MatMul", ["v", "wv"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["logits"])],
        "two", [helper.make_tensor_value_info("u", TensorProto.FLOAT, ["n", 3]),
                helper.make_tensor_value_info("v", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
        [helper.make_tensor("wu", TensorProto.FLOAT, [3, classes], wu.ravel().tolist()),
         helper.make_tensor("wv", TensorProto.FLOAT, [5, classes], wv.ravel().tolist())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("role", ["--teacher-onnx", "--model-onnx"])
def test_a_model_with_two_inputs_and_data_with_one_is_refused_in_one_line_naming_them(
        role: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A teacher (or a model to quantize) with two inputs and data holding one array x:
    one line naming both inputs (a 28-line onnxruntime traceback before), no traceback,
    nothing left behind. A teacher is told the shapes distillation feeds; a model to
    quantize how to give one array per input."""
    model = _two_inputs(tmp_path / "two.onnx", 3)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(120, 8)).astype(np.float32),
             y=rng.integers(0, 3, 120))
    out = tmp_path / "out"
    rc = convert(["run", "--data-source", str(tmp_path / "data.npz"), role, str(model),
                  "--out", str(out), *QUICK])
    err = capsys.readouterr().err
    assert rc != 0 and not out.exists() and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1, err
    if role == "--teacher-onnx":
        assert "two.onnx has 2 inputs (u float32 [N, 3], v float32 [N, 5])" in lines[0]
        assert "(features,), (time, features) or (channels, height, " \
            "width)" in lines[0], lines[0]
    else:
        assert "the model has 2 inputs (u, v): give one array per input, named as the " \
            "model names them (np.savez(f, u=..., v=..., y=...)), not x" in lines[0], lines[0]


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, ONNX) of the `fusion` example (motor features and a vibration window), its
    data saved again in another order than the model's inputs (window, then features)."""
    where = tmp_path_factory.mktemp("fusion")
    fusion.write_example(where, epochs=15)
    with np.load(where / "data.npz") as npz:
        np.savez(where / "reordered.npz", window=npz["window"], features=npz["features"],
                 y=npz["y"])
    return where / "reordered.npz", where / "fusion.onnx"


def test_a_model_with_two_inputs_is_quantized_and_served_by_input_name(
        two_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """Quantize-only of an ONNX model with two inputs, the data one array per input name
    (saved in another order): int8 ONNX and int8 TFLite with both inputs, the gate on
    them, a bundle whose inputs carry the model's names, and a real agent that takes
    them by name: KServe v2 JSON (in any order) and binary parts, and TF Serving's row
    format, all answering what the int8 model gives; a request without one of them is
    refused naming both."""
    data, model = two_inputs
    out = tmp_path / "out"
    assert convert(["run", "--data-source", str(data), "--model-onnx", str(model),
                    "--target-profile", "raspberry-pi-4", "--out", str(out), *QUICK]) == 0
    rep = json.loads((out / "report.json").read_text())
    t = rep["quantize"]["tflite"]
    assert (t["route"], t["io_dtype"]) == ("onnx2torch -> PT2E", "int8/int8")
    assert (t["val_fp32"] - t["val_int8"]) * 100 <= rep["quantize"]["tolerance_points"] + 1e-9
    assert rep["data"]["model_inputs"] == [{"name": "features", "shape": [6]},
                                           {"name": "window", "shape": [2, 32]}]
    bundle = out / "bundle"
    m = parse_manifest((bundle / "manifest.json").read_bytes())
    assert [(i.name, i.shape[1:], i.dtype) for i in m.inputs] == [
        ("features", [6], "int8"), ("window", [2, 32], "int8")]
    with np.load(data) as npz:
        u, v = npz["features"][:10], npz["window"][:10]
    int8 = open_model(bundle / m.model_file, "tflite")
    want = int8.run(pack([u, v]))
    fp32 = open_model(model, "onnx").run(pack([u, v]))
    assert (want.argmax(1) == fp32.argmax(1)).mean() >= 0.9  # the inputs not swapped
    onnx_int8 = open_model(out / "model_int8.onnx", "onnx")
    assert [i.name for i in onnx_int8.inputs] == ["features", "window"]

    keys = make_keys(tmp_path / "keys")
    kd = KeyDir(keys)
    sign_bundle(bundle, kd.keys_of(kd.root(), "release", None))
    agent = AgentProcess(write_config(tmp_path / "dev", keys,
                                      profile="raspberry-pi-4")).start()
    try:
        status, body = agent.install(pack_bundle(bundle, tmp_path / "fusion.tar.zst"))
        assert status == 200 and "passed" in str(body["selftest"]), body
        url = f"/v2/models/{m.name}/infer"
        status, res = agent.call("POST", url, {"inputs": [  # by name, not order
            {"name": "window", "shape": list(v.shape), "datatype": "FP32",
             "data": v.ravel().tolist()},
            {"name": "features", "shape": list(u.shape), "datatype": "FP32",
             "data": u.ravel().tolist()}]})
        assert status == 200, res
        got = np.asarray(res["outputs"][0]["data"], np.float32).reshape(len(u), -1)
        np.testing.assert_allclose(got, want, atol=1e-6)
        head = json.dumps({"inputs": [
            {"name": n, "shape": list(a.shape), "datatype": "FP32",
             "parameters": {"binary_data_size": a.nbytes}}
            for n, a in (("features", u), ("window", v))]
        }).encode()
        conn = agent.connection()
        conn.request("POST", url, head + u.tobytes() + v.tobytes(),
                     {"Inference-Header-Content-Length": str(len(head))})
        r = conn.getresponse()
        res = json.loads(r.read())
        conn.close()
        assert r.status == 200, res
        got = np.asarray(res["outputs"][0]["data"], np.float32).reshape(len(u), -1)
        np.testing.assert_allclose(got, want, atol=1e-6)
        status, res = agent.call("POST", f"/v1/models/{m.name}:predict", {"instances": [
            {"features": a.tolist(), "window": b.tolist()} for a, b in zip(u, v, strict=True)]})
        assert status == 200, res
        np.testing.assert_allclose(np.asarray(res["predictions"], np.float32), want,
                                   atol=1e-6)
        status, res = agent.call("POST", url, {"inputs": [
            {"name": "features", "shape": list(u.shape), "datatype": "FP32",
             "data": u.ravel().tolist()}]})
        assert status == 400 and ("the model takes 2 inputs: 'features', 'window'"
                                  in res["error"]), res
    finally:
        assert agent.stop() == 0, agent.log


class _Standardized(torch.nn.Module):
    """A classifier that standardizes its inputs in its own graph, as many do."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))
        self.net = torch.nn.Sequential(torch.nn.Linear(len(mean), 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, classes))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net((v - self.mean) / self.std)  # type: ignore[no-any-return]


def test_a_model_that_normalizes_in_its_graph_is_warned_about_and_the_gate_decides(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """scikit-learn's wine (features from 0.1 to 1,680) and a model that standardizes
    them itself: the int8 level pre-check refused it and advised an option quantize-only
    refuses. Now it warns, naming the features, and the accuracy gate passes it."""
    from sklearn.datasets import load_wine

    wine = load_wine()
    x, y = wine.data.astype(np.float32), wine.target.astype(np.int64)
    torch.manual_seed(0)
    model = _Standardized(x.mean(0), x.std(0), 3)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x)),
                                          torch.from_numpy(y)).backward()
        opt.step()
    np.savez(tmp_path / "wine.npz", x=x, y=y)
    onnx_file = _export(model, torch.from_numpy(x[:2]), tmp_path / "wine.onnx", dynamic=True)
    out = tmp_path / "out"
    assert convert(["run", "--data-source", str(tmp_path / "wine.npz"), "--model-onnx",
                    str(onnx_file), "--out", str(out), *QUICK]) == 0
    said = capsys.readouterr().out
    assert "inputs: warning: int8 input quantization" in said
    assert "11 of 13 features fewer than 8 levels" in said and "the int8 gate decides" in said
    rep = json.loads((out / "report.json").read_text())
    assert "11 of 13 features" in rep["inputs"]["warning"]
    for rt in ("onnx", "tflite"):
        q = rep["quantize"][rt]
        assert (q["val_fp32"] - q["val_int8"]) * 100 <= rep["quantize"]["tolerance_points"]


def _diabetes_regressor(tmp_path: Path, outputs: int) -> tuple[Path, Path]:
    """scikit-learn's diabetes (442 samples, a float target) and an MLP regressor trained
    here on the converter's training split only (the default split), given as ONNX; with 2
    outputs the second target is the first's square root."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x = (d.data * 10).astype(np.float32)
    y = d.target.astype(np.float32)
    y = y if outputs == 1 else np.stack([y, np.sqrt(y)], axis=1)
    train = split(len(x), None, seed=0, val_fraction=0.15, test_fraction=0.2).train
    t = torch.from_numpy(y[train]).reshape(len(train), -1)
    mu, sd = t.mean(0), t.std(0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, outputs))
    opt = torch.optim.Adam(net.parameters(), 1e-2, weight_decay=0.1)
    for _ in range(200):
        opt.zero_grad()
        ((net(torch.from_numpy(x[train])) - (t - mu) / sd) ** 2).mean().backward()
        opt.step()

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mu", mu)
            self.register_buffer("sd", sd)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            out = self.net(v) * self.sd + self.mu
            return out[:, 0] if outputs == 1 else out  # type: ignore[no-any-return]

    np.savez(tmp_path / "diabetes.npz", x=x, y=y)
    return tmp_path / "diabetes.npz", _export(Scaled(), torch.from_numpy(x[:2]),
                                               tmp_path / "reg.onnx", dynamic=True)


@pytest.mark.parametrize("outputs", [1, 2])
def test_regression_targets_are_scored_as_scikit_learn_scores_them(
        outputs: int, tmp_path: Path) -> None:
    """`y` as float targets (it was refused: "y must be integer labels"): the report's MAE,
    RMSE and R² for fp32 and each int8 model equal scikit-learn's metrics on the same
    test split, recomputed here from the model files; the gate set on R² says so."""
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error
    from sklearn.model_selection import train_test_split

    data, model = _diabetes_regressor(tmp_path, outputs)
    out = tmp_path / "out"
    assert convert(["run", "--data-source", str(data), "--model-onnx", str(model),
                    "--model-task", "regress", "--model-gate", "r2", "--out", str(out),
                    *QUICK]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["quantize"]["gate_metric"] == "r2"
    with np.load(data) as npz:
        x, y = npz["x"], npz["y"]
    _, test = train_test_split(np.arange(len(x)), test_size=0.2, random_state=0)
    test = np.sort(test)
    rows = {(r["name"], r["runtime"]): r for r in rep["evaluate"]["models"]}
    files = {("model fp32", "onnx"): "model_fp32.onnx", ("model int8", "onnx"):
             "model_int8.onnx", ("model int8", "tflite"): "model_int8.tflite"}
    for key, name in files.items():
        pred = open_model(out / name, key[1]).run(x[test]).reshape(y[test].shape)
        for metric, want in (("mae", mean_absolute_error(y[test], pred)),
                             ("rmse", root_mean_squared_error(y[test], pred)),
                             ("r2", r2_score(y[test], pred))):
            assert rows[key][metric] == pytest.approx(want, rel=1e-4, abs=1e-6), (key, metric)
    assert rows[("model fp32", "onnx")]["r2"] > 0.2
    md = (out / "report.md").read_text()
    assert "| MAE [95 % CI] | RMSE [95 % CI] | R² [95 % CI] |" in md
    assert "int8 gate (point estimates): R2 against the targets" in md
    # each figure's bootstrap interval holds it, and is as wide as a bootstrap written out
    # here says (percentile, 1,000 resamples of the test samples: endpoints within 0.05)
    rng = np.random.default_rng(7)
    draws = [rng.integers(0, len(test), len(test)) for _ in range(1000)]
    for key, name in files.items():
        pred = open_model(out / name, key[1]).run(x[test]).reshape(y[test].shape)
        r2s = [r2_score(y[test][d], pred[d]) for d in draws]
        lo, hi = rows[key]["r2_ci"]
        assert lo < rows[key]["r2"] < hi, key
        assert (lo, hi) == pytest.approx(tuple(np.percentile(r2s, [2.5, 97.5])), abs=0.05)
    for rt in ("onnx", "tflite"):  # the int8 gap against fp32 is tested on paired samples
        gap = rep["evaluate"]["checks"][f"int8_{rt}_vs_fp32_test"]
        assert gap["test"] == "paired bootstrap" and gap["of"] == "R² fp32 - int8"
        assert gap["low"] <= rep["evaluate"]["checks"][f"int8_{rt}_r2_drop"] <= gap["high"]


def test_a_failing_metric_gate_names_its_option_and_the_paired_test(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A gate on RMSE that int8 misses (no change allowed at all): the refusal says on how
    many validation samples, gives the paired bootstrap interval of the change (so a user
    can tell noise from a loss), and advises the option that sets this gate, not the
    output-error one (which a metric gate ignores)."""
    data, model = _diabetes_regressor(tmp_path, 1)
    rc = convert(["run", "--data-source", str(data), "--model-onnx", str(model),
                  "--model-task", "regress", "--model-gate", "rmse",
                  "--model-max-metric-change", "0", "--quantize-formats", '["onnx"]',
                  "--out", str(tmp_path / "o"), *QUICK, "--data-calibration-samples", "8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "int8 RMSE" in err and "fails the gate" in err, err
    assert "on 67 validation samples (RMSE int8 - fp32: paired bootstrap 95 % interval [" in err
    assert "try: allow more (--model-max-metric-change)" in err, err
    assert "--model-max-output-error" not in err
    assert not (tmp_path / "o").exists()
