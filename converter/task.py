"""What a model's outputs are, and how the gates and the report score them.

- classify: outputs are class scores; quality is accuracy against the labels (or the
  teacher's predictions), and int8 may lose at most `quantize.tolerance_points`.
- reconstruct (an autoencoder) and regress: outputs are values. int8 is gated on its output
  error against the fp32 model on the same samples: the RMS difference relative to the fp32
  outputs' standard deviation (NRMSE), at most `model.max_output_error`. For an autoencoder
  the per-sample reconstruction error (mean squared difference between the input and the
  output) is the anomaly score; where the data has labels (0 normal, anything else
  anomalous) the report gives its ROC AUC, MLPerf Tiny's anomaly-detection metric. A
  regressor's data may carry its true outputs (targets, `y`): the report then gives MAE,
  RMSE and R² against them, and the gate may compare int8 with fp32 on one of them instead
  (`model.gate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# The anomaly score is the device's own formula, so the threshold the bundle carries is
# computed exactly as the agent will score live samples.
from agent.serving.scheduler import reconstruction_error
from converter.data import F32, I64

EPS = 1e-12


def nrmse(out: F32, reference: F32) -> float:
    """RMS of (out - reference) over the reference's standard deviation."""
    diff = np.asarray(out, np.float64) - np.asarray(reference, np.float64)
    return float(np.sqrt(np.mean(diff * diff)) / max(float(np.std(reference)), EPS))


def roc_auc(score: np.ndarray, anomalous: np.ndarray) -> float | None:
    """ROC AUC of `score` for telling anomalous (True) from normal samples, by ranks
    (Mann-Whitney U, ties shared); None when one side is empty."""
    pos, neg = int(anomalous.sum()), int((~anomalous).sum())
    if not pos or not neg:
        return None
    from scipy.stats import rankdata  # noqa: PLC0415  # heavy: loaded only when used

    ranks = rankdata(score)  # ties share their average rank
    u = ranks[anomalous].sum() - pos * (pos + 1) / 2
    return float(u / (pos * neg))


@dataclass(frozen=True)
class Quality:
    """How a gate scores outputs on the validation split: `score` (higher is better) and
    whether an int8 score passes against the fp32 one."""

    name: str  # what the score is, for messages
    score: Callable[[F32], float]
    passes: Callable[[float, float], bool]  # (fp32 score, int8 score)
    show: Callable[[float], str]


def classification(truth: I64, tolerance_points: float) -> Quality:
    return Quality(
        "accuracy", lambda out: float((out.argmax(1) == truth).mean()),
        lambda fp32, int8: (fp32 - int8) * 100 <= tolerance_points + 1e-9,
        lambda v: f"{v:.2%}")


def output_error(reference: F32, max_error: float) -> Quality:
    """The score is minus the NRMSE against the fp32 outputs (0 for fp32 itself)."""
    return Quality(
        "output error (NRMSE vs fp32)", lambda out: -nrmse(out, reference),
        lambda _fp32, int8: -int8 <= max_error + 1e-12,
        lambda v: f"{-v:.4f}")


def regression_scores(out: F32, targets: F32) -> dict[str, float]:
    """MAE, RMSE and R² of `out` against the true `targets` (N, k), each averaged over the
    k outputs with equal weight (scikit-learn's `multioutput="uniform_average"`; an output
    whose targets are constant scores R² 1 when matched exactly, else 0, as there)."""
    pred = np.asarray(out, np.float64).reshape(len(targets), -1)
    true = np.asarray(targets, np.float64)
    err = pred - true
    ss_res = (err * err).sum(axis=0)
    ss_tot = ((true - true.mean(axis=0)) ** 2).sum(axis=0)
    r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1),
                  np.where(ss_res == 0, 1.0, 0.0))
    return {"mae": float(np.abs(err).mean(axis=0).mean()),
            "rmse": float(np.sqrt((err * err).mean(axis=0)).mean()),
            "r2": float(r2.mean())}


REGRESSION_GATES = {"mae": "MAE", "rmse": "RMSE", "r2": "R²"}


def regression_gate(targets: F32, metric: str, max_change: float) -> Quality:
    """A gate on MAE or RMSE against the targets (int8 at most `max_change` as a share
    above fp32) or on R² (int8 at most `max_change` below fp32). Scores are higher-better:
    minus MAE or RMSE, R² as it is."""
    name = REGRESSION_GATES[metric]
    sign = 1.0 if metric == "r2" else -1.0

    def score(out: F32) -> float:
        return sign * regression_scores(out, targets)[metric]

    def passes(fp32: float, int8: float) -> bool:
        if metric == "r2":
            return fp32 - int8 <= max_change + 1e-12
        return -int8 <= -fp32 * (1 + max_change) + 1e-12

    return Quality(f"{name} against the targets", score, passes,
                   lambda v: f"{sign * v:.4g}")


def value_scores(task: str, x: F32, out: F32, reference: F32, y: I64 | None,
                 targets: F32 | None = None) -> dict[str, float | None]:
    """The report's figures for a reconstruct or regress model's outputs on some samples:
    output error against the fp32 reference; for an autoencoder, the anomaly AUC; for a
    regressor with targets, MAE, RMSE and R² against them."""
    row: dict[str, float | None] = {"accuracy": None, "output_error": nrmse(out, reference)}
    if task == "regress" and targets is not None:
        row.update(regression_scores(out, targets))
    if task == "reconstruct":
        err = reconstruction_error(np.asarray(x, np.float32), np.asarray(out, np.float32))
        row["reconstruction_error_mean"] = float(err.mean())
        row["anomaly_auc"] = None if y is None else roc_auc(err, y != 0)
    return row
