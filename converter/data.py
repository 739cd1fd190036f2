"""Samples in, checked and split deterministically.

Data is an `.npz` with `x` (numeric samples, first axis = samples: vectors (N, F), sequences
(N, C, L) or images (N, C, H, W)), optionally `y` (integer class labels; for
`--model-task regress` the true outputs, float (N,) or (N, k)) and `labels` (class names, a
string array), or the built-in `digits` set from scikit-learn's `load_digits` (1,797 8x8
grey images scaled to [0, 1], shape (N, 1, 8, 8)). Nothing is downloaded.

For a model with several inputs (quantize-only of an ONNX model), the `.npz` holds one
array per input, named as the model names its inputs (`np.savez(f, u=u, v=v, y=y)`),
each (N, ...) with the same N and no `x`. The converter then handles each sample as its
inputs' values side by side (`Dataset.inputs` says which values are whose; the model's
input order, see `order_inputs`), as the agent does.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.serving.runtime import pack, unpack
from converter.errors import DataError
from converter.normalize import layout_for

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
MIN_SAMPLES = 50


@dataclass(frozen=True)
class Dataset:
    """Samples and labels; `y` is None for unlabelled data (teacher labels are used)."""

    x: F32
    y: I64 | None
    source: str
    labels: list[str] | None = None  # class names, from the npz's `labels` array
    targets: F32 | None = None  # a regressor's true outputs (N, k), from `y` (task regress)
    # Several inputs: (name, shape of one sample) of each, in the order their values
    # stand side by side in `x` (N, values); None for one input (x as given).
    inputs: list[tuple[str, tuple[int, ...]]] | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])


@dataclass(frozen=True)
class Split:
    """Index arrays into a Dataset."""

    train: npt.NDArray[np.intp]
    val: npt.NDArray[np.intp]
    test: npt.NDArray[np.intp]


def load_digits_dataset() -> Dataset:
    """scikit-learn's digits, as (N, 1, 8, 8) float32 in [0, 1]."""
    from sklearn.datasets import load_digits  # noqa: PLC0415  (host-only dependency)

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    return Dataset(x=x, y=y, source="digits")


def load_dataset(source: str, task: str = "classify") -> Dataset:
    """Load `digits` or an `.npz` file and check it; for `task` regress, `y` holds the
    true outputs (float, (N,) or (N, k)), not labels.

    Raises:
        DataError: missing/corrupt file, missing `x`, non-numeric or non-finite values,
            too few samples, or labels that do not fit.
    """
    if source == "digits":
        return load_digits_dataset()
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"data file {path} is not a readable .npz: {exc}") from exc
    return validate(arrays, str(path), task)


#: Arrays of an `.npz` that are not a model's input.
NOT_INPUTS = ("y", "labels")


def validate(arrays: dict[str, np.ndarray], source: str, task: str = "classify") -> Dataset:
    """Check raw arrays and build a Dataset (see load_dataset for the rules)."""
    inputs = None
    named = {k: v for k, v in arrays.items() if k not in NOT_INPUTS}
    if "x" not in arrays and len(named) >= 2:
        x, inputs = _several_inputs(named, source)
    elif "x" not in arrays:
        raise DataError(f"data {source} has no array 'x' (found: {sorted(arrays) or 'none'}; "
                        "a model with several inputs takes one array per input name)")
    else:
        x = arrays["x"]
    if x.dtype.kind not in "fiu" or x.ndim < 2:
        raise DataError(f"data {source}: x must be numeric with shape (samples, ...), "
                        f"got {x.dtype} {x.shape}")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.argwhere(bad.reshape(len(x), -1).any(axis=1))[0][0])
        raise DataError(f"data {source}: x has {int(bad.sum())} NaN/inf values "
                        f"(first in sample {first})")
    if len(x) < MIN_SAMPLES:
        raise DataError(f"data {source}: {len(x)} samples, need at least {MIN_SAMPLES}")
    y, targets = None, None
    if "y" in arrays and task == "regress":
        targets = _targets(arrays["y"], len(x), source)
    elif "y" in arrays:
        y = _class_labels(arrays["y"], len(x), source)
    labels = None
    if "labels" in arrays:
        raw_labels = arrays["labels"]
        if raw_labels.ndim != 1 or raw_labels.dtype.kind not in "US" or not len(raw_labels):
            raise DataError(f"data {source}: labels must be a 1-D array of class names, got "
                            f"{raw_labels.dtype} {raw_labels.shape}")
        labels = [str(v.decode() if isinstance(v, bytes) else v) for v in raw_labels]
        if y is not None and int(y.max()) >= len(labels):
            raise DataError(f"data {source}: y goes up to {int(y.max())} but labels names "
                            f"{len(labels)} classes")
    try:
        layout_for(tuple(x.shape[1:]))
    except ValueError as exc:
        raise DataError(f"data {source}: {exc}") from exc
    return Dataset(x=x, y=y, source=source, labels=labels, targets=targets, inputs=inputs)


