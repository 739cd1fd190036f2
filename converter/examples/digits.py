"""The digits example: a real teacher trained here on scikit-learn's digits.

`teacher()` is the torch factory a recipe names as `converter.examples.digits:teacher`;
`write_example(dir)` trains it, and writes `digits.npz`, `teacher.pt` (state_dict),
`teacher.onnx` (the same network exported, to exercise the any-framework ONNX path) and
`recipe.toml`, so both teacher paths can be tried on the same data.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from converter.data import load_digits_dataset, split


def teacher() -> nn.Module:
    """A wide CNN: about 180k parameters, ~98-99 % on digits."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(64 * 4 * 4, 160), nn.ReLU(),
        nn.Linear(160, 10),
    )


def train_teacher(epochs: int = 40, seed: int = 0) -> tuple[nn.Module, float]:
    """Train the teacher on the pipeline's training split only (the validation split the
    quality gates use stays as new to it as to the student); returns it and test
    accuracy."""
    ds = load_digits_dataset()
    assert ds.y is not None
    return fit_teacher(teacher, ds.x, ds.y, epochs=epochs, lr=2e-3, seed=seed)


def fit_teacher(make: Callable[[], nn.Module], x: np.ndarray, y: np.ndarray, *, epochs: int,
                lr: float, seed: int) -> tuple[nn.Module, float]:
    """Cross-entropy training of an example's teacher (built by `make` after seeding, so
    its initial weights are reproducible) on the pipeline's training split (default recipe
    fractions); returns it and its test accuracy."""
    torch.manual_seed(seed)
    model = make()
    sp = split(len(x), y, seed=seed, val_fraction=0.15, test_fraction=0.2)
    train_idx = torch.from_numpy(sp.train)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(train_idx), generator=gen).split(64):
            idx = train_idx[batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    test = torch.from_numpy(sp.test)
    with torch.no_grad():
        pred = model(xt[test]).argmax(1)
    return model, float((pred == yt[test]).float().mean())


RECIPE = """\
# Digits example: distill the wide CNN teacher into a small CNN, int8 for the target.
out = "out"

[data]
source = "digits.npz"

[teacher]
{teacher}

[student]
family = "cnn"
channels = [8, 16]

[target]
profile = "{profile}"

[bundle]
name = "digits"
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
"""


def write_example(out_dir: Path, *, profile: str = "raspberry-pi-4", epochs: int = 40,
                  teacher_kind: str = "onnx") -> float:
    """Write data, teacher (torch weights and ONNX) and a recipe; returns teacher accuracy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = load_digits_dataset()
    assert ds.y is not None
    np.savez_compressed(out_dir / "digits.npz", x=ds.x, y=ds.y)
    model, acc = train_teacher(epochs=epochs)
    write_teacher(out_dir, model, ds.x[:2], "image", "converter.examples.digits:teacher",
                  RECIPE, profile=profile, teacher_kind=teacher_kind)
    return acc


def write_teacher(out_dir: Path, model: nn.Module, example: np.ndarray, input_name: str,
                  factory: str, recipe: str, *, profile: str, teacher_kind: str) -> None:
    """Write an example's trained teacher as `teacher.pt` (state_dict) and `teacher.onnx`
    (the same network exported with a dynamic batch), and `recipe.toml` naming one of
    them (`teacher_kind`)."""
    torch.save(model.state_dict(), out_dir / "teacher.pt")
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress
        torch.onnx.export(model, (torch.from_numpy(example),), str(out_dir / "teacher.onnx"),
                          input_names=[input_name], output_names=["logits"], dynamo=True,
                          external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    teacher_line = ('onnx = "teacher.onnx"' if teacher_kind == "onnx" else
                    f'torch = "{factory}"\nweights = "teacher.pt"')
    (out_dir / "recipe.toml").write_text(recipe.format(teacher=teacher_line, profile=profile))
