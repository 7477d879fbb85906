"""The toolchain on images: both CNNs (LeNet, MobileNet-style) exported to TFLite, ONNX and Core ML
with their adaptive tensors (every BatchNorm affine inside the feature extractor, and the head) as
swappable buffers, patched through the production path with parameters the cloud generated from
each device's unlabelled upload (MetaNetwork; BN adaptation), then run on real protocol images.

LiteRT and ONNX Runtime logits must match PyTorch's per-sample logits (the same backbone with the
same per-device parameters) within 1e-5; Core ML cannot predict on Linux, so there the patched
weights must read back exactly. `mntool bench` must run on the image artifacts (float32 input).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from small_artifacts import copy_artifact
from test_patch_cli import mntool
from test_patch_format import raw_public, tree_hashes

from device_runtime import weight_map as wmap
from device_runtime.install import apply_patch_file
from device_runtime.layout import stored_tensors
from device_runtime.patch import Freshness, PatchError, TrustPolicy, apply_patch_bytes, pack_patch
from device_runtime.runners import open_runner
from mntool.patches import ParamsError, build_patch, signer_for

pytestmark = pytest.mark.slow
ATOL = 1e-5
BATCH = 16  # images per compiled-model call (the artifacts have a fixed batch)
CNNS = ("lenet", "mobilenet")
RUNNABLE = ("tflite", "onnx")
KEY = Ed25519PrivateKey.generate()
POLICY = TrustPolicy(verify_key=raw_public(KEY))
SUFFIX = {"tflite": ".tflite", "onnx": ".onnx", "coreml": ".mlpackage"}


@pytest.fixture(scope="module")
def image_data(mnist_data):
    """img-v1 shrunk to 4 devices (32 test images each, uploads of 16): fast to train on."""
    from mntool.data.images import ImageProtocolConfig, build_image_dataset

    config = ImageProtocolConfig(
        n_devices=4, cloud_per_device=128, valid_per_device=32, test_per_device=32, upload_len=16, request_every=16
    )
    return build_image_dataset(mnist_data, config)


@pytest.fixture(scope="module")
def checkpoints(image_data, tmp_path_factory):
    """{cnn: MetaNetwork checkpoint}: a static CNN (2 short epochs: enough steps that its biases
    leave zero, which the export-time proof scales its probes by), then a generator on it without
    the stabilizer (so that one epoch already moves the generated tensors off the static ones)."""
    from mntool.meta import MetaConfig
    from mntool.train import load_checkpoint
    from mntool.vision.train import VisionTrainConfig, train

    root = tmp_path_factory.mktemp("vision-ckpt")
    quiet = dict(progress=False, log=lambda s: None)
    out = {}
    for cnn in CNNS:
        train(
            image_data,
            VisionTrainConfig(model=cnn, method="static", epochs=2, batch_size=32),
            root / f"{cnn}-static",
            **quiet,
        )
        mn = VisionTrainConfig(model=cnn, method="metanetwork", epochs=1, meta=MetaConfig(gate=False, ema=False))
        train(image_data, mn, root / f"{cnn}-mn", init=root / f"{cnn}-static", **quiet)
        out[cnn] = load_checkpoint(root / f"{cnn}-mn")
    return out


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """exported(cnn, target, adaptive_as_inputs=False) -> the artifact (each exported once)."""
    from exporters import export

    cache: dict[tuple, Path] = {}

    def get(cnn: str, target: str, adaptive_as_inputs: bool = False) -> Path:
        key = (cnn, target, adaptive_as_inputs)
        if key not in cache:
            ck = checkpoints[cnn]
            out = tmp_path_factory.mktemp(f"{cnn}-{target}{'-inputs' if adaptive_as_inputs else ''}")
            cache[key] = export(
                ck.model,
                ck.example_inputs(BATCH),
                ck.adaptive,
                target,
                out,
                output_names=("logits",),
                adaptive_as_inputs=adaptive_as_inputs,
                progress=False,
            )
        return cache[key]

    return get


@pytest.fixture(scope="module")
def generated(checkpoints, image_data):
    """generated(cnn, method) -> {name: (devices, *shape) float32} from each device's unlabelled
    test-period upload, through `mntool.generate.Generator` (what `mntool generate` and `mntool
    serve` call): the MetaNetwork's, and BN adaptation on the same deployed backbone."""
    from mntool.generate import Generator

    _, uploads = image_data.device_upload("test")
    cache: dict[tuple, dict] = {}

    def get(cnn: str, method: str) -> dict[str, np.ndarray]:
        if (cnn, method) not in cache:
            ck = checkpoints[cnn]
            if method != "metanetwork":
                ck = dataclasses.replace(ck, config=dataclasses.replace(ck.config, method=method), meta=None)
            cache[cnn, method] = Generator(ck).generate_batch(uploads)
        return cache[cnn, method]

    return get


