"""What a target module declares (`Target`): every fact about a target that the shared code needs.

Each target module (`tflite`, `onnx`, `coreml`) ends with one `TARGET = Target(...)`, and
`exporters.targets` lists the modules: the pipeline and the proof read a target's suffix, files,
precisions, passes and how its artifact is checked from here and never branch on a target's name.
Importing this is cheap (no torch, no converter).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_runtime.weight_map import WeightMap
from exporters.options import PRECISIONS, ExportOptions


def _anywhere() -> bool:
    return True


@dataclass(frozen=True)
class ReadBack:
    """The proof for an artifact no runtime can run on this machine: the patched copy is read back
    with the format's own reader and must hold exactly the patched values. Not a proof, and the
    figures say so (`method: "read-back"`, `proven: false`, `note`)."""

    # (weight map, the artifact's files as name -> bytes, a scratch directory) -> the adaptive
    # tensors as the reader sees them, in PyTorch order
    read: Callable[[WeightMap, Mapping[str, bytes], Path], dict[str, np.ndarray]]
    reader: str  # what reads them, e.g. "coremltools"
    why: str  # why nothing can run here, e.g. "no Core ML runtime on this OS"
    checked: Mapping[str, str]  # per weight-map mode ("buffers", "inputs"): what the read-back checks


@dataclass(frozen=True)
class Target:
    """One target, as its module declares it (`TARGET = Target(...)`, listed in `exporters.targets`)."""

    name: str  # the `target` argument of `export` and the weight map's `target`
    suffix: str  # the artifact is `<options.name><suffix>`
    directory: bool  # the artifact is a directory (a package): it moves into place as a whole
    # ExportOptions.precision values it exports; every one must be in options.PRECISIONS
    precisions: tuple[str, ...]
    # the target's passes for these options (convert, locate, relocate, embed); the shared ones follow
    passes: Callable[[ExportOptions], list]
    # flat file of adaptive values outside the model file (external data, "weights as inputs"),
    # relative to the artifact root; "{artifact}" stands for the artifact's name
    adaptive_file: str = "{artifact}.adaptive.bin"
    # whether `device_runtime.runners` can run the artifact on this machine; if not, the proof
    # falls back to `read_back` (and fails if there is none)
    runs_here: Callable[[], bool] = _anywhere
    read_back: ReadBack | None = None
    # whether this machine has the target's converter (an optional package may be missing)
    converter_available: Callable[[], bool] = _anywhere
    inputs_mode: bool = True  # supports --adaptive-as-inputs

    def __post_init__(self) -> None:
        if not self.precisions or not set(self.precisions) <= set(PRECISIONS):
            raise ValueError(f"target {self.name!r}: precisions {self.precisions} must be some of {PRECISIONS}")
        if not self.suffix.startswith("."):
            raise ValueError(f"target {self.name!r}: suffix {self.suffix!r} must start with a dot")

    def artifact_name(self, stem: str) -> str:
        return stem + self.suffix

    def adaptive_file_of(self, artifact_name: str) -> str:
        return self.adaptive_file.format(artifact=artifact_name)
