"""Bad input: a one-line error naming the problem, exit status 2, no partial output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FAST

from converter.cli import main as convert


def _fails(capsys: pytest.CaptureFixture[str], args: list[str], out: Path, *needles: str) -> str:
    rc = convert(["run", *args, "--out", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err, "no error message"
    line = err[-1]
    assert line.startswith("edge-convert: error: ")
    for needle in needles:
        assert needle in line, line
    assert not out.exists(), "partial output left behind"
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary directory left behind"
    return line


def test_missing_teacher_file(capsys, example: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _fails(capsys, [str(example / "recipe.toml"), "--teacher-onnx", str(tmp_path / "no.onnx")],
           tmp_path / "o", "no.onnx", "does not exist")


def test_corrupt_teacher_file(capsys, example: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes((example / "teacher.onnx").read_bytes()[:500])
    _fails(capsys, [str(example / "recipe.toml"), "--teacher-onnx", str(bad)], tmp_path / "o",
           "bad.onnx", "not a valid ONNX model")


def test_corrupt_torch_weights(capsys, example: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _fails(capsys, [str(example / "recipe.toml"), "--teacher-onnx", "",
                    "--teacher-torch", "converter.examples.digits:teacher",
                    "--teacher-weights", str(bad)], tmp_path / "o", "bad.pt", "cannot be loaded")


def test_data_that_does_not_fit_the_teacher(capsys, example: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "wide.npz"
    np.savez(data, x=np.random.default_rng(0).random((100, 1, 12, 12), dtype=np.float32))
    _fails(capsys, [str(example / "recipe.toml"), "--data-source", str(data)], tmp_path / "o",
           "(1, 12, 12)", "expects (1, 8, 8)")


def test_nan_in_data(capsys, example: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = np.load(example / "digits.npz")
    x = d["x"].copy()
    x[7, 0, 3, 3] = np.inf
    data = tmp_path / "nan.npz"
    np.savez(data, x=x, y=d["y"])
    _fails(capsys, [str(example / "recipe.toml"), "--data-source", str(data)], tmp_path / "o",
           "NaN/inf", "sample 7")


def test_unknown_profile(capsys, example: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _fails(capsys, [str(example / "recipe.toml"), "--target-profile", "pi-9000"],
           tmp_path / "o", "unknown profile 'pi-9000'")


def test_recipe_with_unknown_key(capsys, example: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = tmp_path / "r.toml"
    recipe.write_text((example / "recipe.toml").read_text() + "\n[quantize]\nbits = 4\n")
    _fails(capsys, [str(recipe)], tmp_path / "o", "quantize.bits", "Extra inputs")


def test_operator_the_target_cannot_run(capsys, example: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    line = _fails(capsys, [str(example / "recipe.toml"), "--target-profile", "coral-edgetpu",
                           "--student-family", "module",
                           "--student-module", "fixture_students:sin_student"],
                  tmp_path / "o", "SIN", "coral-edgetpu")
    assert "cannot run" in line


def test_existing_output_is_not_clobbered_without_force(capsys, example: Path,  # type: ignore[no-untyped-def]
                                                        tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("mine")
    rc = convert(["run", str(example / "recipe.toml"), "--out", str(out), *FAST])
    assert rc == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "keep").read_text() == "mine"


@pytest.mark.parametrize("args", [["--data-val", "0.3"], ["--no-such-option", "1"]])
def test_an_abbreviated_or_unknown_option_is_one_error_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str]) -> None:
    """`--data-val 0.3` used to set data.val_fraction silently."""
    with pytest.raises(SystemExit) as exit_:
        convert(["run", *args, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-convert: error: unrecognized"), err
    assert not (tmp_path / "out").exists()


def test_every_recipe_option_has_help_with_its_default_and_choices(
        capsys: pytest.CaptureFixture[str]) -> None:
    from converter.recipe import option_help, option_names

    for flag, (section, field) in option_names().items():
        text = option_help(section, field)
        name = f"{section}.{field}" if section else field
        assert text.startswith(f"{name}: ") and len(text) > len(name) + 12, (flag, text)
        assert "(default: " in text, (flag, text)
    with pytest.raises(SystemExit):
        convert(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("(default: auto); one of auto, mlp, cnn, dscnn, resnet8, kws-dscnn, mobilenet-v1, "
            "fc-autoencoder, module") in text
    assert "(default: auto); one of auto, none, standard, minmax" in text
    assert "distill.max_gap_points: gate: the fp32 student" in text
    assert "teacher.output: ONNX output of class scores" in text


def test_sigterm_during_run_cleans_up_like_ctrl_c(example: Path, tmp_path: Path) -> None:
    """SIGTERM used to leave `.out.*` next to the output (SIGINT cleaned up)."""
    import signal
    import subprocess
    import sys

    from polling import wait_until

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "converter.cli", "run",
                             str(example / "recipe.toml"), "--out", str(out), *FAST],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: list(tmp_path.glob(".out.*")), timeout_s=120,
                   what="the run's temporary directory")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_a_stop_between_stages_leaves_nothing_behind(example: Path, tmp_path: Path) -> None:
    """A SIGTERM whose exception a library swallowed mid-stage still stops the run at the
    next stage boundary (the CLI's check_stop), and `run` removes its temporary directory."""
    from converter import pipeline
    from converter.recipe import load_recipe

    class Stop(BaseException):
        pass

    calls = []

    def check_stop() -> None:
        calls.append(1)
        if len(calls) == 3:  # before the third stage
            raise Stop

    out = tmp_path / "out"
    recipe = load_recipe(example / "recipe.toml", {(None, "out"): str(out)})
    with pytest.raises(Stop):
        pipeline.run(recipe, lambda _: None, check_stop=check_stop)
    assert len(calls) == 3
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
