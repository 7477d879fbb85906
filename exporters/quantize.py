"""Quantised variants that stay patchable: what the targets' quantisation passes share.

`precision="float16"` or `"int8"` (`exporters.options.PRECISIONS`) quantises the *frozen* weights
with the target's own tool (ai-edge-quantizer for LiteRT, `onnxruntime.quantization` and
`onnxruntime.transformers.float16` for ONNX Runtime, `coremltools.optimize.coreml` for Core ML).
The adaptive tensors are left out of it by name, in the tool's own recipe or config: they stay
float, exactly the constants the converter wrote, so the weight map, the patch format and the
device's applier are those of a float artifact (docs/quantization.md).

A target's quantise pass runs after `convert` and before `locate`, in this order:

1. `excluded(job, constants)`: the adaptive tensors among the converted model's constants, found
   by their fingerprint values (`exporters.locate.locate`), whose consumers the tool must skip;
2. the tool runs with those consumers excluded;
3. `check_untouched(job, before, constants, tool)`: the quantised model must still hold every
   adaptive tensor exactly, in its float dtype and used, else the export fails naming the tensor (the `locate` pass
   then maps them as for any float artifact);
4. `record(job, ...)`: what was done goes to the weight map's `extra["quantization"]`.

Importing this is cheap (no converter, no quantiser).
"""

from __future__ import annotations

from importlib import metadata

from exporters.errors import ExportError
from exporters.job import ExportJob
from exporters.locate import Constant, Placement, locate


def excluded(job: ExportJob, constants: list[Constant]) -> list[Placement]:
    """The adaptive tensors among `constants` (the converted, not yet quantised model's), which the
    quantiser must leave alone; none in "weights as inputs" mode (they are inputs, not constants)."""
    if job.mode == "inputs":
        return []
    return locate(job.fingerprints, constants)


def check_untouched(job: ExportJob, before: list[Placement], constants: list[Constant], tool: str) -> None:
    """Every adaptive tensor must still be one used constant holding exactly its fingerprint
    values, in the dtype it had `before` the tool ran; otherwise the export fails naming it."""
    if job.mode == "inputs":
        return
    try:
        after = {p.name: p for p in locate(job.fingerprints, constants)}
    except ExportError as err:
        raise type(err)(f"after {tool} ({job.options.precision}): {err}") from None
    for p in before:
        if after[p.name].dtype != p.dtype:
            raise ExportError(
                f"{p.name}: {tool} stored it as {after[p.name].dtype} although it was excluded "
                f"(the converter wrote {p.dtype}); adaptive tensors must stay as the converter wrote them"
            )


def require_quantized(job: ExportJob, count: int, tool: str, why: str) -> None:
    """A quantised variant in which the tool quantised nothing would be a float artifact under a
    quantised name: refuse it, saying why the tool skipped every weight."""
    if count == 0:
        raise ExportError(
            f"{tool} quantised no weight of {type(job.model).__name__} to {job.options.precision} ({why}); "
            f"export it as float32"
        )


def version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def record(
    job: ExportJob, *, tool: str, distribution: str, scheme: str, excluded_ops: list[str], quantized: int
) -> None:
    """What the quantise pass did, as the weight map's `extra["quantization"]`."""
    job.extra["quantization"] = {
        "precision": job.options.precision,
        "tool": f"{tool} {version(distribution)}",
        "scheme": scheme,
        "quantized_tensors": quantized,
        "excluded_ops": sorted(excluded_ops),  # the ops reading adaptive tensors: left float
    }
