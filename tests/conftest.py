"""Shared fixtures: the real MovieLens-100k (found or fetched as data_sources.py says) and its
built dataset, small trained checkpoints, a served artifact, small exported artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from data_sources import ml100k_copy
from small_artifacts import exported, patch_for


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """A verified MovieLens-100k: the RecBole copy at ../shared/data/ml-100k (see its SOURCE.md),
    else mntool's cached one; under `make test` or CI fetched when missing, never skipped."""
    return ml100k_copy(os.environ)


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
    train(
        synthetic_dataset,
        TrainConfig(model="sasrec", method="static", epochs=3, batch_size=200, lr=5e-3, probe_every=20),
        root / "static",
        **quiet,
    )
    # meta_lr 2e-2: the generator must validate better than its static start (else the start is kept; test_train.py)
    train(
        synthetic_dataset,
        TrainConfig(model="sasrec", method="metanetwork", epochs=2, batch_size=200, meta_lr=2e-2, probe_every=20),
        root / "mn",
        init=root / "static",
        **quiet,
    )
    return {"static": root / "static", "metanetwork": root / "mn"}


@pytest.fixture(scope="session")
def metapatch_ckpts(tiny_checkpoints, synthetic_dataset, tmp_path_factory):
    """A metapatch SASRec on the tiny static checkpoint (device phase: 2 Adam steps on z), and a
    MetaNetwork generating its z (test_metapatch.py; test_serve_versions.py serves the first)."""
    from mntool.metapatch import MetaPatchConfig
    from mntool.train import FinetuneConfig, TrainConfig, train

    root = tmp_path_factory.mktemp("metapatch")
    quiet = dict(progress=False, log=lambda s: None)
    fast = dict(epochs=2, batch_size=200, probe_every=20, finetune=FinetuneConfig(steps=2))
    train(
        synthetic_dataset,
        TrainConfig(model="sasrec", method="metapatch", metapatch=MetaPatchConfig(lr=1e-2, z_lr=5e-2), **fast),
        root / "mp",
        init=tiny_checkpoints["static"],
        **quiet,
    )
    train(
        synthetic_dataset,
        TrainConfig(model="sasrec", method="metanetwork", meta_lr=2e-2, **fast),
        root / "mn",
        init=root / "mp",
        **quiet,
    )
    return {"static": tiny_checkpoints["static"], "metapatch": root / "mp", "metanetwork": root / "mn"}


@pytest.fixture(scope="session")
def served(tiny_checkpoints, tmp_path_factory):
    """What `mntool serve` serves in test_serve.py / test_client.py: the tiny MetaNetwork
    checkpoint, its ONNX export, an online signing key pair (`key`, `pub`) and the root pair
    (`root_pub`) whose key list (`key_list`) certifies it."""
    from types import SimpleNamespace

    from device_runtime import weight_map
    from exporters import export
    from mntool.patches import certify_keys, keygen, load_signing_key, raw_public_key
    from mntool.train import load_checkpoint

    root = tmp_path_factory.mktemp("serve")
    ckpt = load_checkpoint(tiny_checkpoints["metanetwork"])
    artifact = export(ckpt.model, ckpt.example_inputs(), ckpt.adaptive, "onnx", root / "artifact")
    pair, root_pair = keygen(root / "cloud"), keygen(root / "root")
    key_list = root / "cloud.mnkeys"
    key_list.write_bytes(
        certify_keys(load_signing_key(root_pair.private), [raw_public_key(load_signing_key(pair.private))], serial=1)
    )
    return SimpleNamespace(
        checkpoint=tiny_checkpoints["metanetwork"],
        artifact=artifact,
        key=pair.private,
        pub=pair.public,
        root_pub=root_pair.public,
        key_list=key_list,
        fingerprint=weight_map.load(artifact).fingerprint,
    )


@pytest.fixture(scope="session")
def patch_server(served, tmp_path_factory):
    """`mntool serve` as a real process on a free loopback port: signed patches, a bearer token,
    a 4 KiB body limit, one worker. `.log` is its stderr."""
    from types import SimpleNamespace

    from mntool.serve import ServerProcess

    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    token, max_body = "test-device-token", 4096
    with log.open("w") as stderr:
        process = ServerProcess.start(
            served.checkpoint,
            [served.artifact],
            "--signing-key",
            served.key,
            "--key-list",
            served.key_list,
            "--token",
            token,
            "--max-body-bytes",
            max_body,
            "--max-wait-ms",
            20,
            stderr=stderr,
        )
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


# ---- MNIST and the image shift protocol (img-v1) -------------------------------------------
@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """A verified MNIST: the gzipped IDX files at ../shared/data/mnist (see its SOURCE.md), else
    mntool's cached copy; under `make test` or CI fetched when missing, never skipped."""
    from data_sources import mnist_copy

    return mnist_copy(os.environ)


@pytest.fixture(scope="session")
def mnist_data(mnist_dir):
    from mntool.data.mnist import load_mnist

    return load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def mnist_dataset(mnist_data):
    """The image shift protocol on MNIST with 12 devices (default sizes per device), built once."""
    from mntool.data.images import ImageProtocolConfig, build_image_dataset

    return build_image_dataset(mnist_data, ImageProtocolConfig(n_devices=12))
