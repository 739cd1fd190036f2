"""Wire formats of the local API, without I/O: Open Inference Protocol (KServe v2) requests
and responses with the binary tensor data extension (TensorFlow Serving's: `agent.serving.tfs`).

Every parser takes untrusted bytes and either returns float32 input batches or raises
`ApiError` (a 4xx status and a message naming the problem); nothing else escapes, which a
hypothesis test holds. Clients send and receive real values: the runtime adapter applies
any int8 quantization.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from agent.errors import ApiError
from agent.serving.memo import remember
from agent.serving.runtime import pack
from agent.serving.shm import Regions, ShmRef, shm_ref
from agent.trust.manifest import Manifest, TensorSpec

F32 = npt.NDArray[np.float32]

# OIP datatypes we accept for inputs, with their numpy dtype and item size.
DATATYPES: dict[str, Any] = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8,
    "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
}
MAX_ELEMENTS = 1 << 24


class InferRequest(NamedTuple):
    id: str | None
    x: F32
    binary_output: bool
    priority: str
    timeout_ms: float | None
    output_shm: ShmRef | None = None  # write the output into this region, not the body


def json_body(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApiError(400, f"body is not valid JSON: {str(exc)[:160]}") from exc


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _shape_ok(spec: TensorSpec, shape: list[int]) -> bool:
    want = spec.shape
    if len(shape) != len(want):
        return False
    return all(w is None or w == g or (i == 0 and w == 1) for i, (w, g) in
               enumerate(zip(want, shape, strict=True)))


def check_shape(spec: TensorSpec, shape: Any) -> list[int]:
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ApiError(400, f"input {spec.name}: shape must be a list of positive integers")
    if math.prod(shape) > MAX_ELEMENTS:
        raise ApiError(413, f"input {spec.name}: {math.prod(shape)} elements is too many")
    if not _shape_ok(spec, shape):
        want = ["-1" if d is None else str(d) for d in spec.shape]
        raise ApiError(400, f"input {spec.name}: shape {shape} does not match the model's "
                       f"[{', '.join(want)}] (any batch size)")
    return list(shape)


def _tensor_from_json(spec: TensorSpec, shape: list[int], datatype: str, data: Any) -> F32:
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused below
            arr = np.asarray(data, dtype=DATATYPES[datatype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise ApiError(400, f"input {spec.name}: data is not {datatype} numbers") from exc
    if arr.size != math.prod(shape):
        raise ApiError(400, f"input {spec.name}: {arr.size} values for shape {shape}")
    out = arr.reshape(shape).astype(np.float32)
    if not np.isfinite(out).all():
        raise ApiError(400, f"input {spec.name}: values must be finite")
    return out


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a binary infer request's JSON header says, checked against one model: its
    inputs' layout in the binary part ((spec, dtype, shape, offset, size) in the model's
    order), the shape `reserve` sees, and the request's options."""

    # (spec, dtype, shape, byte offset, values, whether they are cast to float32)
    inputs: tuple[tuple[TensorSpec, np.dtype[Any], tuple[int, ...], int, int, bool], ...]
    # the shape `reserve` sees, or None: one float32 input, decoded as a view of the body,
    # allocates nothing before admission (which decides on the same bytes) sees it
    reserved: list[int] | None
    id: str | None
    binary_output: bool
    priority: str
    timeout_ms: float | None


#: Plans of binary requests, by (header bytes, binary part's length): a client sends the
#: same header for every request of a shape, and parsing and checking it was a third of
#: the agent's own time per inference. Keyed on the exact bytes, so a hit is the header
#: parsed before, and valid with the manifest it was checked against (kept beside it).
#: Bounded: emptied when full (a client varying its header only misses).
_PLANS: dict[tuple[int, bytes, int], tuple[Manifest, _Plan]] = {}
PLANS_MAX = 256
#: The longest header worth keeping (a plan's key holds it).
PLAN_HEADER_MAX = 4096


