"""The knobs of one export (`ExportOptions`); imports nothing heavy.

Every target takes the same options, so `export(..., **options)` is one signature for all. The
targets are listed in `exporters.targets` (`TARGETS`); each declares which `PRECISIONS` it exports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from exporters.errors import ExportError

PRECISIONS = ("float32", "float16")
PROOF_ATOL = 1e-5  # max abs error between a float32 artifact and PyTorch that the proof accepts ...
PROOF_RTOL = 1e-6  # ... plus this times the largest |output|: float32 rounding grows with the magnitudes
# summed (a trained CNN's logits reach ~40, where one float32 step is ~4e-6 and a runtime's
# summation order alone moves a logit by more than 1e-5); a misplaced patch errs by far more


@dataclass(frozen=True)
class ExportOptions:
    name: str = "model"  # artifact stem: model.tflite, model.onnx (+ model.onnx.adaptive.bin), model.mlpackage
    verify: bool = True  # run the export-time proof (patch fresh values through the weight map, compare)
    adaptive_as_inputs: bool = False  # adaptive tensors become model inputs instead of swappable buffers
    precision: str = "float32"  # one the target declares; Core ML's "float16" stores (and computes) weights in fp16
    output_names: tuple[str, ...] | None = None  # default: "output", or output_0.. for several outputs
    atol: float = PROOF_ATOL  # proof tolerance (max abs error) ...
    rtol: float = PROOF_RTOL  # ... plus rtol x the largest |PyTorch output| of the proof
    seed: int = 0  # seeds the fingerprint values and the proof's fresh values
    progress: bool = False  # a progress bar over the passes (the CLI turns it on)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise ExportError(f"artifact name {self.name!r} must be a plain file stem (no path, no leading dot)")
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.output_names is not None:
            object.__setattr__(self, "output_names", tuple(self.output_names))
        if not self.atol > 0:
            raise ExportError(f"atol must be > 0, got {self.atol}")
        if not self.rtol >= 0:
            raise ExportError(f"rtol must be >= 0, got {self.rtol}")

    @classmethod
    def from_kwargs(cls, options: dict) -> ExportOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ExportError(f"unknown export option(s) {unknown} (known: {sorted(known)})")
        return cls(**options)
