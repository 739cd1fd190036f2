"""Conversion benchmark: prints tables, asserts nothing.

    .venv/bin/python bench/bench_convert.py [--profile raspberry-pi-4]
        [--cases families,digits,wine,breast_cancer,series]

- `families`: the digits example (CNN teacher trained here) through the whole pipeline per
  student family, with parameter ratio, sizes, host latency per runtime (bare onnxruntime
  and LiteRT on the same files) and wall time.
- `digits`, `wine`, `breast_cancer`: raw, unscaled scikit-learn data with four scikit-learn
  teachers exported by skl2onnx (`converter.examples.tabular`), each converted with the
  defaults (normalization, student family and size chosen by the converter).
- `series`: generated vibration windows (1 x 128, milli-g) with the 1-D CNN torch teacher
  (`converter.examples.series`).
- `onnx`: models as people bring them. The four MLPerf Tiny reference models
  (`converter.examples.tiny`, trained here on the small generated sets) exported to ONNX
  and quantized as trained to int8 TFLite for `--onnx-profile` (Ethos-U55-128: Vela's SRAM,
  flash and cycles), through onnx2torch next to the same model given as torch; a
  regressor with float targets (scikit-learn's diabetes: R² fp32 and int8 against the
  targets); a model with two inputs (`converter.examples.fusion`: motor features and a
  vibration window, given as ONNX); a teacher exported with batch 8, distilled.

Accuracy is on the test split (never used for training, calibration or gates); the size
ratio is by parameters, or by file bytes where the teacher has no parameter count (trees).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def convert(args: list[str], out: Path, profile: str) -> tuple[float, str | None]:
    """One `edge-convert run`; (wall seconds, the error line or None)."""
    cmd = [sys.executable, "-m", "converter.cli", "run", *args, "--out", str(out),
           "--target-profile", profile, "--distill-progress", "false", "--force"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return wall, (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
    return wall, None


CASE_HEAD = (f"{'teacher':20} {'student':>15} {'norm':>9} {'teacher':>8} {'fp32':>7} "
             f"{'int8onnx':>8} {'int8tfl':>8} {'Δtea':>6} {'Δint8':>6} {'ratio':>13} "
             f"{'wall s':>7}")


def case_row(label: str, out: Path, wall: float, error: str | None) -> str:
    if error:
        return f"{label:20} FAILED ({wall:.1f} s): {error.removeprefix('edge-convert: error: ')}"
    rep = json.loads((out / "report.json").read_text())
    ms = {(m["name"], m["runtime"]): m for m in rep["evaluate"]["models"]}
    t, f = next(iter(ms.values())), ms[("student fp32", "onnx")]
    o, tl = ms.get(("student int8", "onnx")), ms.get(("student int8", "tflite"))
    int8 = [m["accuracy"] for m in (o, tl) if m is not None]
    worst = (f["accuracy"] - min(int8)) * 100 if int8 else float("nan")
    r = rep["evaluate"]["checks"]["size_ratio"]
    ratio = f"{r['ratio']:.1f}x {'params' if r['by'] == 'parameters' else 'bytes'}"
    student = f"{rep['student']['family']} {f['parameters']:,}p"
    return (f"{label:20} {student:>15} {rep['inputs']['normalize']:>9} {t['accuracy']:>8.2%} "
            f"{f['accuracy']:>7.2%} {o['accuracy'] if o else float('nan'):>8.2%} "
            f"{tl['accuracy'] if tl else float('nan'):>8.2%} "
            f"{(t['accuracy'] - f['accuracy']) * 100:>6.2f} {worst:>6.2f} {ratio:>13} "
            f"{wall:>7.1f}")


def tabular_case(dataset: str, tmp: Path, profile: str) -> None:
    from converter.examples.tabular import TEACHERS, write_case  # noqa: PLC0415

    print(f"\n## {dataset} (raw, unscaled; scikit-learn teachers via skl2onnx)\n")
    print(CASE_HEAD)
    print("-" * len(CASE_HEAD))
    where = tmp / dataset
    where.mkdir()
    for teacher in TEACHERS:
        data, onnx_file = write_case(where, dataset, teacher)
        out = where / f"out-{teacher}"
        wall, error = convert(["--data-source", str(data), "--teacher-onnx", str(onnx_file)],
                              out, profile)
        print(case_row(teacher, out, wall, error), flush=True)


def series_case(tmp: Path, profile: str) -> None:
    print("\n## series (generated vibration windows 1 x 128, raw milli-g; torch 1-D CNN "
          "teacher)\n")
    print(CASE_HEAD)
    print("-" * len(CASE_HEAD))
    example = tmp / "series"
    subprocess.run([sys.executable, "-m", "converter.cli", "example", "series", "--out",
                    str(example)], check=True, capture_output=True, cwd=ROOT)
    for kind in ("onnx", "torch"):
        extra = ([] if kind == "onnx" else
                 ["--teacher-onnx", "", "--teacher-torch", "converter.examples.series:teacher",
                  "--teacher-weights", str(example / "teacher.pt")])
        out = example / f"out-{kind}"
        wall, error = convert([str(example / "recipe.toml"), *extra], out, profile)
        print(case_row(f"1-D CNN ({kind})", out, wall, error), flush=True)


def _export(model: object, shape: tuple[int, ...], path: Path, *, batch: int | None) -> Path:
    import torch  # noqa: PLC0415  # heavy: only the onnx case needs it

    assert isinstance(model, torch.nn.Module)
    dyn = None if batch else ({0: torch.export.Dim("batch")},)
    torch.onnx.export(model.eval(), (torch.zeros(batch or 2, *shape),), str(path),
                      input_names=["x"], dynamo=True, external_data=False, dynamic_shapes=dyn)
    return path


def _figure(m: dict | None) -> str:
    if m is None:
        return "-"
    if m.get("accuracy") is not None:
        return f"{m['accuracy']:.2%}"
    if m.get("r2") is not None:
        return f"R² {m['r2']:.4f}"
    return f"AUC {m['anomaly_auc']:.4f}" if m.get("anomaly_auc") is not None else "-"


TINY_TOLERANCE = 5.0
ONNX_HEAD = (f"{'model':16} {'route':22} {'fp32':>11} {'int8 tfl':>11} {'tfl KiB':>8} "
             f"{'SRAM KiB':>9} {'flash KiB':>9} {'cycles':>10} {'wall s':>7}  load")


def onnx_row(label: str, route: str, out: Path, wall: float, error: str | None) -> str:
    if error:
        return (f"{label:16} {route:22} FAILED ({wall:.1f} s): "
                f"{error.removeprefix('edge-convert: error: ')}")
    rep = json.loads((out / "report.json").read_text())
    ms = {(m["name"], m["runtime"]): m for m in rep["evaluate"]["models"]}
    who = rep["evaluate"]["role"]
    f, tl = ms[(f"{who} fp32", "onnx")], ms.get((f"{who} int8", "tflite"))
    v = (rep.get("compile") or {}).get("summary") or {}
    vela = (f"{v['sram_kib']:>9.1f} {v['flash_kib']:>9.1f} {v['cycles_total']:>10,}" if v
            else f"{'-':>9} {'-':>9} {'-':>10}")
    return (f"{label:16} {route:22} {_figure(f):>11} {_figure(tl):>11} "
            f"{(tl or {}).get('raw_bytes', 0) / 1024:>8.1f} {vela} {wall:>7.1f}  {_load()}")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def onnx_case(tmp: Path, args: argparse.Namespace) -> None:
    """Models as people bring them: ONNX quantized as trained, next to the torch route."""
    import torch  # noqa: PLC0415  # heavy: only this case needs it

    from converter.examples import fusion, tiny  # noqa: PLC0415  # heavy: torch

    print(f"\nmodels given as ONNX, quantized as trained (profile {args.onnx_profile}); "
          "the torch route on the same trained model beside each; int8 gate "
          f"{TINY_TOLERANCE} points (the small sets' validation splits hold 45-60 samples, "
          "one sample is 1.7-2.2 points)")
    print(ONNX_HEAD)
    print("-" * len(ONNX_HEAD))
    for case in ("ic", "kws", "vww", "ad"):
        where = tmp / f"tiny-{case}"
        tiny.write_example(where, case=case, small=True)
        model = getattr(tiny, case)()
        model.load_state_dict(torch.load(where / "model.pt", weights_only=True))
        shape = tiny.CASES[case][1]
        onnx_file = _export(model, shape, where / f"{case}.onnx", batch=None)
        task = tiny.CASES[case][3]
        gate = ["--quantize-tolerance-points", str(TINY_TOLERANCE)]
        wall, error = convert(["--data-source", str(where / "data.npz"), "--model-onnx",
                               str(onnx_file), "--model-task", task, *gate], where / "onnx",
                              args.onnx_profile)
        print(onnx_row(case, "onnx2torch -> PT2E", where / "onnx", wall, error), flush=True)
        wall, error = convert([str(where / "recipe.toml"), *gate], where / "torch",
                              args.onnx_profile)
        print(onnx_row(case, "torch -> PT2E", where / "torch", wall, error), flush=True)
    reg = tmp / "diabetes"
    data, model_file = diabetes_regressor(reg)
    wall, error = convert(["--data-source", str(data), "--model-onnx", str(model_file),
                           "--model-task", "regress", "--model-gate", "r2"], reg / "out",
                          args.profile)  # its float output: no int8-only NPU profile
    print(onnx_row("diabetes (R²)", "onnx2torch -> PT2E", reg / "out", wall, error),
          flush=True)
    fx = tmp / "fusion"  # two inputs: motor features and a vibration window
    fusion.write_example(fx)
    wall, error = convert([str(fx / "recipe.toml")], fx / "out", args.onnx_profile)
    print(onnx_row("fusion, 2 inputs", "onnx2torch -> PT2E", fx / "out", wall, error),
          flush=True)
    kws = tmp / "tiny-kws"
    model = tiny.kws()
    model.load_state_dict(torch.load(kws / "model.pt", weights_only=True))
    fixed = _export(model, tiny.CASES["kws"][1], kws / "kws8.onnx", batch=8)
    wall, error = convert(["--data-source", str(kws / "data.npz"), "--teacher-onnx",
                           str(fixed)], kws / "teacher8", args.profile)
    if error:
        print(f"kws teacher, batch 8: FAILED ({wall:.1f} s): {error}")
    else:
        rep = json.loads((kws / "teacher8" / "report.json").read_text())
        ms = {(m["name"], m["runtime"]): m for m in rep["evaluate"]["models"]}
        print(f"\nkws teacher exported with batch {rep['teacher']['batch']}, distilled "
              f"({args.profile}): teacher {_figure(ms[('teacher', 'onnx')])}, student fp32 "
              f"{_figure(ms[('student fp32', 'onnx')])}, int8 TFLite "
              f"{_figure(ms.get(('student int8', 'tflite')))} in {wall:.1f} s; load "
              f"{_load()}")


def diabetes_regressor(where: Path) -> tuple[Path, Path]:
    """scikit-learn's diabetes (10 features, a float target), a small MLP trained on the
    converter's training split (the default split; never on the test split it is scored
    on) with the scaling in its graph, as ONNX."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415  # heavy: only this case needs it
    from sklearn.datasets import load_diabetes  # noqa: PLC0415

    from converter.data import split  # noqa: PLC0415  # heavy: sklearn

    where.mkdir(parents=True, exist_ok=True)
    d = load_diabetes()
    x, y = d.data.astype(np.float32) * 20, d.target.astype(np.float32)
    train = split(len(x), None, seed=0, val_fraction=0.15, test_fraction=0.2).train
    torch.manual_seed(0)
    mean, std = float(y[train].mean()), float(y[train].std())
    net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(net.parameters(), 1e-2, weight_decay=0.1)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy((y[train] - mean) / std)[:, None]
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(xt), yt).backward()
        opt.step()

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return self.net(v) * std + mean

    np.savez(where / "data.npz", x=x, y=y)
    return where / "data.npz", _export(Scaled(), (10,), where / "reg.onnx", batch=None)


