"""The export-time proof: patch values into a copy of the artifact through its weight map alone,
and show that every adaptive tensor reaches the output and that the artifact computes what
PyTorch computes with those values.

Values go the production way (`device_runtime.layout.stored_tensors`, `pack_patch`, then the
device's `apply_patch_bytes`) into an in-memory copy, which is run with `device_runtime.runners`
and compared with `torch.func.functional_call`, on the example inputs and a few random input sets
like them. Checked, each within `atol + rtol * max|PyTorch output|` (float32 rounding grows with
the outputs' magnitude): the artifact with its static values; per adaptive tensor, the artifact
with only that tensor patched, whose output must also move by more than that tolerance (a
tensor whose bytes are misplaced, or which does not reach the output, cannot pass vacuously); and
every tensor patched at once. An artifact no runtime can run on this machine is read back instead,
with the reader its target declares (`Target.read_back`), and the figures say that this is a
read-back, not a proof. What a target is comes from its declaration (`job.target`):
nothing here names one.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from device_runtime import weight_map as weight_maps
from device_runtime.layout import stored_tensors
from device_runtime.patch import Freshness, apply_patch_bytes, pack_patch
from device_runtime.weight_map import WeightMap
from exporters import prepare
from exporters.errors import AdaptiveTensorNoEffect, ExportError, ProofMismatch
from exporters.job import ExportJob
from exporters.quiet import quiet

RANDOM_INPUT_SETS = 2  # random input sets the proof runs besides the example inputs
PATCH_LIFETIME_S = 3600  # the proof's patches are applied in memory at once; any expiry ahead will do

Outputs = list[list[np.ndarray]]  # per input set, per model output (float64)


def patched_files(artifact: Path, wm: WeightMap, values: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The artifact's files (name -> bytes) with `values` written in as a patch, nothing on disk changed."""
    files = {name: bytearray(data) for name, data in weight_maps.read_artifact_files(artifact, wm.files).items()}
    now = int(time.time())
    patch = pack_patch(
        wm, stored_tensors(wm, values), Freshness(sequence=1, issued_at=now, expires_at=now + PATCH_LIFETIME_S)
    )
    return {name: bytes(data) for name, data in apply_patch_bytes(files, patch, wm).items()}


