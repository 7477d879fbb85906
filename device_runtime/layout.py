"""Byte layout of adaptive tensors: the alignment every adaptive tensor starts on, how a float
parameter in PyTorch shape becomes the bytes an artifact stores (transposed per the weight map's
layout, cast to its little-endian dtype), and the way back (`stored_values`).

Numpy only, so the cloud's patch builder, the exporters (and their proof) and device code use one
implementation of these rules.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from device_runtime.errors import MntoolError
from device_runtime.weight_map import WeightMap, read_tensor

ALIGNMENT = 64  # every adaptive tensor starts on a 64-byte boundary (cache line, SIMD loads)
NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}  # weight-map dtype -> stored bytes


class LayoutError(MntoolError):
    """Parameters to lay out are missing, extra, mis-shaped, not float, not finite, or overflow the stored dtype."""


def align(n: int, alignment: int = ALIGNMENT) -> int:
    """`n` rounded up to a multiple of `alignment`."""
    return (n + alignment - 1) // alignment * alignment


def stored_tensors(weight_map: WeightMap, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`params` (name -> float array in PyTorch shape) as the artifact stores them: transposed
    per the weight map's layout and cast to its dtype. Missing, extra, mis-shaped, non-float or
    non-finite parameters, and values that overflow float16, are errors."""
    names = weight_map.adaptive_names
    missing, extra = [n for n in names if n not in params], sorted(set(params) - set(names))
    if missing or extra:
        raise LayoutError(f"parameters do not match the artifact's adaptive tensors: missing {missing}, extra {extra}")
    stored = {}
    for t in weight_map.tensors:
        value = np.asarray(params[t.name])
        if value.dtype.kind != "f":
            raise LayoutError(f"{t.name}: dtype {value.dtype} is not a float type")
        if value.shape != tuple(t.shape):
            raise LayoutError(f"{t.name}: shape {value.shape}, the artifact expects {tuple(t.shape)}")
        if not np.isfinite(value).all():
            raise LayoutError(f"{t.name}: holds NaN or Inf")
        if t.layout == "transpose":
            value = value.T
        with np.errstate(over="ignore"):
            cast = np.ascontiguousarray(value, dtype=NUMPY_DTYPES[t.dtype]).reshape(t.stored_shape)
        if not np.isfinite(cast).all():
            raise LayoutError(f"{t.name}: values overflow the artifact's {t.dtype}")
        stored[t.name] = cast
    return stored


def stored_values(weight_map: WeightMap, files: Mapping[str, bytes | bytearray]) -> dict[str, np.ndarray]:
    """Each adaptive tensor read back from `files` (file name -> bytes) through the weight map, as
    float32 in PyTorch order: the inverse of `stored_tensors` up to the stored dtype's rounding."""
    return {t.name: read_tensor(t, files[t.file]).astype(np.float32) for t in weight_map.tensors}