def families_case(tmp: Path, args: argparse.Namespace) -> None:
    """The digits example per student family (and pruning)."""
    example = tmp / "example"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "converter.cli", "example", "digits", "--out",
                    str(example)], check=True, capture_output=True, cwd=ROOT)
    teacher_s = time.perf_counter() - t0
    print(f"digits example written (teacher trained) in {teacher_s:.1f} s; "
          f"profile {args.profile}\n")
    head = (f"{'student':22} {'params':>7} {'ratio':>6} {'teacher':>8} {'fp32':>7} "
            f"{'int8onnx':>8} {'int8tfl':>8} {'Δtea':>6} {'Δonnx':>6} {'Δtfl':>6} "
            f"{'fp32 p50':>9} {'onnx8 p50':>9} {'tfl8 p50':>9} {'tfl KiB':>7} {'wall s':>7}")
    print(head)
    print("-" * len(head))
    extras = {"mlp": ["--student-hidden", "[32]"], "dscnn": ["--student-channels",
                                                             "[8,16,32]"],
              "cnn-wide": ["--student-channels", "[32,64]"]}
    for row in args.families.split(","):
        variant, _, prune = row.partition("+")
        family = variant.removesuffix("-wide")
        extra = list(extras.get(variant, []))
        if prune:
            extra += ["--prune-method", prune, "--prune-sparsity", "0.5"]
        out = tmp / row
        wall, error = convert([str(example / "recipe.toml"), "--student-family", family,
                               *extra], out, args.profile)
        if error:
            print(f"{row:22} FAILED ({wall:.1f} s): "
                  f"{error.removeprefix('edge-convert: error: ')}", flush=True)
            continue
        rep = json.loads((out / "report.json").read_text())
        ms = {(m["name"], m["runtime"]): m for m in rep["evaluate"]["models"]}
        t, f = ms[("teacher", "onnx")], ms[("student fp32", "onnx")]
        o, tl = ms[("student int8", "onnx")], ms[("student int8", "tflite")]
        print(f"{row:22} {f['parameters']:>7,} {t['parameters'] / f['parameters']:>5.0f}x "
              f"{t['accuracy']:>8.2%} {f['accuracy']:>7.2%} {o['accuracy']:>8.2%} "
              f"{tl['accuracy']:>8.2%} {(t['accuracy'] - f['accuracy']) * 100:>6.2f} "
              f"{(f['accuracy'] - o['accuracy']) * 100:>6.2f} "
              f"{(f['accuracy'] - tl['accuracy']) * 100:>6.2f} "
              f"{f['latency']['p50_ms']:>7.3f}ms {o['latency']['p50_ms']:>7.3f}ms "
              f"{tl['latency']['p50_ms']:>7.3f}ms {tl['raw_bytes'] / 1024:>7.1f} "
              f"{wall:>7.1f}")
    print(f"\nteacher latency p50 (onnxruntime, 1 thread): {t['latency']['p50_ms']:.3f} ms; "
          f"teacher size {t['raw_bytes'] / 1024:.0f} KiB")
    print("targets: Δonnx, Δtfl <= 1.0 point (int8 vs fp32 student); ratio >= 20x with "
          "Δtea <= 1.5 points; wall <= 90 s per pipeline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="raspberry-pi-4")
    ap.add_argument("--cases", default="families,digits,wine,breast_cancer,series,onnx")
    ap.add_argument("--onnx-profile", default="arm-ethos-u55-128",
                    help="the profile of the onnx case's quantize-only rows")
    ap.add_argument("--families", default="cnn,dscnn,mlp,cnn-wide,cnn-wide+structured,"
                                          "cnn-wide+unstructured",
                    help="student families; cnn-wide = channels [32,64]; +structured / "
                         "+unstructured prune 50 %% with 20 fine-tuning epochs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            if case == "families":
                families_case(Path(tmp), args)
            elif case == "onnx":
                onnx_case(Path(tmp), args)
            elif case == "series":
                series_case(Path(tmp), args.profile)
            else:
                tabular_case(case, Path(tmp), args.profile)
    print("\nΔtea: teacher minus fp32 student; Δint8: fp32 minus the worse int8 model (points, "
          "test split). Targets: Δint8 <= 1.0; Δtea <= 1.5 for the default student on digits, "
          "wine and breast cancer; wall <= 90 s per run (2 cores).")


if __name__ == "__main__":
    main()
