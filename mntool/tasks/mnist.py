"""The image task: MNIST under the per-device shift protocol (`img-v1`), LeNet / MobileNet-style
CNNs, uploads of unlabelled 28x28 images. Thin over `mntool.vision` and `mntool.data.images`."""

from __future__ import annotations

import numpy as np

from device_runtime.errors import MntoolError
from mntool.tasks import SamplesError
from mntool.vision.models import CNNS

NAME = "mnist"
MODELS = tuple(CNNS)
METHODS = ("static", "bn-adapt", "tent", "finetune", "metanetwork")
DEFAULT_MODEL = "lenet"
METRICS = ("device_mean_accuracy", "accuracy", "macro_f1", "nll", "ece")
IMAGE_SHAPE = (28, 28)


def train(options: dict, out, init, data_dir, progress: bool, log) -> dict:
    """`mntool train --task mnist`; `options` as for every task (see `mntool.tasks.movielens.train`),
    `upload_len` the images a device uploads."""
    from mntool.data.images import ImageProtocolConfig, load_image_dataset
    from mntool.meta import MetaConfig
    from mntool.vision.train import VisionTrainConfig
    from mntool.vision.train import train as run_train

    cfg = VisionTrainConfig(model=options["model"], method=options["method"], seed=options["seed"])
    if options.get("epochs") is not None:
        cfg.epochs = options["epochs"]
    if options.get("no_stabilizer"):
        cfg.meta = MetaConfig(gate=False, ema=False)
    cfg.meta_train_backbone = options["meta_train_backbone"]
    cfg.shuffled_uploads = options.get("shuffled_uploads", False)
    protocol = ImageProtocolConfig(upload_len=options.get("upload_len") or ImageProtocolConfig.upload_len)
    dataset = load_image_dataset(data_dir, protocol, log=log)
    return run_train(dataset, cfg, out, init=init, progress=progress, log=log)


def evaluate(ck, data_dir) -> dict:
    from mntool.data.images import ImageProtocolConfig, load_image_dataset
    from mntool.vision.train import experiment_dataset, report_metrics

    dataset = load_image_dataset(data_dir, ImageProtocolConfig(**ck.protocol))
    return report_metrics(ck.model, experiment_dataset(dataset, ck.config), ck.config, ck.meta)


def metrics_table(metrics: dict) -> str:
    heads = ("dev-mean acc", "accuracy", "macro-F1", "NLL", "ECE")
    lines = [f"{'':8s}" + "".join(f"{m:>14s}" for m in heads)]
    for label in ("valid", "test"):
        lines.append(f"{label:8s}" + "".join(f"{metrics[label][m]:14.4f}" for m in METRICS))
    return "\n".join(lines)


def load_checkpoint(path, config: dict):
    from mntool.vision.train import load_checkpoint as load

    return load(path, config)


# ---- uploads ---------------------------------------------------------------------------------
def upload_limit(ck) -> int:
    """The most images one device's upload may hold."""
    return ck.upload_len


def check_upload(ck, images) -> np.ndarray:
    """(B, K, 28, 28) uint8 from B devices' uploads of K grey-scale images each (integer pixel
    values 0..255, 1 <= K <= the protocol's upload length)."""
    arr = np.asarray(images)
    if arr.dtype == object or arr.ndim != 4 or arr.shape[2:] != IMAGE_SHAPE:
        raise SamplesError(f"image uploads must be (devices, images, 28, 28) arrays, got shape {arr.shape}")
    if not 1 <= arr.shape[1] <= upload_limit(ck):
        raise SamplesError(f"{arr.shape[1]} images per device; this model takes 1..{upload_limit(ck)}")
    if arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise SamplesError(f"image pixels must be integers 0..255, got {arr.dtype}")
        if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)) and arr.min() >= 0 and arr.max() <= 255):
            raise SamplesError("image pixels must be integers 0..255")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def one_upload(raw) -> np.ndarray:
    """One device's upload (K, 28, 28) as a batch of one."""
    arr = np.asarray(raw)
    if arr.ndim != 3:
        raise SamplesError(f"one device's upload is a (images, 28, 28) array, got shape {arr.shape}")
    return arr[None]


def generate(ck, batch: np.ndarray) -> dict:
    """{name: (B, *shape) tensor} for checked uploads under the checkpoint's (label-free) method."""
    import torch

    from mntool.vision.adapt import static_params
    from mntool.vision.train import device_params

    if ck.config.method == "finetune":
        raise MntoolError("a finetune checkpoint cannot generate: fine-tuning needs labels, which stay on the device")
    params = device_params(ck.config.method, ck.model, batch, ck.config, ck.meta)
    if params is None:
        params = static_params(ck.model, len(batch))
    return {n: p.to(torch.float32) for n, p in params.items()}
