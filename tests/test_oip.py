"""The API's wire parsers on untrusted bytes: a request parses or raises `ApiError` with a
4xx status, never anything else (hypothesis); and the binary tensor extension round-trips."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixture_trust import make_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import ApiError
from agent.serving import oip
from agent.serving.oip import infer_response, parse_infer
from agent.serving.runtime import pack, unpack
from agent.serving.tfs import parse_predict
from agent.trust.bundle import read_manifest
from agent.trust.manifest import Manifest, TensorSpec


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    m = read_manifest(make_bundle(tmp_path_factory.mktemp("m")))
    return m.model_copy(update={
        "inputs": [TensorSpec(name="x", dtype="float32", shape=[None, 4])],
        "outputs": [TensorSpec(name="y", dtype="float32", shape=[None, 2])]})


@pytest.fixture(scope="module")
def two(manifest: Manifest) -> Manifest:
    """A model with two inputs, u (3 features) and v (2 x 2)."""
    return manifest.model_copy(update={"inputs": [
        TensorSpec(name="u", dtype="float32", shape=[None, 3]),
        TensorSpec(name="v", dtype="float32", shape=[None, 2, 2])]})


def test_several_inputs_by_name_in_every_format_give_the_same_packed_batch(
        two: Manifest) -> None:
    """KServe v2 JSON (inputs in any order), binary parts (in the order the request lists
    the inputs), TF Serving rows and columns: the same batch, each sample's u values
    then its v values (`pack`)."""
    u = np.arange(6, dtype=np.float32).reshape(2, 3)
    v = -np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    want = np.array([[0, 1, 2, 0, -1, -2, -3], [3, 4, 5, -4, -5, -6, -7]], np.float32)
    np.testing.assert_array_equal(pack([u, v]), want)
    as_json = json.dumps({"inputs": [
        {"name": "v", "shape": [2, 2, 2], "datatype": "FP32", "data": v.ravel().tolist()},
        {"name": "u", "shape": [2, 3], "datatype": "FP32", "data": u.ravel().tolist()}]})
    head = json.dumps({"inputs": [
        {"name": "v", "shape": [2, 2, 2], "datatype": "FP32",
         "parameters": {"binary_data_size": 32}},
        {"name": "u", "shape": [2, 3], "datatype": "INT32",
         "parameters": {"binary_data_size": 24}}]}).encode()
    got = [parse_infer(as_json.encode(), two, None).x,
           parse_infer(head + v.tobytes() + u.astype(np.int32).tobytes(), two, len(head)).x,
           parse_predict(json.dumps({"instances": [{"u": a.tolist(), "v": b.tolist()}
                                                   for a, b in zip(u, v, strict=True)]}
                                    ).encode(), two)[0],
           parse_predict(json.dumps({"inputs": {"u": u.tolist(), "v": v.tolist()}}).encode(),
                         two)[0]]
    for x in got:
        np.testing.assert_array_equal(x, want)
    np.testing.assert_array_equal(unpack(want, [(3,), (2, 2)])[1], v)


@pytest.mark.parametrize(("inputs", "binary", "words"), [
    ([("u", [1, 3], [1, 2, 3])], b"", "1 inputs given; the model takes 2 inputs: 'u', 'v'"),
    ([("u", [1, 3], [1, 2, 3]), ("w", [1, 2, 2], [1] * 4)], b"",
     "unknown input 'w'; the model takes 2 inputs: 'u', 'v'"),
    ([("u", [1, 3], [1, 2, 3]), ("u", [1, 3], [1, 2, 3])], b"", "input 'u' given twice"),
    ([("u", [1, 3], [1, 2, 3]), ("v", [2, 2, 2], [1] * 8)], b"",
     "input v: 2 samples; input u has 1"),
    ([("u", [1, 3], 12), ("v", [1, 2, 2], 16)], b"\0" * 20,
     "binary_data_size add up to 28 bytes; the body has 20"),
])
def test_several_inputs_refused_name_what_the_model_takes(
        two: Manifest, inputs: list[tuple[str, list[int], Any]], binary: bytes,
        words: str) -> None:
    items = [{"name": n, "shape": shape, "datatype": "FP32",
              **({"parameters": {"binary_data_size": d}} if isinstance(d, int) else
                 {"data": d})} for n, shape, d in inputs]
    head = json.dumps({"inputs": items}).encode()
    with pytest.raises(ApiError, match=re.escape(words)) as err:
        parse_infer(head + binary, two, len(head) if binary else None)
    assert err.value.status == 400


def test_json_and_binary_requests_give_the_same_tensor(manifest: Manifest) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    as_json = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                      "data": x.ravel().tolist()}]}).encode()
    head = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 32}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
                      ).encode()
    a = parse_infer(as_json, manifest, None)
    b = parse_infer(head + x.tobytes(), manifest, len(head))
    np.testing.assert_array_equal(a.x, b.x)
    assert (a.binary_output, b.binary_output) == (False, True)
    body, n = infer_response(manifest, x[:, :2], request_id="r1", binary=True)
    assert n is not None
    meta = json.loads(body[:n])
    assert meta["id"] == "r1" and meta["outputs"][0]["parameters"]["binary_data_size"] == 16
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4").reshape(2, 2), x[:, :2])


def _outcome(parse: Any) -> tuple[Any, ...]:
    """What a parse gives, comparable: the request's fields and tensor, or the refusal."""
    try:
        r = parse()
    except ApiError as exc:
        return ("refused", exc.status, str(exc))
    return (r.id, r.binary_output, r.priority, r.timeout_ms, r.output_shm, r.x.dtype,
            r.x.shape, r.x.tobytes())


