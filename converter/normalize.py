"""Input normalization, fitted on the training split and carried to the device.

The student learns on `x = raw * scale + offset`; the bundle's manifest records `scale` and
`offset` as arrays (`agent.trust.manifest.Preprocessing`) and the agent applies them to every
raw sample before the model's own int8 input quantization. The teacher always sees raw
samples: it was trained on them.

- `standard`: per feature (vectors) or per channel (sequences, images), zero mean and unit
  standard deviation on the training split;
- `minmax`: the training range onto [0, 1];
- `auto`: `standard` when the features' (channels') scales differ, or when they are far from
  unit scale; else none;
- `none`: the identity.

Constant features keep scale 1 (nothing to learn from them, nothing to divide by).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from agent.trust.manifest import Layout, Preprocessing

F32 = npt.NDArray[np.float32]
Method = Literal["auto", "none", "standard", "minmax"]

# auto: feature (channel) standard deviations differing by more than this factor, or any of
# them outside [1/UNIT_SPAN, UNIT_SPAN], or a mean past UNIT_SPAN standard deviations, call
# for standardization.
SPREAD_FACTOR = 10.0
UNIT_SPAN = 10.0
LAYOUTS: dict[int, Layout] = {1: "NC", 2: "NCL", 3: "NCHW"}


def layout_for(sample_shape: tuple[int, ...]) -> Layout:
    """The layout named by the sample's rank: NC (vectors), NCL (sequences), NCHW (images).

    Raises:
        ValueError: a rank the converter has no layout for.
    """
    if len(sample_shape) not in LAYOUTS:
        raise ValueError(f"samples of rank {len(sample_shape)} {sample_shape}: the converter "
                         "takes vectors (F,), sequences (C, L) or images (C, H, W)")
    return LAYOUTS[len(sample_shape)]


@dataclass(frozen=True)
class Normalization:
    method: Literal["none", "standard", "minmax"]
    axis: Literal["tensor", "channel", "feature"]
    scale: F32  # shaped to broadcast over (N, *sample_shape)
    offset: F32
    reason: str

    def apply(self, x: F32) -> F32:
        if self.method == "none":
            return x
        return np.asarray(x * self.scale + self.offset, dtype=np.float32)

    def preprocessing(self, layout: Layout, fitted_on: int) -> Preprocessing:
        how = {"none": "none (identity)",
               "standard": "standard: scale = 1/std, offset = -mean/std",
               "minmax": "minmax: the training range onto [0, 1]"}[self.method]
        return Preprocessing(
            layout=layout, method=self.method, axis=self.axis,
            scale=[float(v) for v in self.scale.ravel()],
            offset=[float(v) for v in self.offset.ravel()],
            description=f"x = raw * scale + offset per {self.axis} ({how}; fitted on "
                        f"{fitted_on} training samples), then the input tensor's own "
                        "quantization if it has one")


def save(norm: Normalization, path: Path) -> None:
    np.savez(path, method=norm.method, axis=norm.axis, scale=norm.scale, offset=norm.offset,
             reason=norm.reason)


def load(path: Path) -> Normalization:
    """The normalization an earlier stage fitted (the work directory's record)."""
    with np.load(path, allow_pickle=False) as npz:
        return Normalization(str(npz["method"]), str(npz["axis"]),  # type: ignore[arg-type]
                             npz["scale"].astype(np.float32), npz["offset"].astype(np.float32),
                             str(npz["reason"]))


def _per(x: F32) -> tuple[Literal["feature", "channel"], F32]:
    """Samples as (N, units, values per unit): features for vectors, channels otherwise."""
    if x.ndim == 2:
        return "feature", x[:, :, None]
    return "channel", x.reshape(len(x), x.shape[1], -1)


def _auto_reason(std: F32, mean: F32, unit: str) -> str | None:
    """Why per-unit standardization is needed (None: the scales are alike and near 1)."""
    live = std > 0
    if not live.any():
        return None
    s, m = std[live], mean[live]
    if s.max() / s.min() > SPREAD_FACTOR:
        return (f"{unit} standard deviations range {s.min():.3g}..{s.max():.3g} "
                f"(more than {SPREAD_FACTOR:g}x apart)")
    if s.max() > UNIT_SPAN or s.min() < 1 / UNIT_SPAN:
        return f"{unit} standard deviations {s.min():.3g}..{s.max():.3g} are far from 1"
    if (np.abs(m) / s).max() > UNIT_SPAN:
        return f"a {unit} mean lies {(np.abs(m) / s).max():.3g} standard deviations from 0"
    return None


def fit(x_train: F32, method: Method) -> Normalization:
    """Fit the normalization on the training samples."""
    axis, units = _per(x_train)
    shape = [1] * x_train.ndim
    shape[1] = units.shape[1]
    if method == "auto":
        std = units.std(axis=(0, 2))
        mean = units.mean(axis=(0, 2))
        why = _auto_reason(std, mean, axis)
        if why is None:
            return identity(f"auto: {axis} scales alike and near 1")
        method, reason = "standard", f"auto: {why}"
    else:
        reason = f"--data-normalize {method}"
    if method == "none":
        return identity(reason)
    if method == "standard":
        centre, spread = units.mean(axis=(0, 2)), units.std(axis=(0, 2))
    else:
        centre = units.min(axis=(0, 2))
        spread = units.max(axis=(0, 2)) - centre
    spread = np.where(spread > 0, spread, 1.0)
    scale = (1.0 / spread).astype(np.float32).reshape(shape)
    offset = (-centre / spread).astype(np.float32).reshape(shape)
    return Normalization(method, axis, scale, offset, reason)


def identity(reason: str) -> Normalization:
    one = np.ones(1, dtype=np.float32)
    return Normalization("none", "tensor", one, np.zeros(1, dtype=np.float32), reason)


@dataclass(frozen=True)
class InputLevels:
    """How many distinct int8 input levels each feature (channel) reaches on the training
    split, against how many distinct values it has there."""

    unit: str
    levels: npt.NDArray[np.int64]
    distinct: npt.NDArray[np.int64]
    min_levels: int

    @property
    def starved(self) -> list[int]:
        """Units with fewer levels than min(distinct values, min_levels)."""
        need = np.minimum(self.distinct, self.min_levels)
        return [int(i) for i in np.flatnonzero(self.levels < need)]

    def as_dict(self) -> dict[str, object]:
        return {"unit": self.unit, "min_levels": self.min_levels,
                "levels_min": int(self.levels.min()),
                "levels_median": float(np.median(self.levels)),
                "starved": self.starved}


def input_levels(x: F32, step: float, zero_point: int, min_levels: int) -> InputLevels:
    """Distinct int8 levels per feature (channel) of model inputs `x` quantized with the
    input tensor's `step` (scale) and zero point."""
    unit, units = _per(x)
    q = np.clip(np.round(units / step) + zero_point, -128, 127).astype(np.int64)
    levels = np.array([len(np.unique(q[:, i])) for i in range(units.shape[1])])
    distinct = np.array([len(np.unique(units[:, i])) for i in range(units.shape[1])])
    return InputLevels(unit, levels, distinct, min_levels)


def minmax_step(x: F32) -> tuple[float, int]:
    """The int8 scale and zero point min-max calibration gives a tensor with these values
    (asymmetric, the range widened to hold 0)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (hi - lo) / 255 or 1.0
    return step, round(-128 - lo / step)
