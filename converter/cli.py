"""`edge-convert`: a thin shell over converter.pipeline.

    edge-convert example digits|series|tiny-ic|tiny-kws|tiny-vww|tiny-ad|fusion --out DIR
                                              write data, a trained teacher and a recipe
    edge-convert run [RECIPE] [options]       the whole pipeline, atomically into --out
    edge-convert STAGE [RECIPE] --work DIR    one stage (teacher, distill, prune, export,
                                              quantize, compile, evaluate, report, bundle)
    edge-convert profiles                     list the firmware profiles

Every recipe field is also an option `--<section>-<field>` (see `edge-convert run --help`).
Errors print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from agent.errors import AgentError
from agent.pipes import reader_gone
from converter.errors import ConvertError

EXIT_ERROR = 2
# What the [convert] extra brings; a device install has none of it.
TOOLCHAIN = {"torch", "litert_torch", "onnx", "onnxscript", "onnxruntime", "sklearn",
             "torch_pruning", "tqdm", "matplotlib", "tensorboard", "ethosu", "ai_edge_litert",
             "torchao"}


def _add_recipe_options(p: argparse.ArgumentParser) -> None:
    from converter.recipe import option_help, option_names  # noqa: PLC0415  # when used

    p.add_argument("recipe", nargs="?", type=Path, help="recipe TOML (optional)")
    group = p.add_argument_group("recipe options (override the recipe file; lists as TOML, "
                                 "e.g. [64, 32])")
    for flag, (section, field) in option_names().items():
        group.add_argument(flag, dest=f"opt:{section or ''}:{field}", metavar="VALUE",
                           help=option_help(section, field))


def _overrides(ns: argparse.Namespace) -> dict[tuple[str | None, str], Any]:
    from converter.recipe import parse_value  # noqa: PLC0415  # when used

    out: dict[tuple[str | None, str], Any] = {}
    for key, raw in vars(ns).items():
        if key.startswith("opt:") and raw is not None:
            _, section, field = key.split(":")
            if raw == "":
                value = None  # `--teacher-onnx ""` unsets what the recipe file set
            elif (section, field) in {("data", "source"), ("", "out")}:
                value = raw
            else:
                value = parse_value(raw)
            out[(section or None, field)] = value
    return out


class _NoAbbrevParser(argparse.ArgumentParser):
    """No abbreviated options (`--data-val 0.3` silently set data.val_fraction), and a usage
    error is one line, like every other error (`--help` shows the usage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"edge-convert: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from converter.context import STAGE_NAMES  # noqa: PLC0415  # no torch for --help

    parser = _NoAbbrevParser(prog="edge-convert", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the toolchains' own log lines and warnings (torch, "
                             "TFLite, absl), which are hidden by default")
    # No abbreviations: `--data-val 0.3` silently set data.val_fraction.
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=_NoAbbrevParser)
    ex = sub.add_parser("example", help="write a built-in example (data, teacher, recipe)")
    ex.add_argument("name", choices=["digits", "series", "tiny-ic", "tiny-kws", "tiny-vww",
                                     "tiny-ad", "fusion"],
                    help="digits: 8x8 images (scikit-learn); series: generated vibration "
                         "windows (1 x 128, raw milli-g); tiny-*: an MLPerf Tiny reference "
                         "model (ResNet-8, DS-CNN, MobileNetV1 0.25, FC autoencoder) trained "
                         "on generated data of its input shape, to quantize as trained; "
                         "fusion: a model with two inputs (motor features and a vibration "
                         "window) given as ONNX, to quantize as trained")
    ex.add_argument("--out", type=Path, required=True,
                    help="directory for the data, the teacher and recipe.toml")
    ex.add_argument("--profile", default="raspberry-pi-4",
                    help="the target profile the recipe names (default raspberry-pi-4)")
    ex.add_argument("--epochs", type=int, default=None,
                    help="teacher training epochs (default: the example's own)")
    ex.add_argument("--teacher", choices=["onnx", "torch"], default="onnx",
                    help="which teacher the recipe names (both files are written)")
    run = sub.add_parser("run", help="run the whole pipeline into --out")
    _add_recipe_options(run)
    run.add_argument("--force", action="store_true", help="replace an existing output")
    for name in STAGE_NAMES:
        st = sub.add_parser(name, help=f"run the {name} stage in a work directory")
        _add_recipe_options(st)
        st.add_argument("--work", type=Path, required=True,
                        help="work directory shared by the stages")
    sub.add_parser("profiles", help="list firmware profiles")
    return parser


def _say(msg: str) -> None:
    print(msg, flush=True)


