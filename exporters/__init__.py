"""Compile a PyTorch model to TFLite, ONNX or Core ML with its adaptive tensors swappable.

`export(model, example_inputs, adaptive, target, out_dir, **options) -> Path` is the whole API:
it writes the artifact and `<artifact>.weightmap.json` (docs/weight-map.md) and proves, by
patching fresh values through the weight map, that the artifact computes what PyTorch does.
`export_staged(model, example_inputs, target, out_dir, **options) -> Path` does the same for an
early-exit model, one artifact per stage plus a manifest (`<name>.<target>.stages/`).
Importing this package is cheap: torch and the converters load inside `export`.
"""

from __future__ import annotations

from pathlib import Path

from exporters.options import ExportOptions
from exporters.targets import TARGETS

__all__ = ["TARGETS", "ExportOptions", "export", "export_staged"]


def export(model, example_inputs: tuple, adaptive: list[str], target: str, out_dir: Path | str, **options) -> Path:
    """Export `model` (an nn.Module in eval mode) for `target` into `out_dir`; returns the artifact.

    `example_inputs` are the forward() arguments (their names address the artifact's inputs);
    `adaptive` names the parameters (as in `model.named_parameters()`) a patch will replace.
    `options` are the fields of `ExportOptions` (name, verify, adaptive_as_inputs, precision,
    output_names, atol, seed, progress).

    >>> export(model, (history, target), model.adaptive_names(), "tflite", "artifacts/")
    PosixPath('artifacts/model.tflite')
    """
    from exporters.pipeline import run_export

    return run_export(model, example_inputs, adaptive, target, Path(out_dir), ExportOptions.from_kwargs(options))


def export_staged(model, example_inputs, target: str, out_dir: Path | str, **options) -> Path:
    """Export an early-exit `model` (the staged protocol: `stages()`, `stage_adaptive(k)`,
    `stage_outputs(k)`, `stage_example(k, x)`, `exit_names(k)`, `n_exits`, `adaptive_names()`) for
    `target`: each stage an ordinary artifact with its own weight map and proof, in
    `out_dir/<name>.<target>.stages/` with the manifest `stages.json` (docs/weight-map.md, "Staged
    (early-exit) artifacts"); returns that directory. `options` as for `export` (`output_names`
    excepted: each stage names its own).

    >>> export_staged(EarlyExitCNN(build_cnn("lenet")).eval(), (images,), "tflite", "artifacts/")
    PosixPath('artifacts/model.tflite.stages')
    """
    from exporters.staged import export_staged as run_staged

    return run_staged(model, example_inputs, target, Path(out_dir), **options)
