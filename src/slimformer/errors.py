"""Typed exceptions of slimformer.

Every error raised for bad user input is a subclass of :class:`SlimformerError`, and its message
says what was wrong and what is allowed. The CLI prints the message and exits with status 2.
"""

from __future__ import annotations


class SlimformerError(Exception):
    """Base class of all slimformer errors raised for bad input or unsupported models."""


class ConfigError(SlimformerError):
    """A recipe or config is malformed: unknown keys, wrong types or out-of-range values.

    Attributes:
        problems: One ``"path: message"`` string per problem, all of them, in recipe order.
    """

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is invalid ({len(self.problems)} problem(s)):\n{lines}")


class ModelLoadError(SlimformerError):
    """A model could not be loaded: missing path, bad factory string, mismatching weights."""


class UnsupportedModelError(SlimformerError):
    """The structure of a model could not be discovered; says what was found and what is missing."""


class DataError(SlimformerError):
    """A data set is missing, malformed, or does not fit the model (shape, dtype, NaN)."""


class CalibrationError(SlimformerError):
    """Calibration failed: NaN/inf activations, too few samples for the method."""


class ExportError(SlimformerError):
    """A model could not be exported (unsupported operator, bad output path)."""


class HardwareError(SlimformerError):
    """An FPGA project could not be generated (unsupported layer, bad precision)."""


class StageError(SlimformerError):
    """A pipeline stage failed or stages were given in an illegal order."""


class OutputError(SlimformerError):
    """An output path is refused (not written by slimformer, protected, locked, unwritable)."""
