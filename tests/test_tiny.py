"""The MLPerf Tiny reference models and the quantize-only path.

The four reference architectures have their reference sizes; a trained model goes through
`edge-convert run` without a teacher (`[model]`): the autoencoder gated on output error,
with its anomaly AUC in the report and its reconstruction-error threshold in the bundle; the
agent serves it and its detectors flag anomalous inputs by reconstruction error; a
classifier (DS-CNN) quantized as trained is gated on accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixture_agent import AgentProcess, make_keys, write_config

from agent.config import Thresholds
from agent.link.detectors import Window, drift_anomalies
from agent.serving.runtime import open_model, with_preprocessing
from agent.serving.scheduler import Resident
from agent.trust.manifest import parse_manifest
from converter import tiny
from converter.cli import main as convert
from converter.examples import tiny as examples
from converter.students import fold_batchnorm, param_count
from fleet.trust.keys import KeyDir
from fleet.trust.release import pack_bundle, sign_bundle

PROFILE = "x86_64-generic"
QUICK = ["--evaluate-latency-runs", "10", "--data-calibration-samples", "64"]

# family -> input shape, classes, (parameters, MACs) of the reference (MLPerf Tiny v0.5:
# ResNet-8 78k / 12.5M, DS-CNN ~23k / ~3M, MobileNetV1 0.25 ~210k / 7.5M, FC-AE 270k / 264k).
REFERENCE = {
    "resnet8": ((3, 32, 32), 10, (77_000, 79_000), (12_000_000, 13_000_000)),
    "kws-dscnn": ((1, 49, 10), 12, (22_000, 40_000), (2_500_000, 3_500_000)),
    "mobilenet-v1": ((3, 96, 96), 2, (200_000, 225_000), (7_000_000, 8_000_000)),
    "fc-autoencoder": ((640,), 0, (260_000, 275_000), (260_000, 270_000)),
}


@pytest.mark.parametrize("family", sorted(REFERENCE))
def test_reference_families_have_their_reference_sizes_and_fold_exactly(family: str) -> None:
    shape, classes, (p_lo, p_hi), (m_lo, m_hi) = REFERENCE[family]
    torch.manual_seed(0)
    model = tiny.build(family, shape, classes)
    assert p_lo <= param_count(model) <= p_hi, param_count(model)
    assert m_lo <= tiny.macs(model, shape) <= m_hi, tiny.macs(model, shape)
    for m in model.modules():  # BN statistics that folding must carry over
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, *shape)
    model.eval()
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(model)
        after = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)
                   for m in folded.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    out_shape = shape if family == "fc-autoencoder" else (classes,)
    assert tuple(after.shape[1:]) == out_shape


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(example dir, converter output) of the FC autoencoder trained on generated machine
    spectra and quantized as trained."""
    where = tmp_path_factory.mktemp("ad")
    examples.write_example(where, case="ad", small=True, epochs=25)
    out = where / "out"
    assert convert(["run", str(where / "recipe.toml"), "--out", str(out),
                    "--target-profile", PROFILE, *QUICK]) == 0
    return where, out


def test_the_autoencoder_is_quantized_as_trained_and_gated_on_output_error(
        autoencoder: tuple[Path, Path]) -> None:
    _, out = autoencoder
    rep = json.loads((out / "report.json").read_text())
    ev = rep["evaluate"]
    assert ev["task"] == "reconstruct" and ev["role"] == "model"
    rows = {(m["name"], m["runtime"]): m for m in ev["models"]}
    assert set(rows) >= {("model fp32", "onnx"), ("model int8", "onnx"),
                         ("model int8", "tflite")}
    assert "teacher" not in {m["name"] for m in ev["models"]}
    fp32 = rows[("model fp32", "onnx")]
    assert fp32["output_error"] < 1e-4  # the ONNX export of the torch model
    for rt in ("onnx", "tflite"):
        m = rows[("model int8", rt)]
        assert 0 < m["output_error"] < 0.1, m
        assert fp32["anomaly_auc"] > 0.7, fp32
        assert abs(m["anomaly_auc"] - fp32["anomaly_auc"]) < 0.03, m
        assert ev["checks"][f"int8_{rt}_within_tolerance"]
    assert rep["quantize"]["gate"].startswith("output error")
    text = (out / "report.md").read_text()
    assert "Quantize only" in text and "anomaly AUC" in text
    m = parse_manifest((out / "bundle/manifest.json").read_bytes())
    assert m.task == "reconstruct" and m.labels == []
    assert m.reference.output.score is not None and m.reference.output.confidence is None
    assert m.reference.output.score.threshold > 0
    assert m.outputs[0].shape == m.inputs[0].shape


