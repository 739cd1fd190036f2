"""The bundle manifest: canonical bytes, strict parsing, file checks against tampering."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from fixture_trust import make_bundle
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import BundleError
from agent.trust.bundle import check_files, read_manifest
from agent.trust.manifest import canonical_json, parse_manifest


def test_canonical_json_is_sorted_compact_and_round_trips(tmp_path: Path) -> None:
    raw = (make_bundle(tmp_path) / "manifest.json").read_bytes()
    data = json.loads(raw)
    assert raw == json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    assert canonical_json(parse_manifest(raw)) == raw
    assert data["schema"] == 1


def test_a_classifier_manifest_has_no_field_older_agents_do_not_know(tmp_path: Path) -> None:
    """`task` and `reference.output.score` came after schema 1 shipped; a classifier's
    manifest leaves them out (older agents refuse unknown fields) and reads back as a
    classifier."""
    raw = canonical_json(read_manifest(make_bundle(tmp_path)))
    data = json.loads(raw)
    assert "task" not in data and "score" not in data["reference"]["output"]
    m = parse_manifest(raw)
    assert m.task == "classify" and m.reference.output.score is None
    assert canonical_json(m) == raw


def test_an_intact_bundle_checks_out(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    check_files(bundle, read_manifest(bundle))


@pytest.mark.parametrize(("tamper", "check"), [
    (lambda b: (b / "model.tflite").write_bytes(b"\x01" + (b / "model.tflite").read_bytes()[1:]),
     "sha256"),
    (lambda b: (b / "model.tflite").write_bytes((b / "model.tflite").read_bytes() + b"x"), "size"),
    (lambda b: (b / "model.tflite").write_bytes((b / "model.tflite").read_bytes()[:-1]),
     "truncated"),
    (lambda b: (b / "model.tflite").unlink(), "missing"),
    (lambda b: (b / "extra.bin").write_bytes(b"hi"), "unlisted"),
])
def test_tampered_files_are_refused_with_the_check_named(  # type: ignore[no-untyped-def]
        tmp_path: Path, tamper, check: str) -> None:
    bundle = make_bundle(tmp_path)
    tamper(bundle)
    with pytest.raises(BundleError) as err:
        check_files(bundle, read_manifest(bundle))
    assert err.value.check == check


@pytest.mark.parametrize("path", ["../evil", "/etc/passwd", "a//b", "./x", "a/../../b"])
def test_manifest_refuses_paths_that_leave_the_bundle(tmp_path: Path, path: str) -> None:
    data = json.loads((make_bundle(tmp_path) / "manifest.json").read_bytes())
    data["files"][path] = data["files"]["selftest.npz"]
    with pytest.raises(BundleError, match="files"):
        parse_manifest(json.dumps(data).encode())


def test_manifest_refuses_a_name_that_is_both_file_and_directory(tmp_path: Path) -> None:
    """A signed manifest listing `x` and `x/y` once made unpacking raise FileExistsError
    (and the MQTT deploy send no result)."""
    data = json.loads((make_bundle(tmp_path) / "manifest.json").read_bytes())
    data["files"]["x"] = data["files"]["x/y"] = data["files"]["selftest.npz"]
    with pytest.raises(BundleError, match="both as a file and as a directory"):
        parse_manifest(json.dumps(data).encode())


@pytest.mark.parametrize(("change", "message"), [
    ({"axis": "feature", "scale": [1.0, 2.0], "offset": [0.0, 0.0]},
     "axis 'feature' on input .1, 4. needs 4"),
    ({"axis": "channel", "scale": [1.0] * 3, "offset": [0.0] * 3}, "needs 4"),
    ({"axis": "tensor", "scale": [1.0, 2.0], "offset": [0.0, 0.0]}, "takes one scale"),
    ({"axis": "feature", "scale": [1.0] * 4, "offset": [0.0] * 3}, "offset 3"),
    ({"scale": [0.0]}, "must not contain 0"),
    ({"scale": [1e309]}, "Infinity is not JSON"),
    ({"layout": "NCHW"}, "does not fit input samples"),
    ({"scale": [1.0] * 70000, "offset": [0.0] * 70000}, "at most 65536"),
])
def test_preprocessing_that_does_not_fit_the_input_is_refused(
        tmp_path: Path, change: dict[str, object], message: str) -> None:
    """The agent applies these arrays to every sample: a length that does not broadcast
    over the input, a zero or infinite scale is refused when the manifest is parsed."""
    data = json.loads((make_bundle(tmp_path) / "manifest.json").read_bytes())
    data["preprocessing"].update(change)
    with pytest.raises(BundleError, match=message):
        parse_manifest(json.dumps(data).encode())


def _two_inputs(u: list[int | None], v: list[int | None], name_v: str = "v"
                ) -> list[dict[str, object]]:
    return [{"name": "u", "dtype": "float32", "shape": u},
            {"name": name_v, "dtype": "float32", "shape": v}]


@pytest.mark.parametrize(("inputs", "preprocessing", "message"), [
    (_two_inputs([None, 3], [None, 2, 2]), None, None),
    (_two_inputs([1, 3], [1, 2, 2]), None, None),
    (_two_inputs([None, 3], [None, 2, 2], name_v="u"), None, "distinct names"),
    (_two_inputs([None, 3], [1, 2, 2]), None, "share their batch dimension"),
    (_two_inputs([None, 3], [None, None, 2]), None,
     "input v: a model with several inputs needs every dimension besides the batch fixed"),
    (_two_inputs([None, 3], [None, 2, 2]), {"scale": [2.0]},
     "several inputs takes no preprocessing"),
])
def test_a_manifest_with_several_inputs(tmp_path: Path, inputs: list[dict[str, object]],
                                        preprocessing: dict[str, object] | None,
                                        message: str | None) -> None:
    """Several inputs travel packed side by side: distinct names, one batch dimension,
    every other dimension fixed, no preprocessing; anything else is refused naming it."""
    data = json.loads((make_bundle(tmp_path) / "manifest.json").read_bytes())
    data["inputs"] = inputs
    data["preprocessing"].update(preprocessing or {})
    if message is None:
        assert [i.name for i in parse_manifest(json.dumps(data).encode()).inputs] == ["u", "v"]
        return
    with pytest.raises(BundleError, match=message):
        parse_manifest(json.dumps(data).encode())


def test_preprocessing_arrays_per_feature_parse(tmp_path: Path) -> None:
    data = json.loads((make_bundle(tmp_path) / "manifest.json").read_bytes())
    data["preprocessing"].update({"axis": "feature", "method": "standard",
                                  "scale": [0.5, 2.0, 1.0, 4.0], "offset": [0, 1, 2, 3]})
    assert parse_manifest(json.dumps(data).encode()).preprocessing.scale[3] == 4.0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_parse_or_raise_bundle_error(raw: bytes) -> None:
    with contextlib.suppress(BundleError):
        parse_manifest(raw)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3),
                     max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_manifests_parse_or_raise_bundle_error(tmp_path_factory, data) -> None:  # type: ignore[no-untyped-def]
    base = json.loads((make_bundle(tmp_path_factory.mktemp("m")) / "manifest.json").read_bytes())
    key = data.draw(st.sampled_from(sorted(base)))
    base[key] = data.draw(_json)
    with contextlib.suppress(BundleError):
        parse_manifest(json.dumps(base).encode())
