"""Samples in, checked and split deterministically.

Data is an `.npz` with `x` (numeric samples, first axis = samples: vectors (N, F), sequences
(N, C, L) or images (N, C, H, W)), optionally `y` (integer class labels) and `labels` (class
names, a string array), or the built-in `digits` set from scikit-learn's `load_digits` (1,797 8x8
grey images scaled to [0, 1], shape (N, 1, 8, 8)). Nothing is downloaded.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

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


def load_dataset(source: str) -> Dataset:
    """Load `digits` or an `.npz` file and check it.

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
    return validate(arrays, str(path))


def validate(arrays: dict[str, np.ndarray], source: str) -> Dataset:
    """Check raw arrays and build a Dataset (see load_dataset for the rules)."""
    if "x" not in arrays:
        raise DataError(f"data {source} has no array 'x' (found: {sorted(arrays) or 'none'})")
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
    y = None
    if "y" in arrays:
        y_raw = arrays["y"]
        if y_raw.shape != (len(x),) or y_raw.dtype.kind not in "iu":
            raise DataError(f"data {source}: y must be integer labels of shape ({len(x)},), "
                            f"got {y_raw.dtype} {y_raw.shape}")
        if y_raw.min() < 0:
            raise DataError(f"data {source}: y has negative labels")
        if len(np.unique(y_raw)) < 2:
            raise DataError(f"data {source}: y has only one class (every label is "
                            f"{int(y_raw[0])}); a classifier needs samples of two or more")
        y = y_raw.astype(np.int64)
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
    return Dataset(x=x, y=y, source=source, labels=labels)


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
