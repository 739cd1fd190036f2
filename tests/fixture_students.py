"""Student modules for tests, imported by recipes as `fixture_students:<name>`."""

from __future__ import annotations

import torch
from torch import nn


class SinStudent(nn.Module):
    """A small MLP with a SIN activation: an operator no int8 NPU runs."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(features, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sin(self.fc1(self.flat(x))))


def sin_student(input_shape: tuple[int, ...], classes: int) -> nn.Module:
    features = 1
    for d in input_shape:
        features *= d
    return SinStudent(features, classes)
