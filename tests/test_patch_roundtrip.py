"""Patches on real artifacts: the default SASRec (MovieLens-100k item count) exported to every
target, patched with random parameters (file in place, copy, in memory), then run on the
runtime against PyTorch with the same parameters, on real MovieLens-100k histories.

TFLite (ai_edge_litert) and ONNX Runtime outputs must match PyTorch within 1e-5. Core ML cannot
predict on Linux, so there coremltools' own blob reader must return the patched values exactly.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from small_artifacts import copy_artifact
from test_patch_format import raw_public

from device_runtime import weight_map as wmap
from device_runtime.install import apply_patch_file
from device_runtime.patch import TrustPolicy, apply_patch_bytes
from device_runtime.runners import open_runner
from mntool.patches import build_patch

pytestmark = pytest.mark.slow
ATOL = 1e-5
KEY = Ed25519PrivateKey.generate()
VARIANTS = {  # name -> export options
    "tflite": {"target": "tflite"},
    "tflite-inputs": {"target": "tflite", "adaptive_as_inputs": True},
    "onnx": {"target": "onnx"},
    "onnx-inputs": {"target": "onnx", "adaptive_as_inputs": True},
    "coreml": {"target": "coreml"},
    "coreml-fp16": {"target": "coreml", "precision": "float16"},
}


@pytest.fixture(scope="module")
def sasrec(ml100k_interactions):
    from mntool.models import build_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    return build_model("sasrec", ml100k_interactions.n_items).eval()


@pytest.fixture(scope="module")
def histories(ml100k_interactions, sasrec):
    """(history (1, L), target (1,)) for 5 real users: their first L+1 clicks in time order."""
    data, L = ml100k_interactions, sasrec.config.max_history
    rows = []
    for user in range(data.n_users):
        mine = data.user == user
        clicks = data.item[mine][np.argsort(data.timestamp[mine], kind="stable")]
        if len(clicks) > L:
            rows.append((torch.as_tensor(clicks[None, :L]), torch.as_tensor(clicks[L : L + 1])))
        if len(rows) == 5:
            return rows
    raise AssertionError("MovieLens-100k has fewer than 5 users with enough clicks")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sasrec, histories):
    from exporters import export

    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            options = dict(VARIANTS[variant])
            target = options.pop("target")
            out = tmp_path_factory.mktemp(variant)
            cache[variant] = export(sasrec, histories[0], sasrec.adaptive_names(), target, out, **options)
        return cache[variant]

    return get


def torch_outputs(model, params, histories) -> np.ndarray:
    ref = copy.deepcopy(model)
    ref.load_state_dict({**ref.state_dict(), **{n: torch.as_tensor(v) for n, v in params.items()}})
    with torch.no_grad():
        return np.array([ref(h, t).numpy() for h, t in histories])


def runtime_outputs(artifact: Path, histories, files=None) -> np.ndarray:
    wm = wmap.load(artifact, check_fingerprint=files is None)
    with open_runner(artifact, weight_map=wm, files=files) as runner:
        return np.array([runner.run({"history": h.numpy(), "target": t.numpy()})["output"] for h, t in histories])


def random_params(model, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        n: rng.normal(0, 0.3, tuple(p.shape)).astype(np.float32)
        for n, p in model.named_parameters()
        if n in model.adaptive_names()
    }


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.startswith("coreml")])
def test_patched_artifact_computes_what_pytorch_computes(variant, exported, sasrec, histories, tmp_path):
    artifact = copy_artifact(exported(variant), tmp_path / "in-place")
    before = runtime_outputs(artifact, histories)
    for seed in (1, 2):  # the second patch lands on an already patched artifact
        params = random_params(sasrec, seed)
        expected = torch_outputs(sasrec, params, histories)
        patch = build_patch(artifact, params, KEY)
        apply_patch_file(artifact, patch, policy=TrustPolicy(verify_key=raw_public(KEY)))
        np.testing.assert_allclose(runtime_outputs(artifact, histories), expected, rtol=0, atol=ATOL)

        out = tmp_path / f"copy{seed}" / f"patched{artifact.suffix}"
        apply_patch_file(exported(variant), patch, out=out)
        np.testing.assert_allclose(runtime_outputs(out, histories), expected, rtol=0, atol=ATOL)

        wm = wmap.load(exported(variant))
        files = apply_patch_bytes(wmap.read_artifact_files(exported(variant), wm.files), patch, wm)
        np.testing.assert_allclose(runtime_outputs(exported(variant), histories, files), expected, rtol=0, atol=ATOL)
    assert np.abs(before - expected).max() > 1e-3, "the patch did not change the outputs"


@pytest.mark.parametrize("variant", ["coreml", "coreml-fp16"])
def test_coreml_blob_reader_returns_patched_values(variant, exported, sasrec, tmp_path):
    if sys.platform == "darwin":
        pytest.skip("on macOS, Core ML prediction should be compared instead (not written: no Mac in CI)")
    from coremltools import libmilstoragepython

    artifact = copy_artifact(exported(variant), tmp_path / "in-place")
    params = random_params(sasrec, 3)
    apply_patch_file(artifact, build_patch(artifact, params))
    wm = wmap.load(artifact)
    for t in wm.tensors:
        reader = libmilstoragepython._BlobStorageReader(str(artifact / t.file))
        meta = t.offset - 64  # a const's blob offset points at its 64-byte blob_metadata
        raw = reader.read_float_data(meta) if t.dtype == "float32" else reader.read_fp16_data(meta).view(np.float16)
        stored = np.asarray(raw).reshape(t.stored_shape)
        value = params[t.name].astype(t.dtype)
        np.testing.assert_array_equal(stored.T if t.layout == "transpose" else stored, value)
