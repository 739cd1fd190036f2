"""MLPerf Tiny-size examples: the four reference models, trained here on generated data,
then quantized as trained (`[model]`, no teacher).

No data set is downloaded. Each case generates data of the reference input shape with
structure a model must learn; accuracy on it says the pipeline works, not how the model
does on the benchmark's own data (CIFAR-10, Speech Commands, Visual Wake Words, ToyADMOS):

- `ic` (ResNet-8, 3x32x32, 10 classes): scikit-learn's digits, scaled up 3x, each drawn
  twice in a random light colour on a random dark one, shifted up to 3 pixels, with noise.
- `kws` (DS-CNN, 1x49x10 "MFCC" frames, 12 classes as Speech Commands' v0.02 subset):
  each keyword is a fixed sequence of three syllables (10-coefficient patterns) of random
  lengths and start, with speaker scaling and strong noise; `silence` is noise,
  `unknown` three random syllables of the same language.
- `vww` (MobileNetV1 0.25, 3x96x96, person / no person): a stick figure (head, body, legs)
  of random size, colour and place among distractor rectangles and discs on a smooth
  coloured background, or the distractors alone.
- `ad` (FC autoencoder, 640 = 5 frames x 128 log-mel bins in dB): a machine's harmonic
  spectrum (fundamental in a narrow band, decaying harmonics, noise floor); anomalies
  (label 1, 10 %) add a non-harmonic peak, shift the fundamental or add a broadband burst.
  The autoencoder is trained on normal samples of the training split only.

`write_example(dir, case=...)` writes `data.npz`, `model.pt` (state_dict) and a
`recipe.toml` that names `converter.examples.tiny:<case>` as the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from converter.data import F32, I64, load_digits_dataset, split
from converter.examples.digits import fit_teacher
from converter.tiny import fc_autoencoder, kws_dscnn, mobilenet_v1, resnet8

CASES = {
    "ic": ("resnet8", (3, 32, 32), 10, "classify"),
    "kws": ("kws-dscnn", (1, 49, 10), 12, "classify"),
    "vww": ("mobilenet-v1", (3, 96, 96), 2, "classify"),
    "ad": ("fc-autoencoder", (640,), 0, "reconstruct"),
}
KWS_LABELS = ["silence", "unknown", "yes", "no", "up", "down", "left", "right", "on", "off",
              "stop", "go"]
DEFAULT_EPOCHS = {"ic": 12, "kws": 20, "vww": 16, "ad": 40}


# The zero-argument factories a recipe names (model.torch = "converter.examples.tiny:ic").
def ic() -> nn.Module:
    return resnet8((3, 32, 32), 10)


def kws() -> nn.Module:
    return kws_dscnn((1, 49, 10), 12)


def vww() -> nn.Module:
    return mobilenet_v1((3, 96, 96), 2)


def ad() -> nn.Module:
    return fc_autoencoder((640,))


def make_ic(seed: int = 0, copies: int = 2) -> tuple[F32, I64, list[str]]:
    ds = load_digits_dataset()
    assert ds.y is not None
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(copies):
        for img, label in zip(ds.x[:, 0], ds.y, strict=True):
            big = np.kron(img, np.ones((3, 3), np.float32))  # 24x24
            canvas = np.zeros((32, 32), np.float32)
            dy, dx = rng.integers(1, 8, size=2)
            canvas[dy:dy + 24, dx:dx + 24] = big
            fg, bg = rng.uniform(0.5, 1, 3), rng.uniform(0, 0.5, 3)
            rgb = canvas[None] * fg[:, None, None] + (1 - canvas[None]) * bg[:, None, None]
            xs.append(rgb + rng.normal(0, 0.05, rgb.shape))
            ys.append(label)
    x = np.clip(np.asarray(xs, np.float32), 0, 1)
    return x, np.asarray(ys, np.int64), [str(i) for i in range(10)]


def make_kws(n_per_class: int = 250, seed: int = 0) -> tuple[F32, I64, list[str]]:
    vocab = np.random.default_rng(1234)  # the language: fixed whatever the seed
    syllables = vocab.normal(0, 1, (16, 10)) * np.linspace(2.0, 0.5, 10)
    words = [vocab.choice(16, size=3, replace=False) for _ in range(10)]
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for cls in range(len(KWS_LABELS)):
        for _ in range(n_per_class):
            x = rng.normal(0, 0.8, (49, 10))
            if cls >= 1:
                seq = words[cls - 2] if cls >= 2 else rng.choice(16, 3)  # unknown: any
                t = int(rng.integers(0, 12))
                speaker = rng.uniform(0.5, 1.5, 10)
                for syl in seq:
                    length = int(rng.integers(6, 11))
                    if t + length > 49:
                        break
                    env = np.sin(np.linspace(0, np.pi, length))[:, None]
                    x[t:t + length] += env * syllables[syl] * speaker
                    t += length + int(rng.integers(0, 3))
            xs.append(x[None])
            ys.append(cls)
    order = rng.permutation(len(xs))
    return (np.asarray(xs, np.float32)[order], np.asarray(ys, np.int64)[order],
            list(KWS_LABELS))


def _disc(canvas: np.ndarray, cy: float, cx: float, r: float, color: np.ndarray,
          yy: np.ndarray, xx: np.ndarray) -> None:
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    canvas[:, mask] = color[:, None]


def _rect(canvas: np.ndarray, y0: float, x0: float, h: float, w: float,
          color: np.ndarray) -> None:
    y0, x0 = max(int(y0), 0), max(int(x0), 0)
    canvas[:, y0:y0 + max(int(h), 1), x0:x0 + max(int(w), 1)] = color[:, None, None]


def make_vww(n: int = 2000, seed: int = 0, size: int = 96) -> tuple[F32, I64, list[str]]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    xs, ys = [], []
    for i in range(n):
        person = i % 2
        a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        t = (yy / size)[None]
        img = (a[:, None, None] * (1 - t) + b[:, None, None] * t).astype(np.float32)
        for _ in range(int(rng.integers(1, 5))):  # distractors
            c = rng.uniform(0, 1, 3)
            y0, x0 = rng.uniform(0, size - 10, 2)
            if rng.random() < 0.5:
                h, w = rng.uniform(6, 30, 2)
                _rect(img, y0, x0, h, w, c)
            else:
                _disc(img, y0, x0, rng.uniform(3, 12), c, yy, xx)
        if person:
            h = rng.uniform(36, 80)  # the figure's height
            cy, cx = rng.uniform(h / 2, size - h / 2), rng.uniform(h / 5, size - h / 5)
            c = rng.uniform(0, 1, 3)
            top = cy - h / 2
            _disc(img, top + h * 0.1, cx, h * 0.1, c, yy, xx)  # head
            _rect(img, top + h * 0.2, cx - h * 0.1, h * 0.4, h * 0.2, c)  # body
            _rect(img, top + h * 0.6, cx - h * 0.1, h * 0.4, h * 0.06, c)  # legs
            _rect(img, top + h * 0.6, cx + h * 0.04, h * 0.4, h * 0.06, c)
            _rect(img, top + h * 0.22, cx - h * 0.22, h * 0.05, h * 0.44, c)  # arms
        xs.append(img + rng.normal(0, 0.03, img.shape).astype(np.float32))
        ys.append(person)
    return (np.clip(np.asarray(xs, np.float32), 0, 1), np.asarray(ys, np.int64),
            ["no_person", "person"])


def make_ad(n: int = 3000, seed: int = 0, frames: int = 5,
            bins: int = 128) -> tuple[F32, I64, list[str]]:
    rng = np.random.default_rng(seed)
    f = np.arange(bins, dtype=np.float64)
    xs, ys = [], []
    for i in range(n):
        anomaly = int(i % 10 == 9)
        f0 = rng.uniform(10, 13)
        kind = int(rng.integers(0, 3)) if anomaly else -1
        if kind == 1:
            f0 = rng.uniform(13.3, 14.5)  # the machine runs a little fast
        spec = np.zeros((frames, bins))
        for t in range(frames):
            s = np.full(bins, -60.0)
            for k in range(1, 9):
                s = np.maximum(s, -12 - 4 * k + 3 * rng.normal()
                               - ((f - k * f0) ** 2) / (2 * 1.2 ** 2))
            spec[t] = s + rng.normal(0, 2.0, bins)
        if kind == 0:  # a non-harmonic peak (a worn bearing)
            fb = rng.uniform(60, 120)
            spec = np.maximum(spec, rng.uniform(-48, -40) - ((f - fb) ** 2) / 2)
        elif kind == 2:  # a broadband burst in one frame (a knock)
            spec[int(rng.integers(0, frames))] += rng.uniform(3, 6)
        xs.append(spec.reshape(-1))
        ys.append(anomaly)
    return np.asarray(xs, np.float32), np.asarray(ys, np.int64), ["normal", "anomaly"]


def make_data(case: str, seed: int = 0, small: bool = False) -> tuple[F32, I64, list[str]]:
    """The case's generated data; `small` makes a few hundred samples (for tests)."""
    if case == "ic":
        x, y, labels = make_ic(seed, copies=1 if small else 2)
        return (x[:600], y[:600], labels) if small else (x, y, labels)
    if case == "kws":
        return make_kws(50 if small else 250, seed)
    if case == "vww":
        return make_vww(300 if small else 2000, seed)
    if case == "ad":  # small or not: the autoencoder trains in seconds on all of it
        return make_ad(3000, seed)
    raise ValueError(f"unknown case {case!r}; one of {', '.join(CASES)}")


