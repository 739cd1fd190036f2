"""Knowledge distillation (Hinton et al., 2015) on cached teacher logits.

loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

The T^2 factor keeps the soft-target gradients on the same scale as the hard ones when T
changes. Without labels, alpha is forced to 1 (pure distillation). Training stops early when
the validation loss has not improved for `patience` epochs, and the best epoch's weights are
restored. Per-epoch curves for teacher and student go to the history (and, optionally, to
TensorBoard event files).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from converter.data import F32, I64


@dataclass(frozen=True)
class KDSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    alpha: float
    patience: int
    seed: int
    progress: bool = True
    tensorboard_dir: Path | None = None
    tag: str = "distill"


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch,
                "stopped_early": self.stopped_early}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton KD loss, mean over the batch."""
    t = temperature
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student / t, dim=1),
        nn.functional.log_softmax(teacher / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * (t * t)
    if labels is None or alpha >= 1.0:
        return soft
    return alpha * soft + (1 - alpha) * nn.functional.cross_entropy(student, labels)


def _metrics(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
             s: KDSettings) -> dict[str, float]:
    truth = labels if labels is not None else teacher.argmax(1)
    return {
        "loss": float(kd_loss(logits, teacher, labels, s.temperature, s.alpha)),
        "acc": float((logits.argmax(1) == truth).float().mean()),
    }


def distill(student: nn.Module, x: F32, teacher_logits: F32, y: I64 | None,
            train: npt.NDArray[np.intp], val: npt.NDArray[np.intp],
            s: KDSettings) -> History:
    """Train `student` in place against the teacher's logits; returns the curves."""
    torch.manual_seed(s.seed)
    xt = torch.from_numpy(x)
    tt = torch.from_numpy(teacher_logits)
    yt = torch.from_numpy(y) if y is not None else None
    alpha = s.alpha if yt is not None else 1.0
    s = KDSettings(**{**s.__dict__, "alpha": alpha})
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs)
    gen = torch.Generator().manual_seed(s.seed)
    tr, va = torch.from_numpy(train), torch.from_numpy(val)
    writer = _writer(s)
    teacher_ref = {f"{part}_{k}": v for part, idx in (("train", tr), ("val", va))
                   for k, v in _metrics(tt[idx], tt[idx], _take(yt, idx), s).items()}
    hist = History()
    best_loss, best_state, since_best = float("inf"), copy.deepcopy(student.state_dict()), 0
    bar = _bar(s)
    for epoch in range(1, s.epochs + 1):
        student.train()
        for batch in tr[torch.randperm(len(tr), generator=gen)].split(s.batch_size):
            opt.zero_grad()
            kd_loss(student(xt[batch]), tt[batch], _take(yt, batch), s.temperature,
                    s.alpha).backward()
            opt.step()
        sched.step()
        row = {"epoch": float(epoch), **_evaluate(student, xt, tt, yt, tr, va, s),
               **{f"teacher_{k}": v for k, v in teacher_ref.items()}}
        hist.epochs.append(row)
        if writer is not None:
            _log_tb(writer, row, epoch)
        if row["val_loss"] < best_loss - 1e-6:
            best_loss, best_state, since_best = row["val_loss"], copy.deepcopy(
                student.state_dict()), 0
            hist.best_epoch = epoch
        else:
            since_best += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(val_acc=f"{row['val_acc']:.3f}", val_loss=f"{row['val_loss']:.3f}")
        if since_best >= s.patience:
            hist.stopped_early = True
            break
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    student.load_state_dict(best_state)
    student.eval()
    return hist


def _take(y: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if y is None else y[idx]


def _evaluate(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
              tr: torch.Tensor, va: torch.Tensor, s: KDSettings) -> dict[str, float]:
    model.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        for part, idx in (("train", tr), ("val", va)):
            for k, v in _metrics(model(x[idx]), t[idx], _take(y, idx), s).items():
                out[f"{part}_{k}"] = v
    return out


def _bar(s: KDSettings) -> Any:
    """A progress bar on a terminal; plain lines at most every PROGRESS_EVERY_S otherwise
    (a bar piped into a log is one line of carriage returns, one update per epoch)."""
    if not s.progress:
        return None
    if not sys.stderr.isatty():
        return ProgressLines(s.tag, s.epochs, sys.stderr)
    from tqdm import tqdm  # noqa: PLC0415  # heavy or optional: loaded only when used

    return tqdm(total=s.epochs, desc=s.tag, unit="epoch", file=sys.stderr, leave=False)


PROGRESS_EVERY_S = 10.0


class ProgressLines:
    """tqdm's update/set_postfix/close as whole lines, at most one per `every_s`, and the
    last epoch's at close."""

    def __init__(self, tag: str, total: int, out: TextIO,
                 every_s: float = PROGRESS_EVERY_S) -> None:
        self.tag, self.total, self.out, self.every_s = tag, total, out, every_s
        self.done, self.postfix, self.shown = 0, "", 0
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n

    def set_postfix(self, **values: str) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if time.monotonic() - self.last >= self.every_s:
            self._line()

    def close(self) -> None:
        if self.shown != self.done:
            self._line()

    def _line(self) -> None:
        self.out.write(f"{self.tag}: epoch {self.done}/{self.total}"
                       f"{', ' + self.postfix if self.postfix else ''}\n")
        self.out.flush()
        self.last, self.shown = time.monotonic(), self.done


def _writer(s: KDSettings) -> Any:
    if s.tensorboard_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  # optional: when used

    return SummaryWriter(log_dir=str(s.tensorboard_dir / s.tag))


def _log_tb(writer: Any, row: dict[str, float], epoch: int) -> None:
    for who in ("student", "teacher"):
        prefix = "teacher_" if who == "teacher" else ""
        for part in ("train", "val"):
            for metric in ("loss", "acc"):
                writer.add_scalar(f"{who}/{part}_{metric}", row[f"{prefix}{part}_{metric}"],
                                  epoch)
