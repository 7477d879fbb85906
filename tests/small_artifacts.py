"""Small real artifacts for the device-side tests: a tiny SASRec exported once per session through
`exporters.export` (TFLite and ONNX; adaptive tensors as buffers or as inputs), and patches of
random parameters for them. The session fixtures built on these live in conftest.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from device_runtime import weight_map as weight_maps

N_ITEMS, HISTORY = 40, 6
EXPORT_DIR = "device-runtime-artifacts"


def small_sasrec():
    from mntool.models import BackboneConfig, build_model

    torch.manual_seed(0)
    model = build_model("sasrec", N_ITEMS, BackboneConfig(dim=16, max_history=HISTORY, head_hidden=16)).eval()
    example = (torch.randint(1, N_ITEMS + 1, (1, HISTORY)), torch.randint(1, N_ITEMS + 1, (1,)))
    return model, example


def exported(tmp_path_factory, target: str, mode: str) -> Path:
    """Export once per session (fixtures imported by several test modules share the files)."""
    from exporters import export

    out = tmp_path_factory.getbasetemp() / EXPORT_DIR / mode
    artifact = out / f"model.{'tflite' if target == 'tflite' else 'onnx'}"
    if not weight_maps.sidecar_path(artifact).is_file():
        model, example = small_sasrec()
        export(model, example, model.adaptive_names(), target, out, adaptive_as_inputs=mode == "inputs")
    return artifact


def fresh_params(artifact: Path, seed: int = 1) -> dict[str, np.ndarray]:
    wm = weight_maps.load(artifact)
    rng = np.random.default_rng(seed)
    return {t.name: rng.normal(0.0, 0.3, t.shape).astype(np.float32) for t in wm.tensors}


def patch_for(artifact: Path) -> Path:
    from mntool.patches import build_patch

    path = artifact.with_name(artifact.name + ".fresh.mnpatch")
    if not path.is_file():
        path.write_bytes(build_patch(artifact, fresh_params(artifact)))
    return path


def copy_artifact(artifact: Path, dest: Path) -> Path:
    """The artifact, its files and its sidecar copied under `dest` (same names): a private copy a
    test may patch in place."""
    dest.mkdir(parents=True)
    wm = weight_maps.load(artifact)
    root = weight_maps.artifact_root(artifact)
    new_root = dest / artifact.name if artifact.is_dir() else dest
    for f in wm.files:
        (new_root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, new_root / f)
    shutil.copy2(weight_maps.sidecar_path(artifact), weight_maps.sidecar_path(dest / artifact.name))
    return dest / artifact.name