def train_model(case: str, x: F32, y: I64, *, epochs: int, seed: int = 0
                ) -> tuple[nn.Module, float]:
    """The case's reference model trained on the pipeline's training split (default recipe
    fractions); returns it and its test figure: accuracy, or anomaly AUC."""
    make = {"ic": ic, "kws": kws, "vww": vww, "ad": ad}[case]
    if case != "ad":
        return fit_teacher(make, x, y, epochs=epochs, lr=3e-3, seed=seed)
    from agent.serving.scheduler import reconstruction_error  # noqa: PLC0415  # when used
    from converter.task import roc_auc  # noqa: PLC0415  # when used

    torch.manual_seed(seed)
    model = make()
    sp = split(len(x), y, seed=seed, val_fraction=0.15, test_fraction=0.2)
    normal = sp.train[y[sp.train] == 0]
    xt = torch.from_numpy(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    idx_all = torch.from_numpy(normal)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(idx_all), generator=gen).split(64):
            xb = xt[idx_all[batch]]
            opt.zero_grad()
            nn.functional.mse_loss(model(xb), xb).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model(xt[torch.from_numpy(sp.test)]).numpy()
    auc = roc_auc(reconstruction_error(x[sp.test], out), y[sp.test] != 0)
    return model, float(auc or 0.0)