def parse_infer(body: bytes, manifest: Manifest, header_length: int | None,
                reserve: Callable[[list[int]], None] | None = None,
                shm: Regions | None = None) -> InferRequest:
    """Parse a v2 infer request (JSON, or JSON + binary tensors after `header_length`, or
    tensors in shared-memory regions of `shm`). `reserve` sees the declared shape before
    any tensor is decoded and may refuse it.

    Raises:
        ApiError: 400 malformed, wrong name/shape/datatype; 413 too many elements.
    """
    if header_length is not None and 0 < header_length <= min(len(body), PLAN_HEADER_MAX):
        key = (id(manifest), bytes(body[:header_length]), len(body) - header_length)
        known = _PLANS.get(key)
        if known is not None and known[0] is manifest:
            return _planned(known[1], body, header_length, reserve)
        req = _parse_infer(body, manifest, header_length, reserve, shm)
        plan = _plan_of(key[1], manifest, req)
        if plan is not None:
            remember(_PLANS, key, (manifest, plan), PLANS_MAX)
        return req
    return _parse_infer(body, manifest, header_length, reserve, shm)


def _plan_of(head: bytes, manifest: Manifest, req: InferRequest) -> _Plan | None:
    """The plan of a binary request `_parse_infer` accepted: None unless every input came
    in the binary part and nothing names shared memory (a region is looked up anew on
    every request)."""
    if b"shared_memory" in head or req.output_shm is not None:
        return None
    items = json.loads(head)["inputs"]  # accepted already: the shape is known good
    offsets, at = {}, 0
    for item in items:
        params = item.get("parameters")
        if not isinstance(params, dict) or "binary_data_size" not in params:
            return None  # values in the JSON
        offsets[item["name"]] = (at, params["binary_data_size"])
        at += params["binary_data_size"]
    by_name = {item["name"]: item for item in items}
    inputs = []
    for spec in manifest.inputs:
        item = by_name[spec.name]
        offset, size = offsets[spec.name]
        dtype = np.dtype(DATATYPES[item["datatype"]])
        inputs.append((spec, dtype, tuple(item["shape"]), offset, size // dtype.itemsize,
                       dtype != np.float32))
    first = inputs[0][2]
    reserved = (None if len(inputs) == 1 and not inputs[0][5] else list(first)
                if len(inputs) == 1 else [first[0], sum(math.prod(t[2][1:]) for t in inputs)])
    return _Plan(tuple(inputs), reserved, req.id, req.binary_output, req.priority,
                 req.timeout_ms)


def _planned(plan: _Plan, body: bytes, header_length: int,
             reserve: Callable[[list[int]], None] | None) -> InferRequest:
    """A binary request whose header was parsed before: its tensors decoded as
    `_tensor_from_binary` does (the sizes were checked with this header and body length),
    and the values checked as ever. `reserve` is asked first unless decoding allocates
    nothing (`_Plan.reserved`)."""
    if reserve is not None and plan.reserved is not None:
        reserve(list(plan.reserved))
    xs = []
    for spec, dtype, shape, offset, _count, cast in plan.inputs:
        # the tensor as a read-only view of the body's bytes, shaped, in one call
        x: F32 = np.ndarray(shape, dtype, body, header_length + offset)
        if cast:
            x = x.astype(np.float32)
        if not _all_finite(x):
            raise ApiError(400, f"input {spec.name}: values must be finite")
        xs.append(x)
    return InferRequest(plan.id, xs[0] if len(xs) == 1 else pack(xs), plan.binary_output,
                        plan.priority, plan.timeout_ms)


def _all_finite(x: F32) -> bool:
    """`np.isfinite(x).all()` without numpy's reduction machinery (half the time warm, and
    the request path runs it cold): the flags' bytes searched for a zero."""
    return b"\0" not in np.isfinite(x).tobytes()