def fresh_values(base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Random values on the scale of the static ones, so outputs stay in a realistic range; at
    least 0.05, so a tensor still near zero (a bias trained a few steps) is moved enough for its
    effect on the output to show."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for name, value in base.items():
        scale = max(float(np.sqrt(np.mean(value.astype(np.float64) ** 2))), 0.05)
        out[name] = rng.normal(0.0, scale, value.shape).astype(np.float32)
    return out


def input_sets(model, example_inputs: tuple, seed: int) -> list[tuple]:
    """The example inputs, then up to `RANDOM_INPUT_SETS` random sets shaped like them (integers
    between each input's min and max, floats with its mean and spread), so that a tensor the
    example alone barely reaches (an unindexed row, a closed ReLU) is still exercised. A random
    set PyTorch cannot run, or on which it gives non-finite outputs, is left out."""
    import torch

    rng = np.random.default_rng(seed + 2)
    sets = [tuple(example_inputs)]
    for _ in range(RANDOM_INPUT_SETS):
        drawn = []
        for x in example_inputs:
            a = x.detach().cpu().numpy()
            if a.size == 0:
                drawn.append(x)
            elif x.is_floating_point():
                spread = float(a.std()) or 1.0
                drawn.append(torch.from_numpy(rng.normal(float(a.mean()), spread, a.shape).astype(a.dtype)))
            else:
                drawn.append(torch.from_numpy(rng.integers(a.min(), a.max(), a.shape, endpoint=True).astype(a.dtype)))
        try:
            outputs = prepare.run_model(model, tuple(drawn))
        except ExportError:
            continue
        if all(bool(torch.isfinite(o).all()) for o in outputs if o.is_floating_point()):
            sets.append(tuple(drawn))
    return sets


def prove(job: ExportJob) -> dict:
    """Run the proof for a sealed job; returns the figures recorded as `extra["proof"]`."""
    atol = job.options.atol
    fresh = fresh_values(job.base, job.options.seed)
    sets = input_sets(job.model, job.example_inputs, job.options.seed)
    want_base = _torch_outputs(job, sets, job.base)
    if not all(np.isfinite(o).all() for o in want_base[0]):
        raise ExportError(
            f"{type(job.model).__name__}.forward() returns NaN or Inf on the example inputs: nothing can be proven"
        )
    want_one = {}
    for name in job.adaptive:
        want_one[name] = _torch_outputs(job, sets, {**job.base, name: fresh[name]})
        effect = _max_diff(want_one[name], want_base)
        if not effect > atol:
            raise AdaptiveTensorNoEffect(
                f"{name}: changing it changes the model's output by {effect:.3g} (<= {atol:g}) on the example inputs and "
                f"{len(sets) - 1} random input set(s): it does not reach the output, so no patch can personalise it"
            )
    if job.target.runs_here():
        return _prove_by_running(job, sets, fresh, want_base, want_one)
    if job.target.read_back is None:
        raise ExportError(
            f"{job.target.name} artifacts cannot be run on this machine and have no read-back: nothing can check "
            "the export here (export with verify=False, or on a machine with its runtime)"
        )
    return _read_back(job, fresh)


def _prove_by_running(
    job: ExportJob, sets: list[tuple], fresh: dict[str, np.ndarray], want_base: Outputs, want_one: dict[str, Outputs]
) -> dict:
    wm, target = job.weight_map, job.target.name
    scale = max(_max_abs(want_base), *(_max_abs(w) for w in want_one.values()))
    atol = job.options.atol + job.options.rtol * scale  # float32 rounding at the outputs' magnitude
    got_base = _compiled_outputs(job, weight_maps.read_artifact_files(job.artifact, wm.files), sets)
    for spec, actual, expected in zip(wm.outputs, got_base[0], want_base[0]):
        if actual.shape != expected.shape:
            raise ProofMismatch(
                f"output {spec.name!r}: the artifact returns shape {actual.shape}, PyTorch {expected.shape}"
            )
    base_error = _max_diff(got_base, want_base)
    got_one = {
        name: _compiled_outputs(job, patched_files(job.artifact, wm, {**job.base, name: fresh[name]}), sets)
        for name in job.adaptive
    }
    if not base_error <= atol:
        suspects = [
            n
            for n in job.adaptive
            if not _max_diff(_delta(got_one[n], got_base), _delta(want_one[n], want_base)) <= atol
        ]
        cause = (
            f"patching {', '.join(suspects)} alone moves its output differently from PyTorch's: the weight map "
            "misplaces one of them, or the converter changed the model"
            if suspects
            else "the converter changed what the model computes"
        )
        raise ProofMismatch(
            f"{target} artifact with its static values differs from PyTorch by {base_error:.3g} (> {atol:g}): {cause}"
        )
    error, effects = 0.0, {}
    for name in job.adaptive:
        one_error = _max_diff(got_one[name], want_one[name])
        if not one_error <= atol:
            raise ProofMismatch(
                f"{target} artifact with only {name} patched differs from PyTorch by {one_error:.3g} (> {atol:g}): "
                f"the weight map does not address the bytes the compiled model reads for {name}"
            )
        effects[name] = _max_diff(got_one[name], got_base)
        if not effects[name] > atol:
            raise ProofMismatch(
                f"{target}: patching {name} changes the compiled output by only {effects[name]:.3g} (<= {atol:g}), "
                f"PyTorch's by {_max_diff(want_one[name], want_base):.3g}: the patch does not reach the compiled model"
            )
        error = max(error, one_error)
    all_error = _max_diff(
        _compiled_outputs(job, patched_files(job.artifact, wm, fresh), sets), _torch_outputs(job, sets, fresh)
    )
    if not all_error <= atol:
        raise ProofMismatch(
            f"{target} artifact with every adaptive tensor patched differs from PyTorch by {all_error:.3g} (> {atol:g}) "
            "though each alone matches: the tensors' patches interfere"
        )
    return {
        "method": "run",
        "proven": True,
        "runtime": _runtime(job),
        "max_abs_error": max(error, all_error),
        "base_max_abs_error": base_error,
        "atol": job.options.atol,
        "rtol": job.options.rtol,
        "tolerance": atol,
        "input_sets": len(sets),
        "min_effect": min(effects.values()),
    }


def _read_back(job: ExportJob, fresh: dict[str, np.ndarray]) -> dict:
    """No runtime on this machine: the patched copy read back with the format's own reader,
    labelled as not a proof."""
    wm, how = job.weight_map, job.target.read_back
    errors = {}
    for label, vals in (("base", job.base), ("patched", fresh)):
        read = how.read(wm, patched_files(job.artifact, wm, vals), job.stage)
        for name, value in vals.items():
            expected = value.astype(wm.tensor(name).dtype).astype(np.float32)
            if read[name].shape != value.shape or not np.array_equal(read[name], expected):
                raise ProofMismatch(
                    f"{job.target.name}: {name} read back through {how.reader} is not what the {label} patch wrote"
                )
        errors[label] = max(float(np.max(np.abs(read[n] - v), initial=0.0)) for n, v in vals.items())
    return {
        "method": "read-back",
        "proven": False,
        "note": f"read-back, not a proof: nothing ran ({how.why}); {how.checked[wm.mode]}",
        "runtime": f"{how.reader} ({how.why})",
        "max_abs_error": errors["patched"],
        "base_max_abs_error": errors["base"],
        "atol": job.options.atol,
    }


def _runtime(job: ExportJob) -> str:
    """The runtime `device_runtime.runners.open_runner` runs the artifact with (as `_compiled_outputs` did)."""
    from device_runtime.runners import runtime_for

    return runtime_for(job.artifact, job.weight_map)


def _torch_outputs(job: ExportJob, sets: list[tuple], values: dict[str, np.ndarray]) -> Outputs:
    return [[o.double().numpy() for o in prepare.run_model(job.model, inputs, values)] for inputs in sets]


def _compiled_outputs(job: ExportJob, files: dict[str, bytes], sets: list[tuple]) -> Outputs:
    """The outputs of the artifact held in `files` on each input set (adaptive inputs: bound from `files`)."""
    from device_runtime.runners import open_runner

    wm = job.weight_map
    with quiet(), open_runner(job.artifact, weight_map=wm, files=files) as runner:  # LiteRT logs its delegate
        runs = [runner.run({name: x.numpy() for name, x in zip(job.input_names, inputs)}) for inputs in sets]
    return [[np.asarray(run[spec.name], dtype=np.float64) for spec in wm.outputs] for run in runs]


def _delta(a: Outputs, b: Outputs) -> Outputs:
    return [[x - y for x, y in zip(xs, ys)] for xs, ys in zip(a, b)]


def _max_abs(a: Outputs) -> float:
    """The largest |value| over every input set and output."""
    return max((float(np.max(np.abs(x), initial=0.0)) for xs in a for x in xs), default=0.0)


def _max_diff(a: Outputs, b: Outputs) -> float:
    """Max abs difference over every input set and output; NaN when any value is not finite."""
    diff = 0.0
    for xs, ys in zip(a, b):
        for x, y in zip(xs, ys):
            diff = float(np.maximum(diff, np.max(np.abs(x - y), initial=0.0)))
    return diff