def compiled_logits(runner, images: np.ndarray) -> np.ndarray:
    """Logits (N, 10) of uint8 images (N, 28, 28), N a multiple of BATCH, from a compiled model."""
    from mntool.vision.adapt import images_tensor

    assert len(images) % BATCH == 0, f"{len(images)} images do not fill batches of {BATCH}"
    x = images_tensor(images).numpy()
    return np.concatenate([runner.run({"images": x[i : i + BATCH]})["logits"] for i in range(0, len(x), BATCH)])


def pytorch_logits(ck, images: np.ndarray, device: np.ndarray, params: dict | None) -> np.ndarray:
    """PyTorch's per-sample logits: row i with parameter set `device[i]` (or the static tensors)."""
    from mntool.vision.train import score_images

    torch.set_num_threads(2)
    return score_images(ck.model, images, device, None if params is None else _tensors(params))


def _tensors(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in params.items()}


def of_device(params: dict[str, np.ndarray], d: int) -> dict[str, np.ndarray]:
    """Device d's tensors, in PyTorch shapes (what a patch carries)."""
    return {n: a[d] for n, a in params.items()}


def of_device_batch(params: dict[str, np.ndarray], d: int) -> dict[str, np.ndarray]:
    """Device d's tensors as a set of one (what PyTorch's per-sample call indexes)."""
    return {n: a[d : d + 1] for n, a in params.items()}


def test_every_affine_is_a_located_buffer(checkpoints, exported):
    """The converters fold BatchNorm and scale ops into convolutions; each adaptive tensor must
    still be one patchable range of the artifact (the export-time proof passed to get here)."""
    for cnn, ck in checkpoints.items():
        inside = [n for n in ck.adaptive if ".affine." in n]
        assert len(inside) >= 4, f"{cnn}: adaptive tensors inside the feature extractor: {inside}"
        for target in (*RUNNABLE, "coreml"):
            wm = wmap.load(exported(cnn, target))
            assert wm.mode == "buffers" and wm.adaptive_names == ck.adaptive, (cnn, target)


@pytest.mark.parametrize("method", ["metanetwork", "bn-adapt"])
@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.parametrize("cnn", CNNS)
def test_patched_cnn_computes_what_pytorch_computes(
    cnn, target, method, checkpoints, exported, generated, image_data, tmp_path
):
    """Each device's generated parameters, signed, verified and applied in place (the second device's
    patch lands on the first one's), then that device's test images through the runtime."""
    ck, test = checkpoints[cnn], image_data.test
    params = generated(cnn, method)
    artifact = copy_artifact(exported(cnn, target), tmp_path / "in-place")
    with open_runner(artifact, weight_map=wmap.load(artifact)) as runner:
        unpatched = compiled_logits(runner, test.images)
    np.testing.assert_allclose(
        unpatched, pytorch_logits(ck, test.images, test.device, None), rtol=0, atol=ATOL, err_msg="unpatched"
    )
    got = np.empty_like(unpatched)
    for d in range(image_data.n_devices):
        apply_patch_file(artifact, build_patch(artifact, of_device(params, d), KEY), policy=POLICY)
        rows = np.flatnonzero(test.device == d)
        with open_runner(artifact, weight_map=wmap.load(artifact)) as runner:
            got[rows] = compiled_logits(runner, test.images[rows])
    expected = pytorch_logits(ck, test.images, test.device, params)
    error = float(np.abs(got.astype(np.float64) - expected).max())
    assert error <= ATOL, f"{cnn} {target} {method}: max abs logit error {error:.2e}"
    assert np.abs(expected - unpatched).max() > 100 * ATOL, "the generated parameters did not change the logits"


