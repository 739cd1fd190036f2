"""The two serving protocols as their clients use them, on a real agent with real models:
TensorFlow Serving's REST API as its documentation shows it (plain HTTP requests: model
metadata, status, labels, `:predict` in both formats with named-object instances,
`:classify`, `:regress`), and KServe v2's model repository through NVIDIA's tritonclient
(index, unload, load). Every documented route answers with its result or a 4xx naming what
to use; none answers 405."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import needs_onnxruntime
from fixture_agent import AgentProcess, digits_input, onnx_release, write_config

pytestmark = needs_onnxruntime

TOKEN = "s3cret-token-0123456789"


def _regressor(where: Path, keys: Path, *, outputs: int, name: str) -> Path:
    """A signed ONNX regressor release: (N, 1, 8, 8) -> (N, outputs), a fixed linear map."""
    import onnx
    from onnx import TensorProto, helper

    bundle = where / name
    bundle.mkdir()
    w = np.linspace(-1, 1, 64 * outputs, dtype=np.float32).reshape(64, outputs)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["m"]),
         helper.make_node("Add", ["m", "b"], ["output"])], name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", outputs])],
        [onnx.numpy_helper.from_array(w, "w"),
         onnx.numpy_helper.from_array(np.full(outputs, 0.5, np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              bundle / "model.onnx")
    return onnx_release(bundle, keys, where / f"{name}.tar.zst", name=name, version=1,
                        sample_shape=(1, 8, 8), task="regress", outputs=outputs)


@pytest.fixture
def served(tmp_path: Path, releases: dict[str, Path]) -> Iterator[tuple[AgentProcess, int]]:
    """An agent on the Unix socket and on TCP with a token, serving the digits classifier
    (ONNX) and two regressors (one value and two values per sample)."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "agent").mkdir()
    cfg = write_config(tmp_path / "agent", releases["keys"], profile="x86_64-generic",
                       api={"tcp_port": port, "token_file": str(token)})
    agent = AgentProcess(cfg).start()
    try:
        for archive in (releases["onnx1"],
                        _regressor(tmp_path, releases["keys"], outputs=1, name="energy"),
                        _regressor(tmp_path, releases["keys"], outputs=2, name="pose")):
            status, body = agent.install(archive)
            assert status == 200, body
        yield agent, port
    finally:
        agent.stop()


def _sample(i: int) -> list[Any]:
    return np.asarray(digits_input(1, seed=i), np.float32).reshape(1, 8, 8).tolist()


def test_tf_serving_metadata_status_and_labels_as_documented(
        served: tuple[AgentProcess, int]) -> None:
    agent, _ = served
    # Model status and metadata (clients ask for the metadata first).
    status, st = agent.call("GET", "/v1/models/digits")
    assert status == 200 and st["model_version_status"][0]["state"] == "AVAILABLE", st
    status, meta = agent.call("GET", "/v1/models/digits/metadata")
    assert status == 200, meta
    assert meta["model_spec"] == {"name": "digits", "signature_name": "", "version": "1"}
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    default = sigs["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    ((in_name, spec),) = default["inputs"].items()
    assert in_name == "input"  # the digits model's
    assert spec["dtype"] == "DT_FLOAT" and spec["tensor_shape"] == {
        "dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""},
                {"size": "8", "name": ""}, {"size": "8", "name": ""}], "unknown_rank": False}
    (_, out_spec), = default["outputs"].items()
    assert [d["size"] for d in out_spec["tensor_shape"]["dim"]] == ["-1", "10"]
    assert sigs["classification"]["method_name"] == "tensorflow/serving/classify"
    assert "regression" not in sigs
    assert agent.call("GET", "/v1/models/digits/versions/1/metadata")[1] == meta
    status, err = agent.call("GET", "/v1/models/digits/versions/7/metadata")
    assert status == 404 and "serves version 1" in err["error"], err
    regress_sigs = agent.call("GET", "/v1/models/energy/metadata")[1]["metadata"][
        "signature_def"]["signature_def"]
    assert regress_sigs["regression"]["method_name"] == "tensorflow/serving/regress"

    # Version labels: none (one version per model), said in a 404 that names what to use.
    for method, path in (("GET", "/v1/models/digits/labels/stable"),
                         ("GET", "/v1/models/digits/labels/stable/metadata"),
                         ("POST", "/v1/models/digits/labels/canary:predict")):
        status, err = agent.call(method, path, {"instances": [_sample(0)]})
        assert status == 404 and "version labels are not supported" in err["error"], err
        assert "/v1/models/digits/versions/N" in err["error"]



