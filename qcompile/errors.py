"""Exceptions raised by qcompile.

Every error names *where* (node, op, module path, file) and *what to do*; the CLI prints the
message without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations


class QCompileError(Exception):
    """Base class of every error qcompile raises on purpose."""


class CaptureError(QCompileError):
    """A model could not be captured into a Program (torch.export failed)."""


class PlanError(QCompileError):
    """A plan (or preset name, or plan file) is malformed or asks for something unsupported."""


class PassError(QCompileError):
    """A pass failed; the message names the pass, node, module path and the passes before it."""


class VerifyError(QCompileError):
    """A Program is inconsistent (dangling state, bad graph, shape/dtype mismatch)."""


class ArtifactError(QCompileError):
    """A saved artifact is missing, truncated, tampered with or of an unsupported format."""


class InputError(QCompileError):
    """Inputs handed to a CompiledModule do not match what it was compiled for."""


class ModelNotFoundError(QCompileError):
    """A zoo model or dataset is not installed (the message says which package to install)."""


class TuneError(QCompileError):
    """Tuning cannot start or go on: a bad tuning database, target, tracker or argument."""


class DataError(QCompileError):
    """Evaluation or calibration data is unusable (too short, empty, undecodable, NaN)."""


class NonFiniteError(DataError, ValueError):
    """A weight, buffer, example input, computed scale or calibration activation holds NaN or ±Inf.

    The message names the tensor (state key or input), the layer (module path) or node, how many
    NaN / +Inf / -Inf values it holds and where the first one is, and what to do. A ``ValueError``
    too, as the numeric routines that raise it (quantizers) raise ``ValueError`` for bad input.
    The message stays as written when the error crosses a ``torch.fx.Interpreter`` (which appends the
    node and a traceback of the model's source to ``args[0]``): the message already names the node.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
