"""The MLPerf Tiny reference architectures, at their reference sizes, as student families.

MLPerf Tiny (Banbury et al., "MLPerf Tiny Benchmark", NeurIPS 2021 Datasets and
Benchmarks; reference code github.com/mlcommons/tiny, `benchmark/training/`) fixes four
models; these are the same layers, widths, kernels and strides, written in torch:

- `resnet8` (image classification, CIFAR-10 32x32x3): a 16-wide 3x3 stem, three residual
  stacks of two 3x3 convs (16, 32 and 64 wide, the last two stride 2 with a 1x1 projection
  shortcut), an average pool over the whole map and one dense layer. About 78k parameters.
- `kws-dscnn` (keyword spotting, 49x10 MFCC): a 64-wide 10x4 stride-2 stem, four
  depthwise-separable blocks (3x3 depthwise + 1x1 pointwise, 64 wide, BN + ReLU each),
  average pool, dense. About 24k parameters.
- `mobilenet-v1` (visual wake words, 96x96x3): MobileNetV1 at width multiplier 0.25: a
  3x3 stride-2 stem of 8, thirteen depthwise-separable blocks (16 ... 256 wide), average
  pool, dense. About 210k parameters.
- `fc-autoencoder` (anomaly detection, 5 frames x 128 log-mel bins = 640 inputs): dense
  128 x4, a bottleneck of 8, dense 128 x4 (each with BN + ReLU), dense back to the input
  size. About 270k parameters. Its output is the reconstructed input, not class scores:
  the reconstruction error is the anomaly score.

They accept other input sizes (pools and kernels follow the map), but the sizes above are
the reference. Dropout layers of the training code are left out: they are identity at
inference, and the converter's training has its own regularization.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from converter.errors import RecipeError

FAMILIES = ("resnet8", "kws-dscnn", "mobilenet-v1", "fc-autoencoder")
# Families whose output is the input reconstructed (model.task = "reconstruct").
RECONSTRUCTORS = ("fc-autoencoder",)


def _image(input_shape: tuple[int, ...], family: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise RecipeError(f"{family} takes images (C, H, W), got samples of shape "
                          f"{input_shape}")
    c, h, w = input_shape
    return c, h, w


def _conv_bn(c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
             groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (same padding) + BN (+ ReLU): a Sequential, so BN folds before export."""
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=(k[0] // 2, k[1] // 2),
                  groups=groups, bias=False),
        nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _out(size: int, stride: int) -> int:
    return (size + stride - 1) // stride


class Residual(nn.Module):
    """relu(body(x) + shortcut(x)): ResNet-8's stack."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c_in, c_out, 3, stride),
                                  _conv_bn(c_out, c_out, 3, relu=False))
        self.shortcut: nn.Module = (nn.Identity() if stride == 1 and c_in == c_out else
                                    nn.Conv2d(c_in, c_out, 1, stride=stride))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.body(x) + self.shortcut(x))
        return out


def _head(channels: int, h: int, w: int, classes: int) -> list[nn.Module]:
    """Average pool over the whole map (one AVERAGE_POOL_2D every NPU runs), dense."""
    return [nn.AvgPool2d((h, w)), nn.Flatten(), nn.Linear(channels, classes)]


def resnet8(input_shape: tuple[int, ...], classes: int) -> nn.Sequential:
    c, h, w = _image(input_shape, "resnet8")
    layers: list[nn.Module] = [_conv_bn(c, 16, 3)]
    c_in = 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        layers.append(Residual(c_in, width, stride))
        h, w, c_in = _out(h, stride), _out(w, stride), width
    return nn.Sequential(*layers, *_head(c_in, h, w, classes))


def kws_dscnn(input_shape: tuple[int, ...], classes: int, width: int = 64,
              blocks: int = 4) -> nn.Sequential:
    c, h, w = _image(input_shape, "kws-dscnn")
    kernel = (min(10, h), min(4, w))
    layers: list[nn.Module] = [_conv_bn(c, width, kernel, stride=2)]
    h, w = _out(h, 2), _out(w, 2)
    for _ in range(blocks):
        layers += [_conv_bn(width, width, 3, groups=width), _conv_bn(width, width, 1)]
    return nn.Sequential(*layers, *_head(width, h, w, classes))


# MobileNetV1's pointwise widths at alpha = 1 and the depthwise stride of each block.
_MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                     (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def mobilenet_v1(input_shape: tuple[int, ...], classes: int,
                 alpha: float = 0.25) -> nn.Sequential:
    c, h, w = _image(input_shape, "mobilenet-v1")
    c_in = int(32 * alpha)
    layers: list[nn.Module] = [_conv_bn(c, c_in, 3, stride=2)]
    h, w = _out(h, 2), _out(w, 2)
    for width, stride in _MOBILENET_BLOCKS:
        c_out = int(width * alpha)
        layers += [_conv_bn(c_in, c_in, 3, stride=stride, groups=c_in),
                   _conv_bn(c_in, c_out, 1)]
        h, w, c_in = _out(h, stride), _out(w, stride), c_out
    return nn.Sequential(*layers, *_head(c_in, h, w, classes))


def _dense_bn(f_in: int, f_out: int) -> list[nn.Module]:
    return [nn.Linear(f_in, f_out), nn.BatchNorm1d(f_out), nn.ReLU()]


def fc_autoencoder(input_shape: tuple[int, ...], hidden: int = 128,
                   bottleneck: int = 8) -> nn.Sequential:
    """Dense autoencoder; the output has the input's shape."""
    features = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [features, hidden, hidden, hidden, hidden, bottleneck,
              hidden, hidden, hidden, hidden]
    for f_in, f_out in itertools.pairwise(widths):
        layers += _dense_bn(f_in, f_out)
    layers.append(nn.Linear(hidden, features))
    if len(input_shape) > 1:
        layers.append(nn.Unflatten(1, input_shape))
    return nn.Sequential(*layers)


def build(family: str, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """One of FAMILIES for this input shape (`classes` is unused by the autoencoder)."""
    if family == "resnet8":
        return resnet8(input_shape, classes)
    if family == "kws-dscnn":
        return kws_dscnn(input_shape, classes)
    if family == "mobilenet-v1":
        return mobilenet_v1(input_shape, classes)
    if family == "fc-autoencoder":
        return fc_autoencoder(input_shape)
    raise RecipeError(f"unknown MLPerf Tiny family {family!r}; one of {', '.join(FAMILIES)}")


def macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one inference (convolutions and dense layers), counted with
    forward hooks on a zero sample."""
    total = 0

    def conv(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d | nn.Conv1d)
        per_out = (m.in_channels // m.groups) * math.prod(m.kernel_size)
        total += int(out.numel()) * per_out

    def dense(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Linear)
        total += int(out.numel()) * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d | nn.Conv1d) else dense)
             for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