def test_tf_serving_predict_classify_and_regress_as_documented(
        served: tuple[AgentProcess, int]) -> None:
    agent, _ = served
    sigs = agent.call("GET", "/v1/models/digits/metadata")[1]["metadata"]["signature_def"]
    (in_name,) = sigs["signature_def"]["serving_default"]["inputs"]
    # :predict, row format: values, and named objects ({input name: sample}); columnar.
    samples = [_sample(i) for i in range(3)]
    status, rows = agent.call("POST", "/v1/models/digits:predict", {"instances": samples})
    assert status == 200, rows
    logits = np.asarray(rows["predictions"], np.float32)
    assert logits.shape == (3, 10)
    named = agent.call("POST", "/v1/models/digits:predict", {
        "signature_name": "serving_default", "instances": [{in_name: s} for s in samples]})
    assert named[0] == 200 and np.allclose(named[1]["predictions"], logits, atol=1e-6)
    columnar = agent.call("POST", "/v1/models/digits/versions/1:predict",
                          {"inputs": {in_name: samples}})
    assert columnar[0] == 200 and np.allclose(columnar[1]["outputs"], logits, atol=1e-6)
    for body, says in (({"signature_name": "other", "instances": samples}, "signature_name"),
                       ({"instances": [{"x": samples[0]}]}, f"input {in_name!r}"),
                       ({"instances": [{in_name: samples[0]}, samples[1]]}, "all objects"),
                       ({"instances": samples, "extra": 1}, "unknown keys")):
        status, err = agent.call("POST", "/v1/models/digits:predict", body)
        assert status == 400 and says in err["error"], (body, err)

    # :classify: every class's label and score per example, in the model's order; the
    # scores are the softmax of the logits (written out here); a context feature is shared.
    flat = [np.ravel(s).tolist() for s in samples]
    status, out = agent.call("POST", "/v1/models/digits:classify",
                             {"examples": [{in_name: f} for f in flat]})
    assert status == 200, out
    z = np.exp(logits - logits.max(1, keepdims=True))
    want = z / z.sum(1, keepdims=True)
    labels = agent.call("GET", "/v2/models/digits")[1]["parameters"]["labels"]
    assert len(out["result"]) == 3
    for row, p in zip(out["result"], want, strict=True):
        assert [label for label, _ in row] == labels
        assert np.allclose([score for _, score in row], p, atol=1e-5)
    shared = agent.call("POST", "/v1/models/digits:classify", {
        "signature_name": "classification", "context": {in_name: flat[0]}, "examples": [{}]})
    assert shared[0] == 200 and shared[1]["result"][0] == out["result"][0]
    status, err = agent.call("POST", "/v1/models/digits:classify",
                             {"examples": [{in_name: flat[0][:10]}]})
    assert status == 400 and "10 values, the model takes 64 per example" in err["error"], err

    # :regress: one value per example from a regressor, equal to its :predict.
    status, out = agent.call("POST", "/v1/models/energy:regress",
                             {"examples": [{"input": f} for f in flat]})
    assert status == 200, out
    pred = agent.call("POST", "/v1/models/energy:predict", {"instances": samples})[1]
    assert np.allclose(out["result"], np.ravel(pred["predictions"]), atol=1e-6)

    # The verbs a model cannot answer: 400 naming the one to use, never 405.
    for path, says in (("/v1/models/digits:regress", "is not a regressor (task classify)"),
                       ("/v1/models/energy:classify", "is not a classifier (task regress)"),
                       ("/v1/models/pose:regress", "returns 2 values per example")):
        status, err = agent.call("POST", path, {"examples": [{"input": flat[0]}]})
        assert status == 400 and says in err["error"] and ":predict" in err["error"], err
    status, err = agent.call("POST", "/v1/models/nope:classify", {"examples": [{}]})
    assert status == 404, err


def test_kserve_model_repository_through_tritonclient(served: tuple[AgentProcess, int]
                                                      ) -> None:
    """`/v2` advertises model_repository: tritonclient's index, unload and load work on
    installed models; an unloaded model is not ready and refuses inference until loaded
    (a request does not load it behind the client's back)."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    agent, port = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert "model_repository" in client.get_server_metadata(headers=auth)["extensions"]
    index = {m["name"]: m for m in client.get_model_repository_index(headers=auth)}
    assert {n: m["state"] for n, m in index.items()} == {
        "digits": "READY", "energy": "READY", "pose": "READY"}

    def infer() -> np.ndarray:
        inp = triton.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(np.asarray(_sample(0), np.float32)[None])
        result = client.infer("digits", [inp], headers=dict(auth))
        return result.as_numpy(result.get_response()["outputs"][0]["name"])

    before = infer()
    client.unload_model("digits", headers=auth)
    assert not client.is_model_ready("digits", headers=auth)
    index = {m["name"]: m for m in client.get_model_repository_index(headers=auth)}
    assert index["digits"]["state"] == "UNAVAILABLE", index
    assert "unloaded through the repository API" in index["digits"]["reason"]
    with pytest.raises(InferenceServerException, match="repository/models/digits/load"):
        infer()
    metrics = agent.call("GET", "/metrics")[1]  # its memory is given back
    assert 'edge_agent_resident_model_bytes{model="digits"}' not in metrics
    assert 'edge_agent_resident_model_bytes{model="energy"}' in metrics
    assert client.is_model_ready("energy", headers=auth)  # the others are untouched

    client.load_model("digits", headers=auth)
    assert client.is_model_ready("digits", headers=auth)
    assert np.allclose(infer(), before, atol=1e-6)
    with pytest.raises(InferenceServerException, match="only installed models load"):
        client.load_model("nope", headers=auth)
    with pytest.raises(InferenceServerException, match="take no parameters"):
        client.load_model("digits", headers=auth, config=json.dumps({"backend": "python"}))
    client.close()
