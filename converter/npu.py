"""Target checks and NPU compilation.

- `tflite_ops` lists a TFLite file's operators by reading the flatbuffer (with the schema
  classes that ethos-u-vela ships), so nothing has to be delegated or allocated.
- `check_target` compares them with the profile's operator set: unsupported operators are
  either reported as CPU fallback or, where the target needs full offload, refused.
- `compile_vela` runs Arm's Vela for Ethos-U profiles and reads its summary CSV (SRAM,
  flash, cycles, NPU/CPU split); ops left outside the ETHOS_U custom op run on the CPU.
- For compilers not on PyPI (Edge TPU), `external_steps` says what remains and the checks
  above make sure the model meets that compiler's input rules.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.profiles import FirmwareProfile
from converter.errors import ToolchainError, UnsupportedOperatorError

# Boundary ops that every int8 target handles (they vanish with int8 I/O or run once).
ALWAYS_OK = {"QUANTIZE", "DEQUANTIZE"}


def tflite_ops(path: Path) -> list[str]:
    """Operator names of the first subgraph, in execution order."""
    from ethosu.vela.tflite.BuiltinOperator import BuiltinOperator  # noqa: PLC0415  # optional: when used
    from ethosu.vela.tflite.Model import Model  # noqa: PLC0415  # optional: when used

    names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
    model = Model.GetRootAsModel(path.read_bytes(), 0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    graph = model.Subgraphs(0)
    ops = []
    for j in range(graph.OperatorsLength()):
        code = codes[graph.Operators(j).OpcodeIndex()]
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            name = f"CUSTOM:{(code.CustomCode() or b'').decode()}"
        ops.append(name)
    return ops


@dataclass
class TargetCheck:
    operators: list[str]
    unsupported: list[str]
    io_dtypes: str
    static_shapes: bool
    notes: list[str] = field(default_factory=list)


def check_target(
    profile: FirmwareProfile, ops: list[str], io_dtypes: str, input_shape: list[int | None], *,
    require_full_offload: bool | None,
) -> TargetCheck:
    """Check a TFLite model's ops and I/O against the profile.

    Raises:
        UnsupportedOperatorError: ops outside the profile's set where full offload is needed.
    """
    q = profile.quantization
    allowed = set(q.operators)
    unsupported = sorted({o for o in ops if allowed and o not in allowed and o not in ALWAYS_OK})
    full = require_full_offload
    if full is None:
        full = profile.accelerator is not None and not profile.accelerator.cpu_fallback
    if unsupported and full:
        raise UnsupportedOperatorError(
            f"operator(s) {', '.join(unsupported)} cannot run on {profile.name} "
            f"({profile.accelerator.name if profile.accelerator else 'target'}); "
            f"change the student or choose another profile",
            operators=unsupported, profile=profile.name)
    check = TargetCheck(sorted(set(ops)), unsupported, io_dtypes,
                        all(isinstance(d, int) for d in input_shape))
    if q.int8_io_required and io_dtypes != "int8/int8":
        raise UnsupportedOperatorError(f"{profile.name} needs int8 input and output, the model "
                                       f"has {io_dtypes}", operators=[], profile=profile.name)
    if q.static_shapes and not check.static_shapes:
        raise UnsupportedOperatorError(f"{profile.name} needs static shapes, the model input "
                                       f"is {input_shape}", operators=[], profile=profile.name)
    if unsupported:
        check.notes.append(f"falls back to CPU on {profile.name}: {', '.join(unsupported)}")
    return check


@dataclass
class VelaResult:
    path: Path
    summary: dict[str, Any]
    npu_ops: int
    cpu_ops: list[str]


_VELA_FIELDS = {
    "sram_memory_used": ("sram_kib", float), "off_chip_flash_memory_used": ("flash_kib", float),
    "cycles_npu": ("cycles_npu", int), "cycles_total": ("cycles_total", int),
    "inference_time": ("inference_time_s", float), "nn_macs": ("macs", int),
    "inferences_per_second": ("inferences_per_second", float),
    "accelerator_configuration": ("accelerator", str), "system_config": ("system_config", str),
    "total_npu_encoded_weights": ("npu_encoded_weights_bytes", int),
}


def compile_vela(model: Path, out_dir: Path, args: list[str]) -> VelaResult:
    """Run Vela on an int8 TFLite model.

    Raises:
        ToolchainError: Vela is missing or fails.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ethosu.vela", str(model), "--output-dir", str(out_dir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToolchainError(f"vela failed (exit {proc.returncode}): {last[0][:300]}")
    compiled = out_dir / f"{model.stem}_vela.tflite"
    summaries = list(out_dir.glob(f"{model.stem}_summary_*.csv"))
    if not compiled.is_file() or not summaries:
        raise ToolchainError(f"vela wrote no model/summary in {out_dir}")
    with summaries[0].open(newline="") as fh:
        row = next(csv.DictReader(fh))
    summary = {name: conv(row[key]) for key, (name, conv) in _VELA_FIELDS.items() if key in row}
    ops = tflite_ops(compiled)
    cpu = [o for o in ops if not o.startswith("CUSTOM:ethos-u")]
    return VelaResult(compiled, summary, len(ops) - len(cpu), cpu)


def external_steps(profile: FirmwareProfile) -> list[str]:
    acc = profile.accelerator
    if acc is not None and acc.external_step:
        return [acc.external_step]
    return []