def _parse_infer(body: bytes, manifest: Manifest, header_length: int | None,
                 reserve: Callable[[list[int]], None] | None,
                 shm: Regions | None) -> InferRequest:
    if header_length is not None and not 0 < header_length <= len(body):
        raise ApiError(400, "Inference-Header-Content-Length is outside the body")
    # The binary part is a view of the body: no copy of the tensor bytes before decoding.
    head, binary = ((body, memoryview(b"")) if header_length is None else
                    (body[:header_length], memoryview(body)[header_length:]))
    req = json_body(head)
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise ApiError(400, "request must be an object with an 'inputs' list")
    given = _inputs_by_name(req["inputs"], manifest.inputs)
    tensors: list[tuple[TensorSpec, dict[str, Any], list[int], str]] = []
    for spec in manifest.inputs:
        inp = given[spec.name]
        datatype = inp.get("datatype")
        if datatype not in DATATYPES:
            raise ApiError(400, f"input {spec.name}: datatype {datatype!r} is not one of "
                           f"{', '.join(DATATYPES)}")
        shape = check_shape(spec, inp.get("shape"))
        if tensors and shape[0] != tensors[0][2][0]:
            raise ApiError(400, f"input {spec.name}: {shape[0]} samples; input "
                           f"{tensors[0][0].name} has {tensors[0][2][0]}")
        tensors.append((spec, inp, shape, datatype))
    if reserve is not None:  # the batch as queued: several inputs packed side by side
        reserve(tensors[0][2] if len(tensors) == 1 else
                [tensors[0][2][0], sum(math.prod(t[2][1:]) for t in tensors)])
    if len(tensors) == 1:
        spec, inp, shape, datatype = tensors[0]
        x = _tensor(spec, inp, shape, datatype, binary, shm)
    else:
        parts = _binary_parts(req["inputs"], binary)
        x = pack([_tensor(spec, inp, shape, datatype, parts.get(spec.name, binary[:0]), shm)
                  for spec, inp, shape, datatype in tensors])
    return InferRequest(id=_opt_str(req.get("id")), x=x,
                        binary_output=_wants_binary(req), output_shm=_output_shm(
                            req, manifest, shm), **_scheduling(req))


def _inputs_by_name(items: list[Any], specs: list[TensorSpec]) -> dict[str, dict[str, Any]]:
    """The request's inputs by name: exactly the model's, each once.

    Raises:
        ApiError: 400 naming what the model takes.
    """
    if len(specs) == 1:
        spec = specs[0]
        if len(items) != 1 or not isinstance(items[0], dict):
            raise ApiError(400, f"model takes exactly one input, {spec.name!r}")
        if items[0].get("name") != spec.name:
            raise ApiError(400, f"unknown input {items[0].get('name')!r}; the model's input "
                           f"is {spec.name!r}")
        return {spec.name: items[0]}
    names = [s.name for s in specs]
    takes = f"the model takes {len(names)} inputs: {', '.join(map(repr, names))}"
    if len(items) != len(specs) or not all(isinstance(i, dict) for i in items):
        raise ApiError(400, f"{len(items)} inputs given; {takes}")
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name = item.get("name")
        if name not in names:
            raise ApiError(400, f"unknown input {name!r}; {takes}")
        if name in out:
            raise ApiError(400, f"input {name!r} given twice; {takes}")
        out[name] = item
    return out


def _binary_parts(items: list[dict[str, Any]], binary: memoryview) -> dict[str, memoryview]:
    """Each input's binary part: they follow the JSON in the order the request lists the
    inputs, each `binary_data_size` bytes.

    Raises:
        ApiError: the sizes do not add up to the bytes after the JSON.
    """
    parts, at = {}, 0
    for item in items:
        params = item.get("parameters")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            parts[str(item.get("name"))] = binary[at:at + size]
            at += size
    if at != len(binary):
        raise ApiError(400, f"the inputs' binary_data_size add up to {at} bytes; the body "
                       f"has {len(binary)} after the JSON")
    return parts


def _tensor(spec: TensorSpec, inp: dict[str, Any], shape: list[int], datatype: str,
            binary: memoryview, shm: Regions | None) -> F32:
    """One input's values: from a shared-memory region, its binary part, or JSON
    numbers."""
    params = inp.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "parameters must be an object")
    ref = shm_ref(params, shm, f"input {spec.name}")
    if ref is not None:
        if "data" in inp or "binary_data_size" in params:
            raise ApiError(400, f"input {spec.name}: shared memory, data and "
                           "binary_data_size exclude one another")
        return _tensor_from_shm(spec, shape, datatype, ref)
    if "binary_data_size" in params:
        return _tensor_from_binary(spec, shape, datatype, params["binary_data_size"], binary)
    if "data" in inp:
        return _tensor_from_json(spec, shape, datatype, inp["data"])
    raise ApiError(400, f"input {spec.name}: neither data nor binary_data_size")