@pytest.mark.parametrize("cnn", CNNS)
def test_in_memory_patch_of_a_copy_matches_pytorch(cnn, checkpoints, exported, generated, image_data):
    """What the demo and `mntool bench` do: the patch verified and written into the artifact's files
    held in memory, a runner opened on them (ONNX Runtime with its external adaptive file)."""
    ck, test = checkpoints[cnn], image_data.test
    params = generated(cnn, "metanetwork")
    artifact = exported(cnn, "onnx")
    wm = wmap.load(artifact)
    rows = np.flatnonzero(test.device == 1)
    files = apply_patch_bytes(
        wmap.read_artifact_files(artifact, wm.files),
        build_patch(wm, of_device(params, 1), KEY),
        wm,
        policy=POLICY,
        check_artifact=False,
    )
    with open_runner(artifact, weight_map=wm, files=files) as runner:
        got = compiled_logits(runner, test.images[rows])
    expected = pytorch_logits(ck, test.images[rows], np.zeros(len(rows), np.int64), of_device_batch(params, 1))
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("cnn", CNNS)
def test_coreml_patched_weights_read_back_exactly(cnn, checkpoints, exported, generated, tmp_path):
    """Core ML off macOS: after each device's patch, coremltools' own reader (the package loaded,
    every adaptive const followed to its blob) returns exactly the generated values."""
    from exporters.coreml import read_back

    artifact = copy_artifact(exported(cnn, "coreml"), tmp_path / "in-place")
    for method in ("metanetwork", "bn-adapt"):
        params = generated(cnn, method)
        for d in (0, 3):
            apply_patch_file(artifact, build_patch(artifact, of_device(params, d), KEY), policy=POLICY)
            wm = wmap.load(artifact)
            read = read_back(wm, wmap.read_artifact_files(artifact, wm.files), tmp_path)
            assert sorted(read) == sorted(checkpoints[cnn].adaptive)
            for name, value in of_device(params, d).items():
                np.testing.assert_array_equal(read[name], value, err_msg=f"{cnn} {method} device {d} {name}")


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS (patched weights: read-back test)")
def test_coreml_patched_prediction_matches_pytorch(checkpoints, exported, generated, image_data, tmp_path):
    ck, test = checkpoints["lenet"], image_data.test
    params = generated("lenet", "metanetwork")
    artifact = copy_artifact(exported("lenet", "coreml"), tmp_path / "in-place")
    apply_patch_file(artifact, build_patch(artifact, of_device(params, 0), KEY), policy=POLICY)
    rows = np.flatnonzero(test.device == 0)
    with open_runner(artifact, weight_map=wmap.load(artifact)) as runner:
        got = compiled_logits(runner, test.images[rows])
    expected = pytorch_logits(ck, test.images[rows], np.zeros(len(rows), np.int64), of_device_batch(params, 0))
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_adaptive_as_inputs_export_patches_with_parity(checkpoints, exported, generated, image_data, tmp_path):
    """`--adaptive-as-inputs`: the adaptive tensors are model inputs fed from the artifact's flat
    file, which the patch writes; the runner binds them, so callers still pass images only."""
    ck, test = checkpoints["mobilenet"], image_data.test
    params = generated("mobilenet", "metanetwork")
    artifact = copy_artifact(exported("mobilenet", "tflite", adaptive_as_inputs=True), tmp_path / "in-place")
    assert wmap.load(artifact).mode == "inputs"
    got = np.empty((len(test), 10), np.float32)
    for d in range(image_data.n_devices):
        apply_patch_file(artifact, build_patch(artifact, of_device(params, d), KEY), policy=POLICY)
        rows = np.flatnonzero(test.device == d)
        with open_runner(artifact, weight_map=wmap.load(artifact)) as runner:
            assert [s.name for s in runner.free_inputs] == ["images"]
            got[rows] = compiled_logits(runner, test.images[rows])
    expected = pytorch_logits(ck, test.images, test.device, params)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("target", RUNNABLE)
def test_nan_in_a_batchnorm_affine_is_refused_and_the_artifact_untouched(target, exported, generated, tmp_path):
    """The cloud refuses to build it; a patch packed (and signed) without the cloud's checks is
    refused by the device, and every byte of the artifact (and its slots and state) stays."""
    artifact = copy_artifact(exported("mobilenet", target), tmp_path / "art")
    params = of_device(generated("mobilenet", "metanetwork"), 2)
    name = "blocks.3.affine.weight"  # a depthwise block's per-channel scale, inside the feature extractor
    bad = {**params, name: params[name].copy()}
    bad[name][5] = np.nan
    with pytest.raises(ParamsError, match="NaN or Inf"):
        build_patch(artifact, bad, KEY)
    wm = wmap.load(artifact)
    stored = stored_tensors(wm, params)
    stored[name] = stored[name].copy()
    stored[name].reshape(-1)[5] = np.nan
    patch = pack_patch(wm, stored, Freshness(sequence=1, issued_at=1, expires_at=2**40), signer_for(KEY))
    before = tree_hashes(tmp_path / "art")
    with pytest.raises(PatchError, match="NaN or Inf"):
        apply_patch_file(artifact, patch, policy=POLICY)
    assert tree_hashes(tmp_path / "art") == before
    out = tmp_path / "copy" / artifact.name
    with pytest.raises(PatchError, match="NaN or Inf"):
        apply_patch_file(artifact, patch, out=out, policy=POLICY)
    assert not out.exists() and tree_hashes(tmp_path / "art") == before