def test_a_binary_header_seen_before_parses_as_it_did_the_first_time(
        manifest: Manifest, two: Manifest) -> None:
    """Binary requests are parsed once per distinct header (`oip._PLANS`): a request with a
    header seen before gives what the full parse gives, with its own values (not the
    first request's), its values still checked, `reserve` still asked, and a model swapped
    in under the same header is checked anew."""
    rng = np.random.default_rng(3)
    head2 = json.dumps({"id": "a", "inputs": [
        {"name": "v", "shape": [2, 2, 2], "datatype": "FP32",
         "parameters": {"binary_data_size": 32}},
        {"name": "u", "shape": [2, 3], "datatype": "INT32",
         "parameters": {"binary_data_size": 24}}],
        "parameters": {"priority": "high", "timeout_ms": 50}}).encode()
    head1 = json.dumps({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP64",
                                    "parameters": {"binary_data_size": 96}}],
                        "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
                       ).encode()
    cases = [(two, head2, lambda: rng.normal(size=8).astype(np.float32).tobytes()
              + rng.integers(-9, 9, 6).astype(np.int32).tobytes()),
             (manifest, head1, lambda: rng.normal(size=12).tobytes())]
    for model, head, values in cases:
        for _ in range(3):  # the first parses in full, the next two find the header's plan
            body = head + values()
            fresh = _outcome(lambda b=body, m=model, h=head: oip._parse_infer(
                b, m, len(h), None, None))
            assert fresh[0] != "refused"
            assert _outcome(lambda b=body, m=model, h=head: parse_infer(b, m, len(h))) == fresh
    assert sum(m is manifest or m is two for m, _ in oip._PLANS.values()) >= 2  # planned
    nan = head1 + np.array([np.nan] * 12).tobytes()
    with pytest.raises(ApiError, match="input x: values must be finite"):
        parse_infer(nan, manifest, len(head1))
    asked: list[list[int]] = []

    def refuse(shape: list[int]) -> None:
        asked.append(shape)
        raise ApiError(413, "no room")

    for model, head, values in cases:
        with pytest.raises(ApiError, match="no room"):
            parse_infer(head + values(), model, len(head), refuse)
    assert asked == [[2, 7], [3, 4]]  # two inputs: the packed batch, 3 + 4 values a sample
    swapped = manifest.model_copy(update={
        "inputs": [TensorSpec(name="x", dtype="float32", shape=[None, 5])]})
    with pytest.raises(ApiError, match=re.escape("shape [3, 4] does not match the model's "
                                                 "[-1, 5]")):
        parse_infer(head1 + rng.normal(size=12).tobytes(), swapped, len(head1))


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"[1,2", 400, "JSON"),
    (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}]}',
     400, "2 values"),
    (b'{"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1]}]}',
     400, "does not match"),
    (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "BYTES", "data": [1]}]}',
     400, "datatype"),
    (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1,2,3,NaN]}]}',
     400, "JSON"),
    (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1,2,3,1e39]}]}',
     400, "finite"),
    (b'{"inputs": [{"name": "x", "shape": [99999999, 4], "datatype": "FP32", "data": []}]}',
     413, "too many"),
])
def test_bad_requests_name_the_problem(manifest: Manifest, body: bytes, status: int,
                                       words: str) -> None:
    with pytest.raises(ApiError, match=words) as err:
        parse_infer(body, manifest, None)
    assert err.value.status == status


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.sampled_from(["inputs", "name", "shape", "datatype", "data", "parameters",
                         "binary_data_size", "outputs", "id", "priority", "timeout_ms",
                         "instances", "x", "u", "v"]), c, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode())),
       header=st.one_of(st.none(), st.integers(-5, 300)))
