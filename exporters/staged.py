"""Exporting an early-exit model as a *staged artifact*: one ordinary artifact per stage plus a
manifest, so that a device that is confident at an early exit never runs the later stages.

The model follows the staged protocol (duck-typed; `mntool.vision.exits.EarlyExitCNN` is one):
`n_exits`, `adaptive_names()`, `stages()` (one module per stage, stage k > 0 reading stage k-1's
`features`), `stage_adaptive(k)` (the adaptive tensors stage k holds, by the whole model's
parameter names), `stage_outputs(k)`, `stage_example(k, example)` (stage k's input for example
inputs) and `exit_names(k)` (exit k's linear weight and bias names). Each stage goes through the
ordinary export (`exporters.pipeline.run_export`: its own weight map and export-time proof); the
manifest (`device_runtime.staged.StagedManifest`, docs/weight-map.md) ties them together.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from device_runtime import staged as staged_format
from device_runtime import weight_map as weight_maps
from device_runtime.errors import MntoolError
from exporters import targets
from exporters.errors import ExportError
from exporters.options import ExportOptions

PROTOCOL = ("n_exits", "adaptive_names", "stages", "stage_adaptive", "stage_outputs", "stage_example", "exit_names")


def export_staged(model, example_inputs, target: str, out_dir: Path, **options) -> Path:
    """Export every stage of `model` for `target` into `out_dir/<name>.<target>.stages/` with its manifest;
    returns that directory. `example_inputs` are the whole model's (a 1-tuple, or the tensor).
    `options` are `ExportOptions` fields (`name` names the directory; each stage is `stage<k>`,
    its outputs named by `stage_outputs(k)`). Built in a staging directory and moved into place
    at the end: a failed export leaves `out_dir` as it was, an earlier staged artifact included."""
    from exporters.pipeline import run_export, staging

    opts = ExportOptions.from_kwargs(options)
    if opts.output_names is not None:
        raise ExportError("a staged export names each stage's outputs itself (stage_outputs); drop output_names")
    missing = [a for a in PROTOCOL if not hasattr(model, a)]
    if missing:
        raise ExportError(f"{type(model).__name__} is not a staged (early-exit) model: it lacks {', '.join(missing)}")
    targets.get(target)  # an unknown target fails before any work
    example = _example(example_inputs)
    stages = list(model.stages())
    if len(stages) != model.n_exits or not stages:
        raise ExportError(f"the model has {model.n_exits} exits but {len(stages)} stages; it needs one stage per exit")
    adaptive = [list(model.stage_adaptive(k)) for k in range(len(stages))]
    _check_partition(adaptive, list(model.adaptive_names()))
    exits, n_classes = _exits(model, adaptive)
    out_dir = Path(out_dir)
    with staging(out_dir) as stage_dir:
        inner = stage_dir / f"{opts.name}.{target}{staged_format.SUFFIX}"  # one directory per target
        inner.mkdir()
        entries = []
        for k, stage in enumerate(stages):
            stage_options = dataclasses.replace(opts, name=f"stage{k}", output_names=tuple(model.stage_outputs(k)))
            try:
                artifact = run_export(
                    stage, (model.stage_example(k, example),), adaptive[k], target, inner, stage_options
                )
            except MntoolError as err:
                raise type(err)(f"stage {k}: {err}") from None
            wm = weight_maps.load(artifact, check_fingerprint=False)
            free = [s.name for s in wm.inputs if s.name not in wm.adaptive_names]
            if len(free) != 1:
                raise ExportError(f"stage {k} takes {len(free)} inputs {free}; a stage takes exactly one")
            entries.append(
                staged_format.StageEntry(
                    artifact=artifact.name,
                    fingerprint=wm.fingerprint,
                    input=free[0],
                    outputs=tuple(o.name for o in wm.outputs),
                    adaptive=tuple(adaptive[k]),
                )
            )
        extra = {"model": getattr(model, "model_name", type(model).__name__), "mode": wm.mode}
        manifest = staged_format.StagedManifest(target, tuple(entries), exits, n_classes, extra)
        (inner / staged_format.MANIFEST).write_text(manifest.to_json())
        try:
            staged_format.load_staged(inner)  # what the device will check, before anything is published
        except staged_format.StagedError as err:
            raise ExportError(f"the staged artifact does not validate: {err}") from None
        _publish(inner, out_dir)
    return out_dir / inner.name


def _example(example_inputs):
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) != 1:
            raise ExportError(f"a staged model takes one input (the images), got {len(example_inputs)} example inputs")
        return example_inputs[0]
    return example_inputs


def _check_partition(adaptive: list[list[str]], whole: list[str]) -> None:
    """Every adaptive tensor of the model belongs to exactly one stage."""
    owner: dict[str, int] = {}
    for k, names in enumerate(adaptive):
        for name in names:
            if name in owner:
                raise ExportError(
                    f"adaptive tensor {name!r} is held by stages {owner[name]} and {k}; each must belong to one stage"
                )
            owner[name] = k
    extra = [n for n in owner if n not in set(whole)]
    if extra:
        raise ExportError(f"stage {owner[extra[0]]} lists {extra[0]!r}, which is not an adaptive tensor of the model")
    orphans = [n for n in whole if n not in owner]
    if orphans:
        raise ExportError(f"adaptive tensors {orphans} belong to no stage; every one must belong to exactly one")


def _exits(model, adaptive: list[list[str]]) -> tuple[tuple[staged_format.ExitEntry, ...], int]:
    params = dict(model.named_parameters())
    exits, classes = [], set()
    for k in range(len(adaptive)):
        weight, bias = model.exit_names(k)
        for name in (weight, bias):
            if name not in adaptive[k]:
                raise ExportError(f"exit {k}'s {name!r} is not an adaptive tensor of stage {k}")
        classes.add(int(params[weight].shape[0]))
        exits.append(staged_format.ExitEntry(k, weight, bias))
    if len(classes) != 1:
        raise ExportError(f"the exits disagree on the number of classes: {sorted(classes)}")
    return tuple(exits), classes.pop()


def _publish(src: Path, out_dir: Path) -> None:
    """Move the finished .stages directory into `out_dir`, replacing an earlier one by renames
    (as `exporters.pipeline.publish` moves a directory artifact)."""
    dst = out_dir / src.name
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise ExportError(f"{dst} exists and is not a directory; remove it or choose another --name")
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=".mntool-old-", dir=out_dir))
        dst.rename(old / src.name)
        src.rename(dst)
        shutil.rmtree(old)
    else:
        src.rename(dst)