def _tensor_from_shm(spec: TensorSpec, shape: list[int], datatype: str, ref: ShmRef) -> F32:
    """The input read from its region straight into a new array (one copy)."""
    dtype = np.dtype(DATATYPES[datatype])
    expected = math.prod(shape) * dtype.itemsize
    if ref.byte_size != expected:
        raise ApiError(400, f"input {spec.name}: shared_memory_byte_size must be {expected} "
                       f"for {datatype} {shape}, not {ref.byte_size}")
    out = np.empty(shape, dtype=dtype)
    ref.region.read_into(out, ref.offset, f"input {spec.name}")
    x = out if dtype == np.float32 else out.astype(np.float32)
    if not np.isfinite(x).all():
        raise ApiError(400, f"input {spec.name}: values must be finite")
    return x


def _output_shm(req: dict[str, Any], manifest: Manifest,
                shm: Regions | None) -> ShmRef | None:
    """The region the requested output goes to, if its parameters name one."""
    outs = req.get("outputs") or []
    if not isinstance(outs, list):
        raise ApiError(400, "outputs must be a list")
    for o in outs:
        params = o.get("parameters") if isinstance(o, dict) else None
        if not isinstance(params, dict):
            continue
        name = o.get("name")
        ref = shm_ref(params, shm, f"output {name}")
        if ref is None:
            continue
        if name != manifest.outputs[0].name:
            raise ApiError(400, f"unknown output {name!r}; the model's output is "
                           f"{manifest.outputs[0].name!r}")
        return ref
    return None


def _tensor_from_binary(spec: TensorSpec, shape: list[int], datatype: str, size: Any,
                        binary: memoryview) -> F32:
    dtype = np.dtype(DATATYPES[datatype])
    expected = math.prod(shape) * dtype.itemsize
    if not isinstance(size, int) or size != expected or len(binary) != expected:
        raise ApiError(400, f"input {spec.name}: binary_data_size must be {expected} bytes "
                       f"and match the binary part ({len(binary)} bytes)")
    # FP32 stays a read-only view of the request's bytes (no copy); other types convert.
    out = np.frombuffer(binary, dtype=dtype).reshape(shape).astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise ApiError(400, f"input {spec.name}: values must be finite")
    return out


def _opt_str(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise ApiError(400, "id must be a string")


def _wants_binary(req: dict[str, Any]) -> bool:
    outs = req.get("outputs") or []
    if not isinstance(outs, list):
        raise ApiError(400, "outputs must be a list")
    for o in outs:
        p = o.get("parameters") if isinstance(o, dict) else None
        if isinstance(p, dict) and p.get("binary_data") is True:
            return True
    params = req.get("parameters")
    return isinstance(params, dict) and params.get("binary_data_output") is True


def _scheduling(req: dict[str, Any]) -> dict[str, Any]:
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "parameters must be an object")
    priority = params.get("priority", "normal")
    if priority not in ("high", "normal", "low"):
        raise ApiError(400, "parameters.priority must be high, normal or low")
    timeout = params.get("timeout_ms")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not 0 < timeout <= 600_000):
        raise ApiError(400, "parameters.timeout_ms must be a number in (0, 600000]")
    return {"priority": priority, "timeout_ms": timeout}


