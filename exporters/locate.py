"""Find each adaptive tensor among an artifact's constants by its fingerprint values.

Each target lists its constants (read with the format's own schema, with how many graph ops use
each); `locate` matches the fingerprint values 1:1, as stored (identity) or as a 2-D transpose, and
turns every other outcome into a named error: folded, duplicated, re-ordered, or missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporters.errors import (
    AdaptiveTensorDuplicated,
    AdaptiveTensorFolded,
    AdaptiveTensorMissing,
    AdaptiveTensorTransposed,
)


@dataclass(frozen=True)
class Constant:
    """One constant tensor of an artifact, as the format stores it."""

    key: str | int  # how the target addresses it: buffer index, initializer name, const op name
    values: np.ndarray  # flat, in the stored dtype
    stored_shape: tuple[int, ...]
    uses: int  # graph ops reading it; an unused constant is dead weight, patching it does nothing


@dataclass(frozen=True)
class Placement:
    """Where one adaptive tensor was found."""

    name: str
    key: str | int
    layout: str  # "identity" or "transpose", from PyTorch order to stored order
    dtype: str  # the stored dtype
    stored_shape: tuple[int, ...]


def locate(fingerprints: dict[str, np.ndarray], constants: list[Constant]) -> list[Placement]:
    """Place every fingerprinted tensor, compared in each constant's own dtype (fp16 or fp32)."""
    live = [c for c in constants if c.uses > 0]
    placements = []
    for name, value in fingerprints.items():
        layouts = {"identity": value}
        if value.ndim == 2 and 1 not in value.shape:
            layouts["transpose"] = value.T
        hits = [
            (c, layout)
            for c in live
            if c.values.size == value.size
            for layout, arranged in layouts.items()
            if np.array_equal(c.values, arranged.ravel().astype(c.values.dtype))
        ]
        if len(hits) > 1:
            raise AdaptiveTensorDuplicated(
                f"{name}: the converter stored it {len(hits)} times ({', '.join(str(c.key) for c, _ in hits)}); "
                "a patch could update only one copy"
            )
        if not hits:
            raise _diagnose(name, value, constants)
        c, layout = hits[0]
        placements.append(Placement(name, c.key, layout, c.values.dtype.name, c.stored_shape))
    return placements


def _diagnose(name: str, value: np.ndarray, constants: list[Constant]) -> Exception:
    """Why a tensor was not found whole: the most specific of re-ordered, merged, unused, changed."""
    shape = "x".join(map(str, value.shape))

    def same(c: Constant) -> np.ndarray:
        return value.ravel().astype(c.values.dtype)

    for c in constants:
        if c.values.size == value.size and np.array_equal(np.sort(c.values), np.sort(same(c))):
            return AdaptiveTensorTransposed(
                f"{name} ({shape}): stored re-ordered as {c.key} {c.stored_shape}, a layout other than "
                "identity or a 2-D transpose, so a patch cannot be laid out for it"
            )
    for c in constants:
        if c.values.size > value.size and np.isin(same(c), c.values).all():
            return AdaptiveTensorFolded(
                f"{name} ({shape}): merged into the larger constant {c.key} {c.stored_shape} "
                "(concatenated or re-laid out with other values)"
            )
    for c in constants:
        if 1 < c.values.size < value.size and np.isin(c.values, same(c)).all():
            return AdaptiveTensorFolded(
                f"{name} ({shape}): split into smaller constants (e.g. {c.key} {c.stored_shape}), "
                "so its bytes are not one patchable range"
            )
    for c in constants:
        if c.uses == 0 and c.values.size == value.size and np.array_equal(c.values, same(c)):
            return AdaptiveTensorMissing(
                f"{name} ({shape}): only an unused copy ({c.key}) is left; the graph does not read it"
            )
    if any(c.values.size == value.size for c in constants):
        return AdaptiveTensorFolded(
            f"{name} ({shape}): no constant holds its values, but one of its size holds others: the converter "
            "folded it with neighbouring ops (BatchNorm statistics, a following BatchNorm, a constant mul/add)"
        )
    return AdaptiveTensorMissing(
        f"{name} ({shape}): no constant of its size exists; the converter dropped it or computes it at run time"
    )