def test_bench_on_cnn_artifacts(exported, generated, tmp_path):
    """`mntool bench` on both runtimes: generated float32 images in [0, 1), load, latency, and the
    swap to a device's patch (whose outputs must differ from the unpatched model's)."""
    from device_runtime.bench import BenchConfig, benchmark

    quick = BenchConfig(runs=20, warmup=2, loads=2, rounds=2)
    for target in RUNNABLE:
        artifact = exported("lenet", target)
        patch = tmp_path / f"{target}.mnpatch"
        patch.write_bytes(build_patch(artifact, of_device(generated("lenet", "metanetwork"), 0)))
        report = benchmark(artifact, [patch], config=quick)
        assert report.inputs == [
            {"name": "images", "dtype": "float32", "shape": [BATCH, 1, 28, 28], "source": "generated (uniform [0, 1))"}
        ]
        assert report.latency.runs == 20 and report.latency.p50_ms > 0 and report.load_memory_ms > 0
        (p,) = report.patches
        assert p.outputs_changed and p.swap_ms > 0 and p.p50_ratio > 0

    artifact = exported("mobilenet", "onnx")
    patch = tmp_path / "mobilenet.mnpatch"
    patch.write_bytes(build_patch(artifact, of_device(generated("mobilenet", "bn-adapt"), 1)))
    result = mntool("bench", artifact, "--patch", patch, "--runs", 10, "--warmup", 1, "--loads", 1, "--json")
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)
    assert report["inputs"][0]["dtype"] == "float32" and report["patches"][0]["outputs_changed"]


@pytest.mark.parametrize("cnn", ["lenet", "mobilenet"])
def test_executorch_patched_cnn_computes_what_pytorch_computes(
    cnn, checkpoints, exported, generated, image_data, tmp_path
):
    """ExecuTorch (.pte + .ptd): the BatchNorm affines leave the program into the .ptd (a view of
    one stays a copy, exporters/executorch.py), and a device's patch there gives PyTorch's logits."""
    from exporters.executorch import available

    if not available():
        pytest.skip("executorch is not installed (pip install 'mntool[peers]')")
    ck, test = checkpoints[cnn], image_data.test
    params = generated(cnn, "metanetwork")
    artifact = copy_artifact(exported(cnn, "executorch"), tmp_path / "in-place")
    assert all(t.file.endswith(".ptd") for t in wmap.load(artifact).tensors)
    d = 1
    apply_patch_file(artifact, build_patch(artifact, of_device(params, d), KEY), policy=POLICY)
    rows = np.flatnonzero(test.device == d)
    with open_runner(artifact, weight_map=wmap.load(artifact)) as runner:
        got = compiled_logits(runner, test.images[rows])
    expected = pytorch_logits(ck, test.images[rows], np.zeros(len(rows), np.int64), of_device_batch(params, d))
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("form", ["json", "npz"])
def test_mntool_generate_builds_a_patch_from_an_image_upload(form, checkpoints, exported, image_data, tmp_path):
    """`mntool generate --samples` reads an image upload (JSON {"images": ...} or an .npz with key
    "images"); the patch carries exactly what the generator makes of it."""
    from device_runtime.patch import parse_patch
    from mntool.generate import Generator

    ck, artifact = checkpoints["lenet"], exported("lenet", "tflite")
    _, uploads = image_data.device_upload("test")
    samples = tmp_path / f"upload.{form}"
    if form == "json":
        samples.write_text(json.dumps({"images": uploads[2].tolist()}))
    else:
        np.savez(samples, images=uploads[2])
    res = mntool("generate", ck.path, artifact, "--samples", samples, "-o", tmp_path / "p.mnpatch")
    assert res.returncode == 0 and f"{len(uploads[2])} recent images" in res.stdout, res.stderr
    patch = parse_patch((tmp_path / "p.mnpatch").read_bytes())
    want = Generator(ck).generate(uploads[2])
    for t in patch.tensors:
        np.testing.assert_array_equal(patch.array(t).reshape(want[t.name].shape), want[t.name])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [[[0] * 28] * 27]}))
    res = mntool("generate", ck.path, artifact, "--samples", bad, "-o", tmp_path / "q.mnpatch")
    assert res.returncode == 1 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q.mnpatch").exists()
