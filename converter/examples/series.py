"""The series example: synthetic vibration signals, generated here, and a 1-D CNN teacher.

Four machine states as an accelerometer on a rotating machine would show them, 128 samples
per window, in raw sensor units (milli-g around a 1 g offset, so the converter's
normalization has work to do):

- `normal`: the running frequency, weak, plus noise;
- `imbalance`: a strong component at the running frequency;
- `misalignment`: a strong second harmonic;
- `bearing`: short bursts of a high-frequency ring, at random times.

Frequencies, phases, amplitudes and burst times are drawn per window, so the classes
overlap and a good model needs the shape of the signal, not one sample. This is a
generated data set for exercising the pipeline, not a benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from converter.data import F32, I64
from converter.examples.digits import fit_teacher, write_teacher

LABELS = ["normal", "imbalance", "misalignment", "bearing"]
LENGTH = 128
OFFSET_MG = 1000.0


def make_series(n_per_class: int = 300, seed: int = 0) -> tuple[F32, I64]:
    """(x, y): x shaped (N, 1, LENGTH) in milli-g, y the class index into LABELS."""
    rng = np.random.default_rng(seed)
    t = np.arange(LENGTH, dtype=np.float64)
    xs, ys = [], []
    for cls in range(len(LABELS)):
        for _ in range(n_per_class):
            f = rng.uniform(2.0, 4.0) / LENGTH  # the running frequency, cycles per sample
            phase = rng.uniform(0, 2 * np.pi, size=3)
            amp = rng.uniform(0.7, 1.3)
            sig = 30 * amp * np.sin(2 * np.pi * f * t + phase[0])
            if cls == 1:
                sig += 90 * amp * np.sin(2 * np.pi * f * t + phase[1])
            elif cls == 2:
                sig += 70 * amp * np.sin(2 * np.pi * 2 * f * t + phase[1])
            elif cls == 3:
                for start in rng.integers(0, LENGTH - 12, size=rng.integers(2, 4)):
                    k = np.arange(12)
                    sig[start:start + 12] += (60 * amp * np.exp(-k / 4)
                                              * np.sin(2 * np.pi * 0.3 * k + phase[2]))
            sig += rng.normal(0, 15, LENGTH)
            xs.append(OFFSET_MG + sig)
            ys.append(cls)
    order = rng.permutation(len(xs))
    x = np.asarray(xs, dtype=np.float32)[order][:, None, :]
    return x, np.asarray(ys, dtype=np.int64)[order]


def teacher() -> nn.Module:
    """A 1-D CNN over raw milli-g (it standardizes its input itself, like a model
    trained with its own preprocessing layer): about 30k parameters."""
    return nn.Sequential(
        _Standardize(OFFSET_MG, 60.0),
        nn.Conv1d(1, 32, 7, padding=3), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(32, 48, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(48, 64, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
        nn.Flatten(), nn.Linear(64, len(LABELS)),
    )


class _Standardize(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def train_teacher(x: F32, y: I64, *, epochs: int = 25, seed: int = 0) -> tuple[nn.Module, float]:
    """Train the teacher on the pipeline's training split only (default recipe fractions;
    the validation split the quality gates use stays new to it); returns it and its test
    accuracy."""
    return fit_teacher(teacher, x, y, epochs=epochs, lr=3e-3, seed=seed)


RECIPE = """\
# Series example: a 1-D CNN teacher on raw vibration windows (milli-g), distilled into the
# default student for sequences; normalization is fitted here and applied on the device.
out = "out"

[data]
source = "series.npz"

[teacher]
{teacher}

[target]
profile = "{profile}"
"""


def write_example(out_dir: Path, *, profile: str = "raspberry-pi-4", epochs: int = 25,
                  teacher_kind: str = "onnx") -> float:
    """Write series.npz (x, y, labels), teacher.pt, teacher.onnx and recipe.toml; returns
    the teacher's test accuracy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    x, y = make_series()
    np.savez_compressed(out_dir / "series.npz", x=x, y=y, labels=np.array(LABELS))
    model, acc = train_teacher(x, y, epochs=epochs)
    write_teacher(out_dir, model, x[:2], "signal", "converter.examples.series:teacher", RECIPE,
                  profile=profile, teacher_kind=teacher_kind)
    return acc
