"""A bundle's self-test: run the golden inputs, compare with the outputs recorded at build.

The check the device runs before it serves a new model: outputs within the manifest's `atol`
and top-1 agreement at or above `min_top1_agreement`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import BundleError
from agent.serving.runtime import LoadedModel, open_model, with_preprocessing
from agent.trust.manifest import Manifest


@dataclass(frozen=True)
class SelfTestResult:
    samples: int
    max_abs_diff: float
    top1_agreement: float
    passed: bool


def run_selftest(bundle_dir: Path, manifest: Manifest, *, threads: int = 1,
                 model: Path | bytes | None = None) -> SelfTestResult:
    """Load the bundle's model and run it on its golden inputs.

    Args:
        model: the model to load (decrypted bytes of a sealed model); default the
            bundle's model file.

    Raises:
        BundleError: selftest file unreadable or malformed (check="selftest").
        RuntimeLoadError: the model cannot be loaded.
    """
    loaded = with_preprocessing(
        open_model(bundle_dir / manifest.model_file if model is None else model,
                   manifest.runtime, threads=threads), manifest)
    return selftest_loaded(bundle_dir, manifest, loaded)


def selftest_loaded(bundle_dir: Path, manifest: Manifest, loaded: LoadedModel
                    ) -> SelfTestResult:
    """Run an already loaded model (the second session of an update, behind its
    preprocessing: the golden inputs are raw samples) on the golden inputs.

    Raises:
        BundleError: selftest file unreadable or malformed (check="selftest").
    """
    path = bundle_dir / manifest.selftest.file
    try:
        with np.load(path, allow_pickle=False) as npz:
            inputs, expected = npz["inputs"], npz["outputs"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise BundleError(f"selftest file {manifest.selftest.file} unreadable: {exc}",
                          check="selftest", path=manifest.selftest.file) from exc
    if len(inputs) != len(expected) or len(inputs) == 0:
        raise BundleError("selftest inputs and outputs differ in length", check="selftest",
                          path=manifest.selftest.file)
    got = loaded.run(inputs.astype(np.float32))
    if got.shape != expected.shape:
        raise BundleError(f"selftest output shape {got.shape}, expected {expected.shape}",
                          check="selftest")
    diff = float(np.max(np.abs(got - expected)))
    agree = float((got.argmax(1) == expected.argmax(1)).mean())
    passed = diff <= manifest.selftest.atol and agree >= manifest.selftest.min_top1_agreement
    return SelfTestResult(len(inputs), diff, agree, passed)
