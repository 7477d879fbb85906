"""Shared fixtures: the real MovieLens-100k copy beside the checkout, and its built dataset."""
from __future__ import annotations

from pathlib import Path

import pytest
from small_artifacts import exported, patch_for

ML100K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The RecBole copy of MovieLens-100k at ../shared/data/ml-100k (see its SOURCE.md)."""
    if not (ML100K_DIR / "ml-100k.inter").is_file():
        pytest.skip(f"MovieLens-100k not found at {ML100K_DIR} (get it: mntool data fetch movielens-100k --dest {ML100K_DIR})")
    return ML100K_DIR


@pytest.fixture(scope="session")
def ml100k_interactions(ml100k_dir):
    from mntool.data import load_interactions

    return load_interactions(ml100k_dir)


@pytest.fixture(scope="session")
def ml100k_dataset(ml100k_interactions):
    """The time-shift protocol (default ProtocolConfig) on MovieLens-100k, built once per session."""
    from mntool.data import build_dataset

    return build_dataset(ml100k_interactions)


@pytest.fixture(scope="session")
def synthetic_dataset_with():
    """Small drifting synthetic interactions, built under the protocol windows given:
    f(history_len=, recent_len=) -> DeviceDataset."""
    from mntool.data import ProtocolConfig, SyntheticConfig, build_dataset, synthetic_interactions

    inter = synthetic_interactions(SyntheticConfig(n_users=60, n_items=200, per_user=40, drift=0.5, seed=3))
    return lambda **windows: build_dataset(inter, ProtocolConfig(**windows))


@pytest.fixture(scope="session")
def synthetic_dataset(synthetic_dataset_with):
    """The synthetic data under the default protocol windows: fast training tests."""
    return synthetic_dataset_with(history_len=30, recent_len=30)


@pytest.fixture(scope="session")
def tiny_checkpoints(synthetic_dataset, tmp_path_factory):
    """Static and MetaNetwork SASRec checkpoints trained briefly on the synthetic data."""
    from mntool.train import TrainConfig, train

    root = tmp_path_factory.mktemp("ckpt")
    quiet = dict(progress=False, log=lambda s: None)
    train(synthetic_dataset, TrainConfig(model="sasrec", method="static", epochs=3, batch_size=200, lr=5e-3, probe_every=20), root / "static", **quiet)
    # meta_lr 2e-2: the generator must validate better than its static start (else the start is kept; test_train.py)
    train(synthetic_dataset, TrainConfig(model="sasrec", method="metanetwork", epochs=2, batch_size=200, meta_lr=2e-2, probe_every=20), root / "mn",
          init=root / "static", **quiet)
    return {"static": root / "static", "metanetwork": root / "mn"}


@pytest.fixture(scope="session")
def served(tiny_checkpoints, tmp_path_factory):
    """What `mntool serve` serves in test_serve.py / test_client.py: the tiny MetaNetwork
    checkpoint, its ONNX export and a signing key pair."""
    from types import SimpleNamespace

    from device_runtime import weight_map
    from exporters import export
    from mntool.patches import keygen
    from mntool.train import load_checkpoint

    root = tmp_path_factory.mktemp("serve")
    ckpt = load_checkpoint(tiny_checkpoints["metanetwork"])
    artifact = export(ckpt.model, ckpt.example_inputs(), ckpt.adaptive, "onnx", root / "artifact")
    pair = keygen(root / "cloud")
    return SimpleNamespace(checkpoint=tiny_checkpoints["metanetwork"], artifact=artifact, key=pair.private,
                           pub=pair.public, fingerprint=weight_map.load(artifact).fingerprint)


@pytest.fixture(scope="session")
def patch_server(served, tmp_path_factory):
    """`mntool serve` as a real process on a free loopback port: signed patches, a bearer token,
    a 4 KiB body limit, one worker. `.log` is its stderr."""
    from types import SimpleNamespace

    from mntool.serve_process import ServerProcess

    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    token, max_body = "test-device-token", 4096
    with log.open("w") as stderr:
        process = ServerProcess.start(served.checkpoint, [served.artifact], "--signing-key", served.key, "--token", token,
                                      "--max-body-bytes", max_body, "--max-wait-ms", 20, stderr=stderr)
    yield SimpleNamespace(url=process.url, process=process, log=log, token=token, max_body=max_body)
    process.stop()


# ---- small exported artifacts (tests/small_artifacts.py), shared by the device-side tests -----
@pytest.fixture(scope="session")
def tflite_artifact(tmp_path_factory) -> Path:
    return exported(tmp_path_factory, "tflite", "buffers")


@pytest.fixture(scope="session")
def onnx_artifact(tmp_path_factory) -> Path:
    return exported(tmp_path_factory, "onnx", "buffers")


@pytest.fixture(scope="session")
def tflite_inputs_artifact(tmp_path_factory) -> Path:
    return exported(tmp_path_factory, "tflite", "inputs")


@pytest.fixture(scope="session")
def tflite_patch(tflite_artifact) -> Path:
    return patch_for(tflite_artifact)


@pytest.fixture(scope="session")
def onnx_patch(onnx_artifact) -> Path:
    return patch_for(onnx_artifact)


@pytest.fixture(scope="session")
def tflite_inputs_patch(tflite_inputs_artifact) -> Path:
    return patch_for(tflite_inputs_artifact)


@pytest.fixture(params=["tflite", "onnx"])
def artifact(request) -> Path:
    return request.getfixturevalue(f"{request.param}_artifact")
