"""The export-time proof: patch fresh values into a copy of the artifact through its weight map
alone, and show it computes what PyTorch computes with those values.

Values go the production way (`mntool.patches.build_patch`, then the device's
`apply_patch_bytes`) into an in-memory copy. Where the target's runtime exists on this OS the
copy is run (`device_runtime.runners`) and compared with `torch.func.functional_call`; Core ML
off macOS cannot run, so its copy is read back with coremltools' own blob reader instead.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from device_runtime import weight_map as weight_maps
from device_runtime.weight_map import WeightMap, read_tensor
from exporters import prepare
from exporters.errors import ProofMismatch
from exporters.quiet import quiet


def patched_files(artifact: Path, wm: WeightMap, values: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The artifact's files (name -> bytes) with `values` written in as a patch, nothing on disk changed."""
    from device_runtime.patch import apply_patch_bytes
    from mntool.patches import build_patch

    files = {name: bytearray(data) for name, data in weight_maps.read_artifact_files(artifact, wm.files).items()}
    return {name: bytes(data) for name, data in apply_patch_bytes(files, build_patch(wm, values), wm).items()}


def stored_values(wm: WeightMap, files: dict[str, bytes]) -> dict[str, np.ndarray]:
    """Each adaptive tensor read back from the files through the weight map, in PyTorch order."""
    return {t.name: read_tensor(t, files[t.file]).astype(np.float32) for t in wm.tensors}


def fresh_values(base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Random values on the scale of the static ones, so outputs stay in a realistic range."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for name, value in base.items():
        scale = float(np.sqrt(np.mean(value.astype(np.float64) ** 2))) or 0.05
        out[name] = rng.normal(0.0, scale, value.shape).astype(np.float32)
    return out


def can_run(target: str) -> bool:
    return target != "coreml" or sys.platform == "darwin"


def prove(job) -> dict:
    """Run the proof for a sealed job; returns the figures recorded as `extra["proof"]`."""
    wm = job.weight_map
    values = fresh_values(job.base, job.options.seed)
    atol = job.options.atol
    if can_run(job.target):
        base_error = _run_error(job, weight_maps.read_artifact_files(job.artifact, wm.files), job.base)
        if base_error > atol:
            raise ProofMismatch(
                f"{job.target} artifact with its static values differs from PyTorch by {base_error:.3g} (> {atol:g}): "
                "the converter changed what the model computes"
            )
        error = _run_error(job, patched_files(job.artifact, wm, values), values)
        if error > atol:
            culprits = [n for n in job.adaptive if _one_changed_error(job, values, n) > atol]
            raise ProofMismatch(
                f"{job.target} artifact patched with fresh values differs from PyTorch by {error:.3g} (> {atol:g}); "
                f"patching {', '.join(culprits) or 'the tensors together'} does not reach the compiled model"
            )
        return {"method": "run", "runtime": _runtime(job.target), "max_abs_error": error,
                "base_max_abs_error": base_error, "atol": atol}
    from exporters.coreml import read_back

    errors = {}
    for label, vals in (("base", job.base), ("patched", values)):
        read = read_back(wm, patched_files(job.artifact, wm, vals), job.stage)
        for name, value in vals.items():
            expected = value.astype(wm.tensor(name).dtype).astype(np.float32)
            if read[name].shape != value.shape or not np.array_equal(read[name], expected):
                raise ProofMismatch(f"coreml: {name} read back through coremltools is not what the {label} patch wrote")
        errors[label] = max(float(np.max(np.abs(read[n] - v), initial=0.0)) for n, v in vals.items())
    return {"method": "read-back", "runtime": "coremltools blob reader (no Core ML runtime on this OS)",
            "max_abs_error": errors["patched"], "base_max_abs_error": errors["base"], "atol": atol}


def _runtime(target: str) -> str:
    from device_runtime.runners import RUNTIME_OF_TARGET

    return RUNTIME_OF_TARGET[target]


def _one_changed_error(job, values: dict[str, np.ndarray], name: str) -> float:
    """The proof's error with only `name` changed from its static value (to name the culprit)."""
    one = {**job.base, name: values[name]}
    return _run_error(job, patched_files(job.artifact, job.weight_map, one), one)


def _run_error(job, files: dict[str, bytes], values: dict[str, np.ndarray]) -> float:
    """Max abs difference between the artifact held in `files` and PyTorch run with `values`."""
    from device_runtime.runners import open_runner

    wm = job.weight_map
    feeds = {name: x.numpy() for name, x in zip(job.input_names, job.example_inputs)}  # adaptive inputs: bound from `files`
    with quiet(), open_runner(job.artifact, weight_map=wm, files=files) as runner:  # LiteRT logs its delegate
        got = runner.run(feeds)
    want = prepare.run_model(job.model, job.example_inputs, values)
    error = 0.0
    for spec, expected in zip(wm.outputs, want):
        actual = np.asarray(got[spec.name], dtype=np.float64)
        if actual.shape != tuple(expected.shape):
            raise ProofMismatch(f"output {spec.name!r}: the artifact returns shape {actual.shape}, PyTorch {tuple(expected.shape)}")
        error = max(error, float(np.max(np.abs(actual - expected.double().numpy()), initial=0.0)))
    return error