def _several_inputs(named: dict[str, np.ndarray], source: str
                    ) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
    """One array per input name: their samples' values side by side, and which are whose.

    Raises:
        DataError: an array that is not numeric samples, or counts that differ.
    """
    counts = {k: len(v) if v.ndim else 0 for k, v in named.items()}
    for name, arr in named.items():
        if arr.dtype.kind not in "fiu" or arr.ndim < 2:
            raise DataError(f"data {source}: input {name} must be numeric with shape "
                            f"(samples, ...), got {arr.dtype} {arr.shape}")
    if len(set(counts.values())) != 1:
        raise DataError(f"data {source}: the inputs hold different numbers of samples "
                        f"({', '.join(f'{k} {n}' for k, n in counts.items())})")
    inputs = [(k, tuple(int(d) for d in v.shape[1:])) for k, v in named.items()]
    return pack([named[k] for k, _ in inputs]), inputs


def order_inputs(data: Dataset, names: list[str]) -> Dataset:
    """`data`'s inputs in the model's order `names` (a model with several inputs).

    Raises:
        DataError: the data does not hold one array per input of the model.
    """
    if data.inputs is None:
        raise DataError(f"data {data.source}: the model has {len(names)} inputs "
                        f"({', '.join(names)}): give one array per input, named as the "
                        "model names them (np.savez(f, "
                        f"{', '.join(f'{n}=...' for n in names)}, y=...)), not x")
    have = [n for n, _ in data.inputs]
    if sorted(have) != sorted(names):
        raise DataError(f"data {data.source} holds inputs {', '.join(have)}; the model takes "
                        f"{', '.join(names)}")
    if have == names:
        return data
    parts = dict(zip(have, unpack(data.x, [s for _, s in data.inputs]), strict=True))
    shapes = dict(data.inputs)
    return replace(data, x=pack([parts[n] for n in names]),
                   inputs=[(n, shapes[n]) for n in names])


def _class_labels(y: np.ndarray, n: int, source: str) -> I64:
    """Integer class labels, (N,), at least two classes.

    Raises:
        DataError: float or misshapen, negative, or a single class.
    """
    if y.shape != (n,) or y.dtype.kind not in "iu":
        floats = (" (float targets are a regressor's: --model-task regress)"
                  if y.dtype.kind == "f" else "")
        raise DataError(f"data {source}: y must be integer labels of shape ({n},), "
                        f"got {y.dtype} {y.shape}{floats}")
    if y.min() < 0:
        raise DataError(f"data {source}: y has negative labels")
    if len(np.unique(y)) < 2:
        raise DataError(f"data {source}: y has only one class (every label is "
                        f"{int(y[0])}); a classifier needs samples of two or more")
    return y.astype(np.int64)


def _targets(y: np.ndarray, n: int, source: str) -> F32:
    """A regressor's true outputs as (N, k) float32.

    Raises:
        DataError: not numeric, not (N,) or (N, k), or NaN/inf.
    """
    if y.dtype.kind not in "fiu" or y.ndim not in (1, 2) or len(y) != n:
        raise DataError(f"data {source}: y (the regression targets) must be numeric of shape "
                        f"({n},) or ({n}, outputs), got {y.dtype} {y.shape}")
    t = y.astype(np.float32).reshape(n, -1)
    if not np.isfinite(t).all():
        raise DataError(f"data {source}: y (the regression targets) has "
                        f"{int((~np.isfinite(t)).sum())} NaN/inf values")
    return t


def split(n: int, y: I64 | None, *, seed: int, val_fraction: float,
          test_fraction: float) -> Split:
    """Deterministic train/val/test split, stratified by label when labels exist."""
    from sklearn.model_selection import train_test_split  # noqa: PLC0415  # optional: when used

    idx = np.arange(n)
    strat = y if y is not None and np.bincount(y).min() >= 3 else None
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                  stratify=strat)
    strat_rest = strat[rest] if strat is not None else None
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                  random_state=seed + 1, stratify=strat_rest)
    return Split(train=np.sort(train), val=np.sort(val), test=np.sort(test))


def calibration_indices(split_: Split, count: int, seed: int) -> npt.NDArray[np.intp]:
    """Real training samples for int8 calibration (never the test split)."""
    rng = np.random.default_rng(seed + 2)
    count = min(count, len(split_.train))
    return np.sort(rng.choice(split_.train, size=count, replace=False))
