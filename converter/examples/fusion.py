"""A model with two inputs, given as ONNX: a machine's state from two sensors at once.

`features` holds 6 summary values of a motor (current, speed, temperatures, ...) and
`window` a 2-axis vibration window of 32 steps; the classes are normal, imbalance and
bearing wear, generated here (imbalance raises the vibration at the rotation frequency and
the current, wear adds broadband noise and heat). The model reads both: a small MLP on the
features, a 1-D convolution on the window, joined before the classifier, as sensor fusion
models are built. It is trained here and exported to ONNX with its two named inputs, and
the data is written one array per input name (`features`, `window`), the way
`edge-convert run --model-onnx` takes a model with several inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from converter.data import split

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
LABELS = ["normal", "imbalance", "bearing_wear"]
STEPS = 32


class Fusion(nn.Module):
    """features (N, 6) and window (N, 2, STEPS) -> class logits (N, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.window = nn.Sequential(nn.Conv1d(2, 8, 5, stride=2), nn.ReLU(),
                                    nn.Conv1d(8, 8, 3, stride=2), nn.ReLU(),
                                    nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.head = nn.Linear(16 + 8, len(LABELS))

    def forward(self, features: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([self.features(features), self.window(window)], 1)
        return self.head(joined)  # type: ignore[no-any-return]


def make_data(n: int = 900, seed: int = 0) -> tuple[F32, F32, I64]:
    """(features, window, y): generated, a third of each class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(LABELS)
    rng.shuffle(y)
    t = np.arange(STEPS) / STEPS
    speed = rng.uniform(0.6, 1.4, n)
    phase = rng.uniform(0, 2 * np.pi, (n, 2))
    amp = 0.3 + 0.9 * (y == 1) + rng.normal(0, 0.15, n)
    window = (amp[:, None, None] * np.sin(2 * np.pi * 4 * speed[:, None, None] * t
                                          + phase[:, :, None])
              + rng.normal(0, 0.2 + 0.5 * (y == 2), (STEPS, 2, n)).T)
    features = np.stack([
        1.0 + 0.35 * (y == 1) + rng.normal(0, 0.15, n),  # current
        speed,
        40 + 6 * (y == 2) + rng.normal(0, 3, n),  # bearing temperature
        35 + rng.normal(0, 3, n),  # winding temperature
        rng.normal(0, 1, n),  # load
        rng.normal(0, 1, n),  # supply voltage deviation
    ], 1)
    return features.astype(np.float32), window.astype(np.float32), y.astype(np.int64)


def train(features: F32, window: F32, y: I64, *, epochs: int = 60, seed: int = 0
          ) -> tuple[Fusion, float]:
    """The model trained on the pipeline's training split (default fractions); returns it
    and its test accuracy."""
    torch.manual_seed(seed)
    sp = split(len(y), y, seed=seed, val_fraction=0.15, test_fraction=0.2)
    model = Fusion()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    f, w, t = torch.from_numpy(features), torch.from_numpy(window), torch.from_numpy(y)
    train_idx = torch.from_numpy(sp.train)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in train_idx[torch.randperm(len(train_idx), generator=gen)].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(f[batch], w[batch]), t[batch]).backward()
            opt.step()
    model.eval()
    test = torch.from_numpy(sp.test)
    with torch.no_grad():
        right = model(f[test], w[test]).argmax(1) == t[test]
    return model, float(right.float().mean())


def export(model: Fusion, path: Path) -> Path:
    """ONNX with the inputs named `features` and `window` and a dynamic batch."""
    batch = torch.export.Dim("batch")
    sample = (torch.zeros(2, 6), torch.zeros(2, 2, STEPS))
    torch.onnx.export(model.eval(), sample, str(path), input_names=["features", "window"],
                      output_names=["logits"], dynamo=True, external_data=False,
                      dynamic_shapes=({0: batch}, {0: batch}))
    return path


RECIPE = """\
# A model with two inputs (6 motor features and a 2 x {steps} vibration window), given as
# ONNX and quantized as trained. The data holds one array per input name.
out = "out"

[data]
source = "data.npz"

[model]
onnx = "fusion.onnx"

[target]
profile = "{profile}"

[bundle]
name = "fusion"
"""


def write_example(out_dir: Path, *, profile: str = "raspberry-pi-4", epochs: int | None = None,
                  teacher_kind: str = "onnx") -> float:
    """Write data.npz (features, window, y, labels), fusion.onnx and recipe.toml; returns
    the model's test accuracy. `teacher_kind` is accepted for the CLI's sake: the model
    is ONNX."""
    del teacher_kind
    out_dir.mkdir(parents=True, exist_ok=True)
    features, window, y = make_data()
    np.savez_compressed(out_dir / "data.npz", features=features, window=window, y=y,
                        labels=np.asarray(LABELS))
    model, accuracy = train(features, window, y, epochs=epochs or 60)
    export(model, out_dir / "fusion.onnx")
    (out_dir / "recipe.toml").write_text(RECIPE.format(steps=STEPS, profile=profile))
    return accuracy
