"""Digits pipeline benchmark: prints the figures table, asserts nothing.

    .venv/bin/python bench/bench_convert.py [--profile raspberry-pi-4] [--runs 1]

Writes the digits example once (teacher trained here), then runs the whole `edge-convert`
pipeline per student family and prints, side by side: teacher / student fp32 / int8 ONNX /
int8 TFLite accuracy, parameter ratio, sizes, host latency per runtime (bare onnxruntime and
LiteRT on the same files) and wall time, against the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_pipeline(example: Path, out: Path, profile: str, family: str, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "converter.cli", "run", str(example / "recipe.toml"),
           "--out", str(out), "--target-profile", profile, "--student-family", family,
           "--distill-progress", "false", "--force", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed for {family}: {proc.stderr.strip().splitlines()[-1]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="raspberry-pi-4")
    ap.add_argument("--families", default="cnn,dscnn,mlp,cnn-wide,cnn-wide+structured,"
                                          "cnn-wide+unstructured",
                    help="student families; cnn-wide = channels [32,64]; +structured / "
                         "+unstructured prune 50 %% with 20 fine-tuning epochs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        example = Path(tmp) / "example"
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
            out = Path(tmp) / row
            wall = run_pipeline(example, out, args.profile, family, extra)
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


if __name__ == "__main__":
    main()
