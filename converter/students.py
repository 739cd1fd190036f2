"""Built-in student families, sized by options, or a user module.

- `mlp`: flatten, then Linear+ReLU per `hidden` width (vectors; the default for them).
- `cnn`: per `channels` width a 3-wide Conv+BN+ReLU stage, 2x max-pool while the map's
  smallest side is >= 4; 1-D for sequences (C, L), 2-D for images (C, H, W) of any H x W
  (the default for both).
- `dscnn`: one regular 3-wide stem, then depthwise-separable stages (3-wide depthwise + 1x1
  pointwise, BN, ReLU6), MobileNet style: few MACs and ops every NPU runs; 1-D or 2-D as cnn.
- `auto`: the default family for the sample's rank.
- `resnet8`, `kws-dscnn`, `mobilenet-v1`, `fc-autoencoder`: the MLPerf Tiny reference
  architectures at their reference sizes (`converter.tiny`).

All are plain `nn.Sequential`s of standard layers so BN folds away before export and every
op maps to an int8 kernel on the targets in `firmware_profiles/`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import nn

from converter import tiny
from converter.errors import RecipeError, TeacherError
from converter.teacher import import_factory

if TYPE_CHECKING:
    from converter.recipe import StudentOptions


Conv = type[nn.Conv1d] | type[nn.Conv2d]


def _spatial(input_shape: tuple[int, ...], family: str) -> tuple[int, list[int]]:
    """(channels, spatial sizes) of a sequence (C, L) or image (C, H, W) sample."""
    if len(input_shape) not in (2, 3):
        raise RecipeError(f"{family} students take sequences (C, L) or images (C, H, W), got "
                          f"samples of shape {input_shape}; use student.family = 'mlp' for "
                          "vectors, or a module")
    return input_shape[0], list(input_shape[1:])


def _ops(dims: int) -> tuple[Conv, type[nn.BatchNorm1d] | type[nn.BatchNorm2d],
                             type[nn.MaxPool1d] | type[nn.MaxPool2d]]:
    if dims == 1:
        return nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d
    return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d


def _pool(sizes: list[int]) -> bool:
    """Halve the map while its smallest side is at least 4."""
    return min(sizes) >= 4


def _head(channels: int, sizes: list[int], classes: int) -> list[nn.Module]:
    return [nn.Flatten(), nn.Linear(channels * math.prod(sizes), classes)]


def mlp(input_shape: tuple[int, ...], classes: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], classes: int, channels: list[int]) -> nn.Sequential:
    """Per width a 3-wide Conv+BN+ReLU stage and a 2x max-pool while the map allows;
    1-D for sequences, 2-D for images of any H x W."""
    c_in, sizes = _spatial(input_shape, "cnn")
    conv, bn, pool = _ops(len(sizes))
    layers: list[nn.Module] = []
    for c in channels:
        layers += [conv(c_in, c, 3, padding=1, bias=False), bn(c), nn.ReLU()]
        if _pool(sizes):
            layers.append(pool(2))
            sizes = [s // 2 for s in sizes]
        c_in = c
    return nn.Sequential(*layers, *_head(c_in, sizes, classes))


def dscnn(input_shape: tuple[int, ...], classes: int, channels: list[int]) -> nn.Sequential:
    """A regular 3-wide stem, then depthwise-separable stages (depthwise 3 + pointwise 1,
    BN, ReLU6; stride 2 while the map allows); 1-D for sequences, 2-D for images."""
    c_in, sizes = _spatial(input_shape, "dscnn")
    conv, bn, _ = _ops(len(sizes))
    stem = channels[0]
    layers: list[nn.Module] = [conv(c_in, stem, 3, padding=1, bias=False), bn(stem),
                               nn.ReLU6()]
    c_in = stem
    for c in channels[1:]:
        stride = 2 if _pool(sizes) else 1
        layers += [
            conv(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
            bn(c_in), nn.ReLU6(),
            conv(c_in, c, 1, bias=False), bn(c), nn.ReLU6(),
        ]
        sizes = [(s + 1) // 2 for s in sizes] if stride == 2 else sizes
        c_in = c
    return nn.Sequential(*layers, *_head(c_in, sizes, classes))


def default_channels(input_shape: tuple[int, ...]) -> list[int]:
    """cnn/dscnn widths when the recipe gives none: [16, 32] for sequences (one channel
    of 128 samples carries less per position than an image row), [8, 16] for images."""
    return [16, 32] if len(input_shape) == 2 else [8, 16]


def resolve_family(family: str, input_shape: tuple[int, ...]) -> str:
    """The family asked for, `auto` resolved: mlp for vectors, cnn for sequences and
    images."""
    if family != "auto":
        return family
    return "mlp" if len(input_shape) == 1 else "cnn"


def build_student(opts: StudentOptions, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """Build the student the recipe asks for.

    Raises:
        RecipeError: bad sizes, unusable input shape, or a module factory that fails.
    """
    channels = opts.channels or default_channels(input_shape)
    if any(w < 1 for w in [*opts.hidden, *channels]):
        raise RecipeError("student widths must be positive")
    family = resolve_family(opts.family, input_shape)
    if family == "mlp":
        return mlp(input_shape, classes, opts.hidden)
    if family == "cnn":
        return cnn(input_shape, classes, channels)
    if family == "dscnn":
        if len(channels) < 2:
            raise RecipeError("dscnn needs at least two channel widths (stem + one stage)")
        return dscnn(input_shape, classes, channels)
    if family in tiny.FAMILIES:
        return tiny.build(family, input_shape, classes)
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
    """Fold every Conv1d/Conv2d or Linear directly followed by its BatchNorm in a
    Sequential, in any submodule (eval-mode math)."""
    model.eval()
    if isinstance(model, nn.Sequential):
        return _fold_sequence(model)
    for name, child in list(model.named_children()):
        setattr(model, name, fold_batchnorm(child))
    return model


def _fold_sequence(seq: nn.Sequential) -> nn.Sequential:
    from torch.nn.utils.fusion import (  # noqa: PLC0415  # optional: when used
        fuse_conv_bn_eval,
        fuse_linear_bn_eval,
    )

    layers = [fold_batchnorm(m) for m in seq]
    out: list[nn.Module] = []
    i = 0
    while i < len(layers):
        here, nxt = layers[i], layers[i + 1] if i + 1 < len(layers) else None
        if ((isinstance(here, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d))
                or (isinstance(here, nn.Conv1d) and isinstance(nxt, nn.BatchNorm1d))):
            out.append(fuse_conv_bn_eval(here, nxt))
            i += 2
        elif isinstance(here, nn.Linear) and isinstance(nxt, nn.BatchNorm1d):
            out.append(fuse_linear_bn_eval(here, nxt))
            i += 2
        else:
            out.append(here)
            i += 1
    return nn.Sequential(*out).eval()
