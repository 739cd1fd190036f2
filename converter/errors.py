"""Errors of the converter, each one line for the user, all under ConvertError.

    ConvertError                 root; the CLI prints `edge-convert: error: <message>`, exits 2
    ├── RecipeError              unknown key, bad value, unknown profile or student family
    ├── DataError                missing/corrupt data, NaN/inf, wrong shape or labels
    ├── TeacherError             missing/corrupt teacher, it does not fit the data, no clear
    │                            output of class scores, or it does not beat chance
    ├── DistillGapError          the fp32 student is too far below its teacher
    ├── UnsupportedOperatorError an operator the target cannot run
    ├── AccuracyGateError        int8 accuracy still too low after every mitigation
    └── ToolchainError           an external compiler (Vela) failed
"""

from __future__ import annotations


class ConvertError(Exception):
    """Root of the converter's errors."""


class RecipeError(ConvertError):
    """The recipe or a command-line option is wrong."""


class DataError(ConvertError):
    """The data cannot be used."""


class TeacherError(ConvertError):
    """The teacher cannot be loaded or does not fit the data."""


class DistillGapError(ConvertError):
    """The distilled fp32 student is more than `distill.max_gap_points` below the teacher."""


class UnsupportedOperatorError(ConvertError):
    """The model uses operators the target cannot run.

    Attributes:
        operators: the offending operator names.
        profile: the target profile.
    """

    def __init__(self, message: str, *, operators: list[str], profile: str) -> None:
        super().__init__(message)
        self.operators = operators
        self.profile = profile


class AccuracyGateError(ConvertError):
    """int8 accuracy fell more than the tolerance below the float student.

    Attributes:
        fp32_accuracy, int8_accuracy, tolerance_points: the figures that failed the gate.
    """

    def __init__(
        self, message: str, *, fp32_accuracy: float, int8_accuracy: float,
        tolerance_points: float,
    ) -> None:
        super().__init__(message)
        self.fp32_accuracy = fp32_accuracy
        self.int8_accuracy = int8_accuracy
        self.tolerance_points = tolerance_points


class ToolchainError(ConvertError):
    """An external tool failed."""
