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


class Preprocessing(_Wire):
    """How raw samples become the model's float input: x = raw * scale + offset."""

    layout: Literal["NCHW", "NHWC", "NC"]
    scale: float = 1.0
    offset: float = 0.0
    description: str = ""


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


class OutputReference(_Wire):
    """Output statistics: predicted-class distribution and top-1 confidence histogram."""

    class_fractions: list[float]
    confidence: Histogram


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
        return self


def canonical_json(manifest: Manifest) -> bytes:
    """The exact bytes that signatures cover."""
    return canonical(manifest.model_dump(mode="json", by_alias=True))


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
