"""TensorFlow Serving's REST formats, without I/O: `:predict` (row and columnar formats,
named-object instances), `:classify` and `:regress` (tf.Example features as JSON), and the
model metadata (a SignatureDef map as TF Serving returns it).

Like `agent.serving.oip`, every parser takes untrusted bytes and either returns a float32
batch or raises `ApiError` (4xx and a message naming the problem).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ApiError
from agent.serving.oip import MAX_ELEMENTS, check_shape, json_array, json_body
from agent.serving.runtime import pack
from agent.trust.manifest import Manifest, TensorSpec

F32 = npt.NDArray[np.float32]

#: The signature names a request may give: TF Serving's default, and the ones the
#: metadata lists for classification and regression.
PREDICT_SIGNATURE = "serving_default"
SIGNATURES = {"classify": "classification", "regress": "regression"}
PREDICT_KEYS = {"signature_name", "instances", "inputs"}
EXAMPLE_KEYS = {"signature_name", "context", "examples"}


def _signature(req: dict[str, Any], allowed: tuple[str, ...]) -> None:
    name = req.get("signature_name", "")
    if not isinstance(name, str) or name not in ("", *allowed):
        raise ApiError(400, f"signature_name {str(name)[:64]!r} is not one of this model's: "
                       f"{', '.join(allowed)}")


def _values(spec: TensorSpec, data: Any, what: str) -> F32:
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ApiError(400, f"{what} must be nested lists of numbers of one shape") from exc
    if arr.size > MAX_ELEMENTS:
        raise ApiError(413, "too many elements")
    if not np.isfinite(arr).all():
        raise ApiError(400, "values must be finite")
    return arr


def _named(spec: TensorSpec, item: dict[str, Any], what: str) -> Any:
    if list(item) != [spec.name]:
        names = ", ".join(repr(k)[:40] for k in list(item)[:4])
        raise ApiError(400, f"{what} must name exactly the model's input {spec.name!r}, "
                       f"not {names or 'nothing'}")
    return item[spec.name]


def parse_predict(body: bytes, manifest: Manifest) -> tuple[F32, bool]:
    """`:predict`: {"instances": [...]} (row format: values, or objects naming the input)
    or {"inputs": ...} (columnar: values, or an object naming the input). Returns the batch
    and whether the row format was used.

    Raises:
        ApiError: 400 malformed or wrong shape.
    """
    req = json_body(body)
    if not isinstance(req, dict) or ("instances" in req) == ("inputs" in req):
        raise ApiError(400, "body must have exactly one of 'instances' or 'inputs'")
    if set(req) - PREDICT_KEYS:
        raise ApiError(400, f"unknown keys {sorted(set(req) - PREDICT_KEYS)[:4]}; a predict "
                       "request has signature_name and one of instances or inputs")
    _signature(req, (PREDICT_SIGNATURE,))
    spec = manifest.inputs[0]
    rows = "instances" in req
    data = req["instances"] if rows else req["inputs"]
    if len(manifest.inputs) > 1:
        return _several(manifest.inputs, data, rows), rows
    if isinstance(data, dict):
        data = _named(spec, data, "inputs as an object")
    if not isinstance(data, list) or not data:
        raise ApiError(400, "instances/inputs must be a non-empty list")
    if rows and isinstance(data[0], dict):  # [{"x": [...]}, {"x": [...]}]
        if not all(isinstance(d, dict) for d in data):
            raise ApiError(400, "instances must be all objects or all values")
        data = [_named(spec, d, "each instance") for d in data]
    arr = _values(spec, data, "instances")
    check_shape(spec, list(arr.shape) if arr.ndim else [])
    return arr, rows


def _several(specs: list[TensorSpec], data: Any, rows: bool) -> F32:
    """A model with several inputs: rows are objects naming every input
    ([{"u": ..., "v": ...}, ...]), columns one object ({"u": [...], "v": [...]}); the
    inputs packed side by side (`agent.serving.runtime.pack`).

    Raises:
        ApiError: 400 naming the inputs when one is missing, unknown or of another batch.
    """
    names = [s.name for s in specs]
    takes = f"the model takes {len(names)} inputs: {', '.join(map(repr, names))}"
    if rows:
        if not isinstance(data, list) or not data or not all(isinstance(d, dict)
                                                             for d in data):
            raise ApiError(400, f"instances must be a non-empty list of objects naming "
                           f"every input; {takes}")
        items: list[dict[str, Any]] = data
    elif isinstance(data, dict):
        items = [data]
    else:
        raise ApiError(400, f"inputs must be an object naming every input; {takes}")
    for item in items:
        if sorted(item) != sorted(names):
            got = ", ".join(repr(k)[:40] for k in list(item)[:6])
            raise ApiError(400, f"{'each instance' if rows else 'inputs'} names {got or 'nothing'}"
                           f"; {takes}")
    parts: list[F32] = []
    for spec in specs:
        values = [item[spec.name] for item in items] if rows else items[0][spec.name]
        arr = _values(spec, values, f"input {spec.name}")
        check_shape(spec, list(arr.shape) if arr.ndim else [])
        if parts and len(arr) != len(parts[0]):
            raise ApiError(400, f"input {spec.name}: {len(arr)} samples; input "
                           f"{specs[0].name} has {len(parts[0])}")
        parts.append(arr)
    return pack(parts)


def predict_response(y: F32, rows: bool) -> bytes:
    key = "predictions" if rows else "outputs"
    return b'{"' + key.encode() + b'":' + json_array(y) + b"}"


def parse_examples(body: bytes, manifest: Manifest, verb: str) -> F32:
    """`:classify` / `:regress`: {"signature_name": ..., "context": {...}, "examples":
    [{feature: values}, ...]}. The one feature is the model's input, its values flat or
    nested as one sample; a feature in `context` is shared by every example.

    Raises:
        ApiError: 400 when the model is not of the verb's kind or the body is malformed.
    """
    check_verb(manifest, verb)
    req = json_body(body)
    if not isinstance(req, dict) or not isinstance(req.get("examples"), list) \
            or not req["examples"]:
        raise ApiError(400, "body must have 'examples': a non-empty list of objects "
                       "{feature name: values}")
    if set(req) - EXAMPLE_KEYS:
        raise ApiError(400, f"unknown keys {sorted(set(req) - EXAMPLE_KEYS)[:4]}; a {verb} "
                       "request has signature_name, context and examples")
    _signature(req, (PREDICT_SIGNATURE, SIGNATURES[verb]))
    context = req.get("context", {})
    if not isinstance(context, dict):
        raise ApiError(400, "context must be an object {feature name: values}")
    if len(manifest.inputs) > 1:
        for ex in req["examples"]:
            if not isinstance(ex, dict):
                raise ApiError(400, "each example must be an object {feature name: values}")
        full = [{**context, **ex} for ex in req["examples"]]
        return _several(manifest.inputs, full, True)
    spec = manifest.inputs[0]
    sample = spec.shape[1:]
    if any(d is None for d in sample):
        raise ApiError(400, f"input {spec.name} has a free dimension {spec.shape}: send "
                       "examples through :predict")
    fixed = [d for d in sample if d is not None]
    size = math.prod(fixed)
    rows = []
    for ex in req["examples"]:
        if not isinstance(ex, dict):
            raise ApiError(400, "each example must be an object {feature name: values}")
        arr = _values(spec, _named(spec, {**context, **ex}, "each example"), "features")
        if arr.size != size:
            raise ApiError(400, f"feature {spec.name}: {arr.size} values, the model takes "
                           f"{size} per example (shape {fixed})")
        rows.append(arr.reshape(fixed))
    if len(rows) * size > MAX_ELEMENTS:
        raise ApiError(413, "too many elements")
    return np.stack(rows).astype(np.float32)


def check_verb(manifest: Manifest, verb: str) -> None:
    """`:classify` needs a classifier, `:regress` a regressor with one value per example
    (TF Serving's RegressionResult has one)."""
    if verb == "classify" and manifest.task != "classify":
        raise ApiError(400, f"model {manifest.name} is not a classifier (task "
                       f"{manifest.task}): use :predict")
    if verb == "regress":
        values = math.prod(d or 1 for d in manifest.outputs[0].shape[1:])
        if manifest.task != "regress" or values != 1:
            kind = (f"returns {values} values per example" if manifest.task == "regress"
                    else f"is not a regressor (task {manifest.task})")
            raise ApiError(400, f"model {manifest.name} {kind}; :regress returns one value "
                           "per example: use :predict")


def class_scores(y: F32) -> F32:
    """Scores per class: the model's outputs when they already are a distribution (each row
    non-negative, summing to 1), else their softmax (the converter's models end in logits;
    the same softmax gives the confidence the drift detector watches)."""
    y = np.asarray(y, np.float32).reshape(len(y), -1)
    if (y >= 0).all() and np.allclose(y.sum(1), 1.0, atol=1e-3):
        return y
    z = np.exp(y - y.max(1, keepdims=True))
    return np.asarray(z / z.sum(1, keepdims=True), np.float32)


def classify_response(manifest: Manifest, y: F32) -> bytes:
    """{"result": [[[label, score], ...] per example]}, every class in the model's order."""
    p = class_scores(y)
    labels = manifest.labels or [str(i) for i in range(p.shape[1])]
    result = [[[labels[j] if j < len(labels) else str(j), round(float(v), 7)]
               for j, v in enumerate(row)] for row in p]
    return json.dumps({"result": result}, separators=(",", ":")).encode()


def regress_response(y: F32) -> bytes:
    return b'{"result":' + json_array(np.asarray(y, np.float32).reshape(-1)) + b"}"


def _tensor_info(prefix: str, spec: TensorSpec) -> dict[str, Any]:
    return {"dtype": "DT_FLOAT", "name": f"{prefix}_{spec.name}:0",
            "tensor_shape": {"dim": [{"size": str(-1 if i == 0 or d is None else d),
                                      "name": ""} for i, d in enumerate(spec.shape)],
                             "unknown_rank": False}}


def model_metadata(manifest: Manifest) -> dict[str, Any]:
    """GetModelMetadataResponse as TF Serving's REST API prints it: the model spec and a
    SignatureDef map with `serving_default` (predict) and, for a classifier or a regressor,
    the signature `:classify` or `:regress` answers (tf.Example features in; classes and
    scores, or one value, out)."""
    out = manifest.outputs[0]
    sigs: dict[str, Any] = {PREDICT_SIGNATURE: {
        "inputs": {inp.name: _tensor_info(PREDICT_SIGNATURE, inp) for inp in manifest.inputs},
        "outputs": {out.name: _tensor_info(PREDICT_SIGNATURE, out)},
        "method_name": "tensorflow/serving/predict"}}
    examples = {"inputs": {"dtype": "DT_STRING", "name": "tf_example:0", "tensor_shape": {
        "dim": [{"size": "-1", "name": ""}], "unknown_rank": False}}}
    if manifest.task == "classify":
        classes = len(manifest.labels) or out.shape[-1] or -1
        dims = [{"size": "-1", "name": ""}, {"size": str(classes), "name": ""}]
        sigs[SIGNATURES["classify"]] = {"inputs": examples, "outputs": {
            "classes": {"dtype": "DT_STRING", "name": "classes:0",
                        "tensor_shape": {"dim": dims, "unknown_rank": False}},
            "scores": {"dtype": "DT_FLOAT", "name": "scores:0",
                       "tensor_shape": {"dim": dims, "unknown_rank": False}}},
            "method_name": "tensorflow/serving/classify"}
    elif manifest.task == "regress":
        sigs[SIGNATURES["regress"]] = {"inputs": examples, "outputs": {
            "outputs": {"dtype": "DT_FLOAT", "name": "outputs:0", "tensor_shape": {
                "dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""}],
                "unknown_rank": False}}},
            "method_name": "tensorflow/serving/regress"}
    return {"model_spec": {"name": manifest.name, "signature_name": "",
                           "version": str(manifest.version)},
            "metadata": {"signature_def": {"signature_def": sigs}}}
