"""The knobs of one export (`ExportOptions`); imports nothing heavy.

Every target takes the same options, so `export(..., **options)` is one signature for all. The
targets are listed in `exporters.targets` (`TARGETS`); each declares which `PRECISIONS` it exports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from exporters.errors import ExportError

# float16 / int8 quantise the frozen weights (int8: dynamic range, int8 weights, float activations);
# adaptive tensors stay float (exporters/quantize.py, docs/quantization.md)
PRECISIONS = ("float32", "float16", "int8")
PROOF_ATOL = 1e-5  # max abs error between a float32 artifact and PyTorch that the proof accepts ...
PROOF_RTOL = 1e-6  # ... plus this times the largest |output|: float32 rounding grows with the magnitudes
# summed (a trained CNN's logits reach ~40, where one float32 step is ~4e-6 and a runtime's
# summation order alone moves a logit by more than 1e-5); a misplaced patch errs by far more
# The proof's default (atol, rtol) per precision: a quantised artifact differs from float PyTorch by
# its quantisation error, measured in docs/quantization.md ("Tolerances"); a misplaced patch still
# errs by the size of the tensor's effect, which the proof requires to exceed the tolerance.
PROOF_TOLERANCES = {
    "float32": (PROOF_ATOL, PROOF_RTOL),
    "float16": (1e-3, 2e-3),
    "int8": (1e-2, 2e-2),
}


@dataclass(frozen=True)
class ExportOptions:
    name: str = "model"  # artifact stem: model.tflite, model.onnx (+ model.onnx.adaptive.bin), model.mlpackage
    verify: bool = True  # run the export-time proof (patch fresh values through the weight map, compare)
    adaptive_as_inputs: bool = False  # adaptive tensors become model inputs instead of swappable buffers
    precision: str = "float32"  # one the target declares; "float16" / "int8" quantise the frozen weights
    output_names: tuple[str, ...] | None = None  # default: "output", or output_0.. for several outputs
    atol: float | None = None  # proof tolerance (max abs error); None: the precision's, PROOF_TOLERANCES ...
    rtol: float | None = None  # ... plus rtol x the largest |PyTorch output| of the proof
    seed: int = 0  # seeds the fingerprint values and the proof's fresh values
    progress: bool = False  # a progress bar over the passes (the CLI turns it on)
    form: dict | None = None  # what the inputs mean to the task (weight map `form`, e.g. a ranking form); copied only

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise ExportError(f"artifact name {self.name!r} must be a plain file stem (no path, no leading dot)")
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.form is not None and not isinstance(self.form, dict):
            raise ExportError(f"form must be a dict (the weight map's `form`), got {type(self.form).__name__}")
        if self.output_names is not None:
            object.__setattr__(self, "output_names", tuple(self.output_names))
        atol, rtol = PROOF_TOLERANCES[self.precision]
        if self.atol is None:
            object.__setattr__(self, "atol", atol)
        if self.rtol is None:
            object.__setattr__(self, "rtol", rtol)
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