RECIPE = """\
# MLPerf Tiny-size example ({case}: {family}), trained here on generated data and
# quantized as trained: no teacher, no distillation.
out = "out"

[data]
source = "data.npz"

[model]
torch = "converter.examples.tiny:{case}"
weights = "model.pt"
task = "{task}"

[target]
profile = "{profile}"

[bundle]
name = "tiny-{case}"
"""


def write_example(out_dir: Path, *, profile: str = "raspberry-pi-4", epochs: int | None = None,
                  teacher_kind: str = "torch", case: str = "ic", small: bool = False) -> float:
    """Write data, the trained model and a recipe; returns the model's test accuracy (or
    anomaly AUC). `teacher_kind` is accepted for the CLI's sake: the model is torch."""
    del teacher_kind
    family, _, _, task = CASES[case]
    out_dir.mkdir(parents=True, exist_ok=True)
    x, y, labels = make_data(case, small=small)
    np.savez_compressed(out_dir / "data.npz", x=x, y=y, labels=np.asarray(labels))
    model, figure = train_model(case, x, y, epochs=epochs or DEFAULT_EPOCHS[case])
    torch.save(model.state_dict(), out_dir / "model.pt")
    (out_dir / "recipe.toml").write_text(RECIPE.format(case=case, family=family, task=task,
                                                       profile=profile))
    return figure
