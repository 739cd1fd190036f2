"""Teachers from another framework on raw tabular data, for tests and benchmarks.

scikit-learn's digits (flat, 64 features of 0..16), wine (13 features spread over
0.1..1680) and breast cancer (30 features over 0.001..4250), unscaled as they ship, with a
scikit-learn classifier fitted on the converter's training split only (default fractions and
seed) and exported by skl2onnx without ZipMap: the validation split the quality gates use
is as new to the teacher as to the student (a random forest scores 100 % on samples it was
fitted on). Needs scikit-learn and skl2onnx (the `[dev]` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from converter.data import split

DATASETS = ("digits", "wine", "breast_cancer")


def _teachers() -> dict[str, Callable[[], Any]]:
    from sklearn.ensemble import (  # noqa: PLC0415  # test tooling, loaded when used
        GradientBoostingClassifier,
        RandomForestClassifier,
    )
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.neural_network import MLPClassifier  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    # Models that need scaled inputs bring their own scaler, as shipped pipelines do.
    return {
        "mlp": lambda: make_pipeline(StandardScaler(),
                                     MLPClassifier((64,), max_iter=2000, random_state=0)),
        "gradient_boosting": lambda: GradientBoostingClassifier(
            n_estimators=50, max_depth=2, random_state=0),
        "random_forest": lambda: RandomForestClassifier(n_estimators=100, random_state=0),
        "logistic_regression": lambda: make_pipeline(StandardScaler(),
                                                     LogisticRegression(max_iter=5000)),
    }


TEACHERS = ("mlp", "gradient_boosting", "random_forest", "logistic_regression")


def write_case(where: Path, dataset: str, teacher: str) -> tuple[Path, Path]:
    """Write `<dataset>.npz` (x raw, y, labels) and `<dataset>_<teacher>.onnx` into
    `where`; returns (data, teacher file)."""
    from skl2onnx import to_onnx  # noqa: PLC0415  # test tooling, loaded when used
    from sklearn import datasets  # noqa: PLC0415

    bunch = getattr(datasets, f"load_{dataset}")()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    data = where / f"{dataset}.npz"
    np.savez(data, x=x, y=y, labels=np.array([str(n) for n in bunch.target_names]))
    sp = split(len(x), y, seed=0, val_fraction=0.15, test_fraction=0.2)
    model = _teachers()[teacher]().fit(x[sp.train], y[sp.train])
    onx = to_onnx(model, x[:1], options={"zipmap": False}, target_opset=17)
    path = where / f"{dataset}_{teacher}.onnx"
    path.write_bytes(onx.SerializeToString())
    return data, path