def test_any_body_parses_or_is_a_4xx(manifest: Manifest, two: Manifest, body: bytes,
                                     header: int | None) -> None:
    for parse in (lambda: parse_infer(body, manifest, header),
                  lambda: parse_predict(body, manifest),
                  lambda: parse_infer(body, two, header),
                  lambda: parse_predict(body, two)):
        try:
            parse()
        except ApiError as exc:
            assert 400 <= exc.status < 500
    for model in (manifest, two):  # again, where a binary header may have left its plan
        if header is not None:
            assert _outcome(lambda m=model: parse_infer(body, m, header)) == _outcome(
                lambda m=model: oip._parse_infer(body, m, header, None, None))


def test_tf_serving_rows_and_columns(manifest: Manifest, tmp_path: Path) -> None:
    x, rows = parse_predict(b'{"instances": [[1,2,3,4],[5,6,7,8]]}', manifest)
    assert rows and x.shape == (2, 4)
    x, rows = parse_predict(b'{"inputs": {"x": [[1,2,3,4]]}}', manifest)
    assert not rows and x.shape == (1, 4)


def test_binary_answers_name_their_own_id_shape_and_model_version(manifest: Manifest) -> None:
    """The binary answer's JSON header is made once per (model, id, shape) and kept
    (`oip._HEADS`): each answer still names its own id, shape and the version serving it,
    and a long id is answered without being kept."""
    def head(m: Manifest, y: np.ndarray, rid: str | None) -> dict[str, Any]:
        body, n = infer_response(m, y, request_id=rid, binary=True)
        assert n is not None
        np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4").reshape(y.shape), y)
        return json.loads(body[:n])  # type: ignore[no-any-return]

    newer = manifest.model_copy(update={"version": manifest.version + 1})
    y1, y3 = np.ones((1, 2), np.float32), np.arange(6, dtype=np.float32).reshape(3, 2)
    for _ in range(2):  # made, then found
        a, b, c = head(manifest, y1, "a"), head(manifest, y3, None), head(newer, y3, "c")
        assert (a["id"], a["outputs"][0]["shape"], a["model_version"]) == (
            "a", [1, 2], str(manifest.version))
        assert "id" not in b and b["outputs"][0]["parameters"]["binary_data_size"] == 24
        assert (c["id"], c["model_version"]) == ("c", str(manifest.version + 1))
        assert head(manifest, y3, "c")["model_version"] == str(manifest.version)
    kept = len(oip._HEADS)
    assert head(manifest, y1, "x" * 10_000)["id"] == "x" * 10_000
    assert len(oip._HEADS) == kept