def infer_response(manifest: Manifest, y: F32, *, request_id: str | None,
                   binary: bool, output_shm: ShmRef | None = None) -> tuple[bytes, int | None]:
    """(body, header length for the binary extension or None). With `output_shm` the
    output goes into that region and the body only says where.

    Raises:
        ApiError: 400 when the output does not fit its region.
    """
    if binary and output_shm is None:
        key = (id(manifest), request_id, y.shape)
        known = _HEADS.get(key)
        if known is None or known[0] is not manifest:
            known = (manifest, _binary_head(manifest, y.shape, request_id))
            if request_id is None or len(request_id) <= HEAD_ID_MAX:  # bounded: kept
                remember(_HEADS, key, known, PLANS_MAX)
        head = known[1]
        return head + np.ascontiguousarray(y, dtype="<f4").tobytes(), len(head)
    out = manifest.outputs[0]
    tensor: dict[str, Any] = {"name": out.name, "datatype": "FP32", "shape": list(y.shape)}
    meta: dict[str, Any] = {"model_name": manifest.name, "model_version": str(manifest.version),
                            "outputs": [tensor]}
    if request_id is not None:
        meta["id"] = request_id
    if output_shm is not None:
        data = np.ascontiguousarray(y, dtype="<f4")
        if data.nbytes > output_shm.byte_size:
            raise ApiError(400, f"output {out.name}: {data.nbytes} bytes do not fit "
                           f"shared_memory_byte_size {output_shm.byte_size}")
        output_shm.region.write(data, output_shm.offset, f"output {out.name}")
        tensor["parameters"] = {"shared_memory_region": output_shm.region.name,
                                "shared_memory_byte_size": data.nbytes}
        if output_shm.offset:
            tensor["parameters"]["shared_memory_offset"] = output_shm.offset
        return json.dumps(meta, separators=(",", ":")).encode(), None
    # {...meta, "outputs": [{...tensor, "data": [...]}]}, the data encoded in slices
    meta.pop("outputs")
    start = json.dumps(meta, separators=(",", ":"))[:-1]
    opening = json.dumps(tensor, separators=(",", ":"))[:-1]
    return (f'{start},"outputs":[{opening},"data":'.encode() + json_array(y.ravel())
            + b"}]}"), None


#: The JSON header of binary answers, by (manifest, request id, output shape): the same
#: for every answer of a shape. Bounded as `_PLANS`, and only for ids of at most
#: HEAD_ID_MAX characters (an id can be as long as the JSON a request may hold).
_HEADS: dict[tuple[int, str | None, tuple[int, ...]], tuple[Manifest, bytes]] = {}
HEAD_ID_MAX = 256


def _binary_head(manifest: Manifest, shape: tuple[int, ...], request_id: str | None) -> bytes:
    meta: dict[str, Any] = {"model_name": manifest.name, "model_version": str(manifest.version),
                            "outputs": [{"name": manifest.outputs[0].name, "datatype": "FP32",
                                         "shape": list(shape), "parameters": {
                                             "binary_data_size": 4 * math.prod(shape)}}]}
    if request_id is not None:
        meta["id"] = request_id
    return json.dumps(meta, separators=(",", ":")).encode()


def model_metadata(manifest: Manifest) -> dict[str, Any]:
    def t(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "datatype": "FP32",
                "shape": [-1 if d is None else d for d in spec.shape]}
    return {"name": manifest.name, "versions": [str(manifest.version)],
            "platform": "onnxruntime_onnx" if manifest.runtime == "onnx" else "tensorflow_lite",
            "inputs": [t(s) for s in manifest.inputs], "outputs": [t(s) for s in manifest.outputs],
            "parameters": {"labels": manifest.labels, "profiles": manifest.profiles}}


#: Elements per `json.dumps` call when encoding outputs: one call holds the GIL throughout,
#: and a 200,000-element call held it (and so the event loop) for 90 ms.
SLICE = 8192


def json_array(y: F32) -> bytes:
    """`json.dumps(y.tolist())`, compact, in slices of rows small enough that no single
    call holds the GIL for long."""
    if y.size <= SLICE:
        return json.dumps(y.tolist(), separators=(",", ":")).encode()
    step = max(1, SLICE // max(1, y[0].size if y.ndim > 1 else 1))
    parts = [json.dumps(y[i:i + step].tolist(), separators=(",", ":"))[1:-1]
             for i in range(0, len(y), step)]
    return ("[" + ",".join(parts) + "]").encode()
