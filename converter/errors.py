"""Errors of the converter, each one line for the user, all under ConvertError.

    ConvertError                 root; the CLI prints `edge-convert: error: <message>`, exits 2
    ├── RecipeError              unknown key, bad value, unknown profile or student family
    ├── DataError                missing/corrupt data, NaN/inf, wrong shape or labels
    ├── TeacherError             missing/corrupt teacher, it does not fit the data, no clear
    │                            output of class scores, or it does not beat chance
    ├── DistillGapError          the fp32 student is too far below its teacher
    ├── UnsupportedOperatorError an operator the target cannot run
    ├── AccuracyGateError        int8 outside its quality gate after every mitigation
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
    """int8 fell outside the gate against the float model: accuracy more than the
    tolerance below it (classifiers), or output error above the limit (other models).

    Attributes:
        fp32_score, int8_score: the gate's scores (accuracy, or minus the output error).
    """

    def __init__(self, message: str, *, fp32_score: float, int8_score: float) -> None:
        super().__init__(message)
        self.fp32_score = fp32_score
        self.int8_score = int8_score


class ToolchainError(ConvertError):
    """An external tool failed."""
