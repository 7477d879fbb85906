"""The ways an export can fail, one class each, all `MntoolError`s (one line, no traceback).

The `AdaptiveTensor*` errors name what a converter did to an adaptive tensor that would make a
patch write the wrong bytes (or no bytes at all), or an adaptive tensor no patch could make a
difference with (`AdaptiveTensorNoEffect`); `ProofMismatch` is the export-time proof failing.
"""

from __future__ import annotations

from device_runtime.errors import MntoolError


def first_line(err: Exception) -> str:
    """A converter's exception as one line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class ExportError(MntoolError):
    """An export cannot produce a correct artifact from what it was given."""


class UnknownTarget(ExportError):
    """The target is not one of tflite, onnx, coreml."""


class UnknownAdaptiveParameter(ExportError):
    """An adaptive name is not a parameter of the model."""


class ConversionFailed(ExportError):
    """The converter rejected the model (an unsupported op, a shape it cannot trace, ...)."""


class AdaptiveTensorFolded(ExportError):
    """The converter merged an adaptive tensor with other values (BatchNorm, a constant, a concat)."""


class AdaptiveTensorDuplicated(ExportError):
    """The artifact holds an adaptive tensor more than once: patching one copy leaves the others stale."""


class AdaptiveTensorTransposed(ExportError):
    """The artifact holds an adaptive tensor re-ordered in a way a weight map cannot describe."""


class AdaptiveTensorMissing(ExportError):
    """The artifact holds no used constant with an adaptive tensor's values (dropped or made dynamic)."""


class AdaptiveTensorNoEffect(ExportError):
    """Changing an adaptive tensor does not change the model's output: no patch could personalise it."""


class ProofMismatch(ExportError):
    """The artifact, patched through its weight map, does not compute what PyTorch computes."""
