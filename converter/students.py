"""Built-in student families, sized by options, or a user module.

- `mlp`: flatten, then Linear+ReLU per `hidden` width.
- `cnn`: per `channels` width a 3x3 Conv+BN+ReLU stage, 2x2 max-pool while the map is >= 4.
- `dscnn`: one regular 3x3 stem, then depthwise-separable stages (3x3 depthwise + 1x1
  pointwise, BN, ReLU6), MobileNet style: few MACs and ops every NPU runs.

All are plain `nn.Sequential`s of standard layers so BN folds away before export and every
op maps to an int8 kernel on the targets in `firmware_profiles/`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from converter.errors import RecipeError, TeacherError
from converter.teacher import import_factory

if TYPE_CHECKING:
    from converter.recipe import StudentOptions


def _pool_plan(spatial: int, stages: int) -> list[bool]:
    plan = []
    for _ in range(stages):
        pool = spatial >= 4
        plan.append(pool)
        spatial = spatial // 2 if pool else spatial
    return plan


def _head(channels: int, spatial: int, classes: int) -> list[nn.Module]:
    return [nn.Flatten(), nn.Linear(channels * spatial * spatial, classes)]


def mlp(input_shape: tuple[int, ...], classes: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(torch.tensor(input_shape).prod())
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], classes: int, channels: list[int]) -> nn.Sequential:
    c_in, spatial = _image_shape(input_shape)
    layers: list[nn.Module] = []
    for c, pool in zip(channels, _pool_plan(spatial, len(channels)), strict=True):
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
            spatial //= 2
        c_in = c
    return nn.Sequential(*layers, *_head(c_in, spatial, classes))


def dscnn(input_shape: tuple[int, ...], classes: int, channels: list[int]) -> nn.Sequential:
    c_in, spatial = _image_shape(input_shape)
    stem = channels[0]
    layers: list[nn.Module] = [nn.Conv2d(c_in, stem, 3, padding=1, bias=False),
                               nn.BatchNorm2d(stem), nn.ReLU6()]
    c_in = stem
    for c, pool in zip(channels[1:], _pool_plan(spatial, len(channels) - 1), strict=True):
        stride = 2 if pool else 1
        layers += [
            nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in), nn.ReLU6(),
            nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(),
        ]
        spatial = (spatial + 1) // 2 if pool else spatial
        c_in = c
    return nn.Sequential(*layers, *_head(c_in, spatial, classes))


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise RecipeError(f"cnn/dscnn students need square (C, H, W) samples, got "
                          f"{input_shape}; use student.family = 'mlp' or a module")
    return input_shape[0], input_shape[1]


def build_student(opts: StudentOptions, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """Build the student the recipe asks for.

    Raises:
        RecipeError: bad sizes, unusable input shape, or a module factory that fails.
    """
    if any(w < 1 for w in [*opts.hidden, *opts.channels]):
        raise RecipeError("student widths must be positive")
    if opts.family == "mlp":
        return mlp(input_shape, classes, opts.hidden)
    if opts.family == "cnn":
        return cnn(input_shape, classes, opts.channels)
    if opts.family == "dscnn":
        if len(opts.channels) < 2:
            raise RecipeError("dscnn needs at least two channel widths (stem + one stage)")
        return dscnn(input_shape, classes, opts.channels)
    assert opts.module is not None  # checked by StudentOptions
    try:
        make = import_factory(opts.module, "student module")
    except TeacherError as exc:
        raise RecipeError(str(exc)) from exc
    model = make(input_shape, classes)
    if not isinstance(model, nn.Module):
        raise RecipeError(f"student module {opts.module} returned {type(model).__name__}, "
                          f"not a torch.nn.Module")
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def nonzero_params(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every Conv2d directly followed by BatchNorm2d in a Sequential (eval-mode math)."""
    model.eval()
    if isinstance(model, nn.Sequential):
        return _fold_sequence(model)
    for name, child in list(model.named_children()):
        setattr(model, name, fold_batchnorm(child))
    return model


def _fold_sequence(seq: nn.Sequential) -> nn.Sequential:
    from torch.nn.utils.fusion import fuse_conv_bn_eval  # noqa: PLC0415  # optional: when used

    layers = [fold_batchnorm(m) for m in seq]
    out: list[nn.Module] = []
    i = 0
    while i < len(layers):
        here, nxt = layers[i], layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(here, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            out.append(fuse_conv_bn_eval(here, nxt))
            i += 2
        else:
            out.append(here)
            i += 1
    return nn.Sequential(*out).eval()