def _dispatch(ns: argparse.Namespace, *, verbose: bool) -> int:
    if ns.command == "profiles":  # needs no toolchain
        from agent.profiles import available_profiles, load_profile  # noqa: PLC0415  # when used

        for name in available_profiles():
            print(f"{name:22} {load_profile(name).description}")
        return 0
    from converter import pipeline  # noqa: PLC0415  # torch: only for a conversion
    from converter.context import open_context  # noqa: PLC0415  # when used
    from converter.recipe import load_recipe  # noqa: PLC0415  # when used

    if not verbose:
        _quiet_python_logs()
    if ns.command == "example":
        import importlib  # noqa: PLC0415  # when used

        module, _, case = ns.name.partition("-")
        write_example = importlib.import_module(f"converter.examples.{module}").write_example
        kwargs: dict[str, Any] = {} if ns.epochs is None else {"epochs": ns.epochs}
        if case:
            kwargs["case"] = case
        figure = write_example(ns.out, profile=ns.profile, teacher_kind=ns.teacher, **kwargs)
        what = ("model test anomaly AUC" if case == "ad" else "model test accuracy" if case
                else "teacher test accuracy")
        _say(f"example written to {ns.out} ({what} {figure:.2%}); next: "
             f"edge-convert run {ns.out / 'recipe.toml'}")
        return 0
    recipe = load_recipe(ns.recipe, _overrides(ns))
    if ns.command == "run":
        out = pipeline.run(recipe, _say, force=ns.force, check_stop=_check_stop)
        _say(f"done: {out}/report.md, bundle in {out}/bundle")
        return 0
    ctx = open_context(recipe, ns.work, _say)
    pipeline.run_stage(ns.command, ctx)
    return 0


NOISY_LOGGERS = ("torch", "torchao", "litert_torch", "ai_edge_torch", "onnxscript", "absl",
                 "tensorflow", "root")


def _quiet_python_logs() -> None:
    """Toolchain loggers to ERROR; torch sets its own loggers' levels when it is imported,
    so this runs again after the import."""
    for name in [*NOISY_LOGGERS, *logging.root.manager.loggerDict]:
        if name.split(".")[0] in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _native_stderr_to(sink: Path | None) -> Iterator[None]:
    """Send what native libraries write to file descriptor 2 (absl, oneDNN, the TFLite
    interpreter's INFO lines) to `sink`, while Python's `sys.stderr` (progress bars, our
    error line, tracebacks) keeps the real stderr. None: leave both alone."""
    if sink is None:
        yield
        return
    sys.stderr.flush()
    real = os.dup(2)
    python_stderr = sys.stderr
    with sink.open("wb") as captured:
        os.dup2(captured.fileno(), 2)
    sys.stderr = open(real, "w", encoding="utf-8", errors="replace", closefd=False,  # noqa: SIM115
                      buffering=1)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(real, 2)
        os.close(real)


def main(argv: list[str] | None = None) -> int:
    # Quiet the toolchains' own chatter (TensorFlow/absl C++ logs, deprecation notices from
    # torch internals, torchvision notes from the ONNX exporter) so the user sees our stage
    # lines and real errors; -v shows it all.
    ns = build_parser().parse_args(argv)
    if not ns.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("GLOG_minloglevel", "2")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
        _quiet_python_logs()
    # SIGTERM unwinds like Ctrl-C, so `run` removes its temporary directory either way; both
    # are remembered, so a stop whose exception a library swallowed (or a native call held
    # up) still ends the run at the next stage boundary (_check_stop).
    _STOP.clear()
    _STOPPED_BY.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = ((signal.signal(signal.SIGTERM, _terminate),
                 signal.signal(signal.SIGINT, _interrupt)) if main_thread else None)
    try:
        with tempfile.TemporaryDirectory(prefix="edge-convert-") as tmp, \
                _native_stderr_to(None if ns.verbose else Path(tmp) / "native-stderr.log"):
            return _dispatch(ns, verbose=ns.verbose)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in TOOLCHAIN:
            raise
        print(f"edge-convert: error: the converter's toolchain is not installed (no module "
              f"{exc.name!r}): pip install 'edgekeeper[convert]' (torch first: "
              "pip install torch==2.13.0)", file=sys.stderr)
        return EXIT_ERROR
    except (ConvertError, AgentError) as exc:
        print(f"edge-convert: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `edge-convert profiles | head -1`
        return reader_gone()
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except _Terminated:
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])


class _Terminated(BaseException):  # a signal, not an error
    pass


_STOP = threading.Event()  # SIGTERM or SIGINT arrived (its exception may have been swallowed)
_STOPPED_BY: list[int] = []


def _terminate(signum: int, frame: Any) -> None:
    _STOPPED_BY.append(signum)
    _STOP.set()
    raise _Terminated


def _interrupt(signum: int, frame: Any) -> None:
    _STOPPED_BY.append(signum)
    _STOP.set()
    raise KeyboardInterrupt


def _check_stop() -> None:
    """Between stages: a SIGTERM or SIGINT whose exception a library caught still stops
    the run."""
    if _STOP.is_set():
        if _STOPPED_BY and _STOPPED_BY[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated


if __name__ == "__main__":
    sys.exit(main())
