"""The bundle manifest: the wire schema that the converter writes and the agent trusts.

A bundle is a directory (shipped as one archive) with `manifest.json`, the model file,
`selftest.npz` and, once signed, `signatures.json`. The manifest names every other file with
its sha256 and size, and carries what the device needs to serve and watch the model: I/O
specs with quantization parameters, labels, preprocessing, reference statistics for drift
detection, a resource estimate and the compatibility fields (`profiles`,
`min_agent_version`, `expires`, `version`).

Signatures cover `canonical_json(manifest)`: sorted keys, no insignificant white space,
UTF-8 (docs/architecture.md, Bundle).
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from agent.errors import BundleError
from agent.trust.signatures import Name, canonical, strict_json, validation_message

MANIFEST_FILE = "manifest.json"
SIGNATURES_FILE = "signatures.json"
SELFTEST_FILE = "selftest.npz"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _relative(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{path!r} must be a relative path without '.', '..' or '//'")
    return path


RelPath = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-/]+$"), AfterValidator(_relative)]
DType = Literal["float32", "float16", "int8", "uint8", "int16", "int32", "int64"]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class FileEntry(_Wire):
    sha256: Sha256Hex
    size_bytes: int = Field(ge=0)


class QuantParams(_Wire):
    """real_value = scale * (quantized_value - zero_point)"""

    scale: float = Field(gt=0)
    zero_point: int


class TensorSpec(_Wire):
    name: str
    dtype: DType
    # None marks a dynamic dimension (the batch, for ONNX models).
    shape: list[int | None]
    quantization: QuantParams | None = None


Layout = Literal["NC", "NCL", "NLC", "NCHW", "NHWC"]
# A finite float: NaN or infinity in a scale would turn every input into garbage.
Finite = Annotated[float, Field(allow_inf_nan=False)]
MAX_NORMALIZATION_ENTRIES = 65536


class Preprocessing(_Wire):
    """How a raw sample becomes the model's float input, applied by the agent on every path
    (local API, MQTT inference, self-test, drift statistics) before the input tensor's own
    quantization: `x = raw * scale + offset`, element-wise with the arrays broadcast by
    `axis`:

    - `tensor`: one entry each, for every element;
    - `channel`: one entry per channel (the `C` of `layout`);
    - `feature`: one entry per element of a sample (vectors: one per feature).

    `method` records how the converter fitted them on the training split (`standard`:
    scale = 1/std, offset = -mean/std; `minmax`: the training range onto [0, 1]; `none`:
    identity)."""

    layout: Layout
    method: Literal["none", "standard", "minmax"] = "none"
    axis: Literal["tensor", "channel", "feature"] = "tensor"
    scale: list[Finite] = Field(default_factory=lambda: [1.0], min_length=1,
                                max_length=MAX_NORMALIZATION_ENTRIES)
    offset: list[Finite] = Field(default_factory=lambda: [0.0], min_length=1,
                                 max_length=MAX_NORMALIZATION_ENTRIES)
    description: str = Field("", max_length=1000)

    @model_validator(mode="after")
    def _arrays(self) -> Preprocessing:
        if len(self.scale) != len(self.offset):
            raise ValueError(f"scale has {len(self.scale)} entries, offset {len(self.offset)}")
        if any(s == 0 for s in self.scale):
            raise ValueError("scale must not contain 0 (it would erase an input)")
        if self.axis == "tensor" and len(self.scale) != 1:
            raise ValueError("axis 'tensor' takes one scale and one offset")
        return self

    @property
    def identity(self) -> bool:
        return all(s == 1.0 for s in self.scale) and all(o == 0.0 for o in self.offset)

    def entries_for(self, sample_shape: list[int | None]) -> int:
        """How many entries `scale` must have for samples of this shape (the input spec
        without its batch dimension).

        Raises:
            ValueError: the axis does not fit the shape or layout.
        """
        if len(sample_shape) != len(self.layout) - 1:
            raise ValueError(f"layout {self.layout} does not fit input samples of shape "
                             f"{sample_shape}")
        if self.axis == "tensor":
            return 1
        if self.axis == "channel":
            channels = sample_shape[self.layout.index("C") - 1]
            if channels is None:
                raise ValueError("axis 'channel' needs a fixed channel count")
            return channels
        fixed = [d for d in sample_shape if d is not None]
        if len(fixed) != len(sample_shape):
            raise ValueError("axis 'feature' needs a fixed sample shape")
        return math.prod(fixed)


class Histogram(_Wire):
    """A histogram with explicit bin edges; `fractions` sums to 1."""

    bin_edges: list[float] = Field(min_length=2)
    fractions: list[float]

    @model_validator(mode="after")
    def _lengths(self) -> Histogram:
        if len(self.fractions) != len(self.bin_edges) - 1:
            raise ValueError("fractions must have one entry fewer than bin_edges")
        return self


class InputReference(_Wire):
    """Input statistics of the calibration data: a value histogram (for PSI) and moments."""

    histogram: Histogram
    mean: float
    std: float
    feature_mean: list[float]
    feature_std: list[float]


class ScoreReference(_Wire):
    """An autoencoder's anomaly score on the calibration data: the per-sample reconstruction
    error (mean squared difference between the normalized input and the output). The device
    flags a sample above `threshold` (the `quantile` of the errors on normal training
    samples), and compares the score distribution with `histogram` for drift."""

    kind: Literal["reconstruction_error"] = "reconstruction_error"
    histogram: Histogram
    threshold: float = Field(gt=0, allow_inf_nan=False)
    quantile: float = Field(gt=0, lt=1)


class OutputReference(_Wire):
    """Output statistics: for a classifier the predicted-class distribution and top-1
    confidence histogram; for an autoencoder its anomaly score; nothing for regression."""

    class_fractions: list[float] = Field(default_factory=list)
    confidence: Histogram | None = None
    score: ScoreReference | None = None


class ReferenceStats(_Wire):
    samples: int = Field(ge=1)
    input: InputReference
    output: OutputReference


class ResourceEstimate(_Wire):
    model_bytes: int = Field(ge=0)
    arena_bytes: int = Field(ge=0)
    peak_memory_bytes: int = Field(ge=0)


class SelfTest(_Wire):
    """Golden inputs and the outputs this model gave for them at conversion time."""

    file: RelPath = SELFTEST_FILE
    # Dequantized outputs may differ by at most this much on the device (int8 kernels round
    # differently across CPUs), and top-1 must agree on at least this share of samples.
    atol: float = Field(ge=0)
    min_top1_agreement: float = Field(ge=0, le=1)


class Sealed(_Wire):
    """At-rest protection of the model file (docs/architecture.md, Trust): the file holds NaCl
    SecretBox ciphertext (XSalsa20-Poly1305) under a fresh key, and that key is sealed to
    each recipient device's X25519 key (SealedBox). Hashes in `files` cover the ciphertext,
    so a bundle verifies without any key; only listed devices can decrypt, into memory."""

    scheme: Literal["nacl-secretbox+sealedbox"] = "nacl-secretbox+sealedbox"
    # device id -> sealed 32-byte key (48 bytes of SealedBox overhead): 80 bytes, hex.
    recipients: dict[Name,
                     Annotated[str, Field(pattern=r"^[0-9a-f]{160}$")]] = Field(min_length=1)


class Manifest(_Wire):
    schema_version: Literal[1] = Field(default=1, alias="schema")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    version: int = Field(ge=1)
    created: AwareDatetime
    expires: AwareDatetime
    min_agent_version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    profiles: list[str] = Field(min_length=1)
    runtime: Literal["onnx", "tflite"]
    # classify: outputs are class scores; reconstruct: an autoencoder (output = input
    # reconstructed, its error the anomaly score); regress: other values.
    task: Literal["classify", "reconstruct", "regress"] = "classify"
    model_file: RelPath
    files: dict[RelPath, FileEntry]
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str]
    preprocessing: Preprocessing
    reference: ReferenceStats
    resources: ResourceEstimate
    selftest: SelfTest
    sealed: Sealed | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _files_named(self) -> Manifest:
        for needed in (self.model_file, self.selftest.file):
            if needed not in self.files:
                raise ValueError(f"files must list {needed!r}")
        if MANIFEST_FILE in self.files or SIGNATURES_FILE in self.files:
            raise ValueError("files must not list manifest.json or signatures.json")
        # "x" and "x/y" cannot both be files (one would have to be a directory).
        dirs = {str(p) for name in self.files for p in PurePosixPath(name).parents}
        if clash := sorted(dirs & set(self.files)):
            raise ValueError(f"files lists {clash[0]!r} both as a file and as a directory")
        if self.expires <= self.created:
            raise ValueError("expires must be after created")
        out = self.reference.output
        if self.task == "classify" and (out.confidence is None or not out.class_fractions):
            raise ValueError("a classifier's reference.output needs class_fractions and "
                             "confidence")
        if self.task == "reconstruct":
            if out.score is None:
                raise ValueError("an autoencoder's reference.output needs score")
            if self.outputs[0].shape[1:] != self.inputs[0].shape[1:]:
                raise ValueError(f"task reconstruct needs the output shaped like the input: "
                                 f"{self.outputs[0].shape} against {self.inputs[0].shape}")
        if len(self.inputs) > 1:
            self._several_inputs()
            return self
        want = self.preprocessing.entries_for(self.inputs[0].shape[1:])
        if len(self.preprocessing.scale) != want:
            raise ValueError(f"preprocessing.scale has {len(self.preprocessing.scale)} "
                             f"entries; axis {self.preprocessing.axis!r} on input "
                             f"{self.inputs[0].shape} needs {want}")
        return self


    def _several_inputs(self) -> None:
        """Several inputs travel packed side by side (`agent.serving.runtime.pack`): their
        names distinct, their sizes besides the batch fixed, one batch dimension, and no
        preprocessing (it is defined for one input's layout)."""
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"inputs must have distinct names, got {names}")
        if len({str(i.shape[0]) for i in self.inputs}) != 1:
            raise ValueError(f"inputs must share their batch dimension, got "
                             f"{[i.shape for i in self.inputs]}")
        for spec in self.inputs:
            if any(d is None for d in spec.shape[1:]):
                raise ValueError(f"input {spec.name}: a model with several inputs needs "
                                 f"every dimension besides the batch fixed, got {spec.shape}")
        if not self.preprocessing.identity:
            raise ValueError("a model with several inputs takes no preprocessing "
                             "(preprocessing.method must be none)")
        if self.task == "reconstruct":
            raise ValueError("task reconstruct takes a model with one input")


def canonical_json(manifest: Manifest) -> bytes:
    """The exact bytes that signatures cover. Fields added to schema 1 after it shipped
    (`task`, `reference.output.score`) are written only when they say something: a
    classifier's manifest stays readable by agents that predate them, which refuse unknown
    fields."""
    data = manifest.model_dump(mode="json", by_alias=True)
    if data.get("task") == "classify":
        del data["task"]
    output = data["reference"]["output"]
    if output.get("score") is None:
        output.pop("score", None)
    return canonical(data)


def parse_manifest(raw: bytes) -> Manifest:
    """Parse manifest bytes from outside.

    Raises:
        BundleError: not strict UTF-8 JSON, or does not validate (check="manifest").
    """
    data = strict_json(raw, what="manifest", max_bytes=MAX_MANIFEST_BYTES, error=BundleError,
                       check="manifest")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(validation_message("manifest", exc), check="manifest") from exc
