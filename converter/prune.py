"""Pruning, then distillation fine-tuning to win the accuracy back.

- unstructured: global L1 magnitude pruning (torch.nn.utils.prune) over every Conv/Linear
  weight to a target sparsity. Zeros compress (see the gzipped sizes in the report) but do
  not make dense kernels faster; the report says so.
- structured: channel pruning with Torch-Pruning's dependency graph (a maintained library
  that also handles user modules): whole output channels/units with the smallest L1 norm are
  removed and every layer that consumes them shrinks to match, so the model really gets
  smaller and faster. The classifier's outputs are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from converter.errors import RecipeError
from converter.students import nonzero_params, param_count


@dataclass(frozen=True)
class PruneResult:
    method: str
    params_before: int
    params_after: int
    nonzero_after: int
    sparsity: float  # share of zero weights after pruning (over Conv/Linear weights)


def _weighted(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]


def weight_sparsity(model: nn.Module) -> float:
    ws: list[torch.Tensor] = [m.weight for m in _weighted(model)]  # type: ignore[misc]
    total = sum(int(w.numel()) for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / max(total, 1)


def apply_unstructured(model: nn.Module, sparsity: float) -> None:
    """Mask the smallest-|w| share of all Conv/Linear weights (masks stay during fine-tune)."""
    params = [(m, "weight") for m in _weighted(model)]
    if not params:
        raise RecipeError("unstructured pruning found no Conv/Linear layers")
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)


def finalize_unstructured(model: nn.Module) -> None:
    """Make the masks permanent (weights hold the zeros, hooks removed)."""
    for m in _weighted(model):
        if tprune.is_pruned(m):
            tprune.remove(m, "weight")  # type: ignore[no-untyped-call]


def apply_structured(model: nn.Module, sparsity: float, example: torch.Tensor) -> nn.Module:
    """Remove the `sparsity` share of channels by L1 norm, physically."""
    import torch_pruning as tp  # noqa: PLC0415  # heavy or optional: loaded only when used

    layers = _weighted(model)
    if len(layers) < 2:
        raise RecipeError("structured pruning needs at least two Conv/Linear layers")
    classifier = layers[-1]
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=sparsity, ignored_layers=[classifier], global_pruning=False,
    )
    pruner.step()
    return model


def summary(method: str, before: int, model: nn.Module) -> PruneResult:
    return PruneResult(method, before, param_count(model), nonzero_params(model),
                       weight_sparsity(model))