def test_a_failing_output_error_gate_names_the_figures(autoencoder: tuple[Path, Path],
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    where, _ = autoencoder
    rc = convert(["run", str(where / "recipe.toml"), "--out", str(tmp_path / "o"),
                  "--target-profile", PROFILE, "--model-max-output-error", "1e-6",
                  "--quantize-formats", '["onnx"]', *QUICK])
    assert rc == 2
    err = capsys.readouterr().err
    assert "int8 output error (NRMSE vs fp32)" in err and "fails the gate" in err, err
    # advice in options a quantize-only run accepts (never --data-normalize, refused here)
    assert "try: allow more (--model-max-output-error)" in err
    assert "--data-normalize" not in err
    assert not (tmp_path / "o").exists()


def _anomalies(resident: Resident, x: np.ndarray) -> list[str]:
    resident.drift_batches.append((x, resident.model.run(x)))
    sample = resident.take_drift()
    assert sample is not None and sample.samples == len(x)
    w = Window(model="tiny-ad", seconds=10, requests=sample.samples,
               input_counts=list(sample.input_counts),
               score_counts=list(sample.score_counts), over_threshold=sample.over_threshold)
    return [f"{a.detector}/{a.statistic}"
            for a in drift_anomalies(w, resident.manifest.reference, Thresholds())]


def test_the_agent_serves_the_autoencoder_and_flags_inputs_it_cannot_reconstruct(
        autoencoder: tuple[Path, Path], tmp_path: Path) -> None:
    """Installed signed (the install self-test compares reconstructions), served on the
    local API as the converter's int8 model answers; the reconstruction error of normal
    samples stays under the manifest's threshold, anomalous ones go over it and the
    detectors fire on them and not on the normal ones."""
    where, out = autoencoder
    bundle = out / "bundle"
    keys = make_keys(tmp_path / "keys")
    kd = KeyDir(keys)
    sign_bundle(bundle, kd.keys_of(kd.root(), "release", None))
    m = parse_manifest((bundle / "manifest.json").read_bytes())
    with np.load(where / "data.npz") as npz:
        x, y = npz["x"].astype(np.float32), npz["y"]
    normal, anomalous = x[y == 0][:100], x[y == 1][:40]
    agent = AgentProcess(write_config(tmp_path / "dev", keys, profile=PROFILE)).start()
    try:
        status, body = agent.install(pack_bundle(bundle, tmp_path / "ad.tar.zst"))
        assert status == 200 and "passed" in str(body["selftest"]), body
        status, res = agent.call("POST", "/v2/models/tiny-ad/infer", {
            "inputs": [{"name": m.inputs[0].name, "shape": list(normal[:20].shape),
                        "datatype": "FP32", "data": normal[:20].ravel().tolist()}]})
        assert status == 200, res
        got = np.asarray(res["outputs"][0]["data"], np.float32).reshape(20, 640)
        want = open_model(bundle / m.model_file, m.runtime).run(normal[:20])
        np.testing.assert_allclose(got, want, atol=1e-5)
    finally:
        assert agent.stop() == 0, agent.log
    resident = Resident("tiny-ad", m, with_preprocessing(
        open_model(bundle / m.model_file, m.runtime), m), 0, True)
    assert _anomalies(resident, normal) == []
    fired = _anomalies(resident, anomalous)
    assert "anomalous_samples/over_threshold_rate" in fired, fired


def test_a_classifier_quantized_as_trained_is_gated_on_accuracy(tmp_path: Path) -> None:
    """DS-CNN trained on generated keyword features: no teacher row, accuracy gate."""
    examples.write_example(tmp_path, case="kws", small=True, epochs=8)
    out = tmp_path / "out"
    assert convert(["run", str(tmp_path / "recipe.toml"), "--out", str(out),
                    "--target-profile", PROFILE, *QUICK]) == 0
    rep = json.loads((out / "report.json").read_text())
    rows = {(m["name"], m["runtime"]): m for m in rep["evaluate"]["models"]}
    assert rep["evaluate"]["task"] == "classify"
    fp32 = rows[("model fp32", "onnx")]["accuracy"]
    assert fp32 > 0.5
    for rt in ("onnx", "tflite"):
        drop = rep["evaluate"]["checks"][f"int8_{rt}_drop_points"]
        assert drop <= rep["quantize"]["tolerance_points"] + 1e-9
    m = parse_manifest((out / "bundle/manifest.json").read_bytes())
    assert m.task == "classify" and m.labels == examples.KWS_LABELS
    assert rep["student"]["family"] == "trained model"


def test_an_onnx_model_is_quantized_to_int8_onnx_and_tflite(
        autoencoder: tuple[Path, Path], tmp_path: Path) -> None:
    """A model from another framework comes as ONNX: int8 ONNX, and int8 TFLite through
    onnx2torch (it was refused: "int8 TFLite is built from a torch model"), both gated on
    output error."""
    where, _ = autoencoder
    model = examples.ad()
    model.load_state_dict(torch.load(where / "model.pt", weights_only=True))
    model.eval()
    onnx_file = tmp_path / "ae.onnx"
    torch.onnx.export(model, (torch.zeros(1, 640),), str(onnx_file), input_names=["spectra"],
                      dynamo=True, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    out = tmp_path / "out"
    assert convert(["run", "--data-source", str(where / "data.npz"), "--model-onnx",
                    str(onnx_file), "--model-task", "reconstruct", "--target-profile", PROFILE,
                    *QUICK, "--out", str(out)]) == 0
    m = parse_manifest((out / "bundle/manifest.json").read_bytes())
    assert m.runtime == "onnx" and m.task == "reconstruct"
    assert m.inputs[0].name == "spectra"
    rep = json.loads((out / "report.json").read_text())
    assert rep["quantize"]["tflite"]["route"] == "onnx2torch -> PT2E"
    for rt in ("onnx", "tflite"):  # the gate's figure: output error on validation
        assert -rep["quantize"][rt]["val_int8"] <= rep["quantize"]["max_output_error"]


@pytest.mark.parametrize(("options", "message"), [
    (["--teacher-onnx", "t.onnx"], "not both"),
    (["--prune-method", "unstructured"], "prune.method must be none"),
    (["--data-normalize", "standard"], "data.normalize must be auto or none"),
])
def test_quantize_only_refuses_options_that_need_a_teacher(
        options: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    rc = convert(["run", "--model-torch", "converter.examples.tiny:ad", "--model-weights",
                  str(tmp_path / "w.pt"), "--out", str(tmp_path / "o"), *options])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_a_non_classifier_task_needs_a_trained_model(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    assert convert(["run", "--model-task", "reconstruct", "--out", str(tmp_path / "o")]) == 2
    assert "distillation is for classifiers" in capsys.readouterr().err


def test_the_anomaly_auc_is_the_roc_auc_ties_included() -> None:
    from sklearn.metrics import roc_auc_score

    from converter.task import roc_auc

    rng = np.random.default_rng(0)
    for _ in range(20):
        score = rng.integers(0, 6, 200).astype(float)  # many ties
        labels = rng.random(200) < 0.3
        assert roc_auc(score, labels) == pytest.approx(roc_auc_score(labels, score), abs=1e-12)
    assert roc_auc(np.ones(5), np.zeros(5, bool)) is None
