"""The image task: MNIST under the per-device shift protocol (`img-v1`), LeNet / MobileNet-style
CNNs, uploads of unlabelled 28x28 images. Thin over `mntool.vision` and `mntool.data.images`."""

from __future__ import annotations

import numpy as np

from device_runtime.errors import MntoolError
from mntool.tasks import SamplesError
from mntool.vision.models import CNNS

NAME = "mnist"
MODELS = tuple(CNNS)
METHODS = ("static", "bn-adapt", "tent", "finetune", "metanetwork", "exits")
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


def check_generates(ck) -> None:
    """Refuse, once (e.g. when `mntool serve` starts), a checkpoint whose method cannot run on an
    unlabelled upload."""
    if ck.config.method == "finetune":
        raise MntoolError(
            f"{ck.path} is a finetune checkpoint: fine-tuning needs labels, which stay on the device, so it "
            "cannot generate from an upload (serve static, bn-adapt, tent or metanetwork)"
        )


def generate(ck, batch: np.ndarray) -> dict:
    """{name: (B, *shape) tensor} for checked uploads under the checkpoint's (label-free) method."""
    import torch

    from mntool.vision.adapt import static_params
    from mntool.vision.train import device_params

    check_generates(ck)
    params = device_params(ck.config.method, ck.model, batch, ck.config, ck.meta)
    if params is None:
        params = static_params(ck.model, len(batch))
    return {n: p.to(torch.float32) for n, p in params.items()}


# ---- uploads over HTTP (`mntool serve`) -------------------------------------------------------
IMAGE_BYTES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
_SAMPLES_FORM = (
    'samples must be {"images": [images, each 28 rows of 28 integer pixels 0..255]} '
    'or {"images_b64": "<base64 of K*784 uint8 pixels>"}'
)


def _shown(value) -> str:
    text = repr(value)
    return f"{text[:40]}..." if len(text) > 40 else text


def parse_upload(ck, samples, limit: int) -> np.ndarray:
    """One device's upload, (K, 28, 28) uint8 with 1 <= K <= `limit`, from the JSON value of a
    request's `samples`: exactly one of `{"images": [K images, each 28 rows of 28 integer pixels
    0..255]}` (nested lists; JSON integers only: no floats, booleans or strings) and
    `{"images_b64": "..."}` (standard padded base64 of the K*784 pixel bytes, image by image, row by
    row: a C-order (K, 28, 28) uint8 array). SamplesError (with `.code`) names the first problem."""
    if type(samples) is not dict:
        raise SamplesError(code="malformed_request", message=_SAMPLES_FORM)
    if "items" in samples:
        raise SamplesError(
            code="malformed_request", message=f"this service's model reads images, not item ids: {_SAMPLES_FORM}"
        )
    unknown = sorted(set(samples) - {"images", "images_b64"})
    if unknown:
        raise SamplesError(
            code="malformed_request", message=f"unknown field samples.{_shown(unknown[0])[1:-1]}: {_SAMPLES_FORM}"
        )
    if len(samples) != 1:
        raise SamplesError(
            code="malformed_request", message=f"give one of samples.images and samples.images_b64: {_SAMPLES_FORM}"
        )
    if "images" in samples:
        return _nested_images(samples["images"], limit)
    return _base64_images(samples["images_b64"], limit)


def _count(k: int, limit: int) -> None:
    if k < 1:
        raise SamplesError(code="too_few_samples", message=f"no images; an upload holds 1..{limit}")
    if k > limit:
        raise SamplesError(code="too_many_samples", message=f"{k} images; this service takes at most {limit}")


def _nested_images(images, limit: int) -> np.ndarray:
    height, width = IMAGE_SHAPE
    if type(images) is not list:
        raise SamplesError(
            code="malformed_request", message="samples.images must be a list of images (each 28 rows of 28 pixels)"
        )
    _count(len(images), limit)
    for i, image in enumerate(images):
        if type(image) is not list or len(image) != height:
            got = f"{len(image)} rows" if type(image) is list else type(image).__name__
            raise SamplesError(code="bad_image_shape", message=f"image {i} is not 28 rows of 28 pixels (got {got})")
        for r, row in enumerate(image):
            if type(row) is not list or len(row) != width:
                got = f"{len(row)} pixels" if type(row) is list else type(row).__name__
                raise SamplesError(
                    code="bad_image_shape", message=f"image {i} row {r} is not a list of 28 pixels (got {got})"
                )
            if set(map(type, row)) != {int}:  # bool is not int here, nor float, str or None
                bad = next(p for p in row if type(p) is not int)
                raise SamplesError(
                    code="bad_pixel",
                    message=f"pixels must be integers 0..255: image {i} row {r} holds {_shown(bad)} ({type(bad).__name__})",
                )
            if min(row) < 0 or max(row) > 255:
                bad = next(p for p in row if not 0 <= p <= 255)
                raise SamplesError(
                    code="bad_pixel", message=f"pixel value {_shown(bad)} in image {i} row {r} is outside 0..255"
                )
    return np.array(images, dtype=np.uint8)


def _base64_images(text, limit: int) -> np.ndarray:
    import base64
    import binascii

    if type(text) is not str:
        raise SamplesError(code="malformed_request", message="samples.images_b64 must be a base64 string")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as err:
        raise SamplesError(
            code="bad_base64", message=f"samples.images_b64 is not valid base64: {err}".splitlines()[0]
        ) from None
    if len(data) % IMAGE_BYTES:
        raise SamplesError(
            code="bad_image_shape",
            message=f"samples.images_b64 holds {len(data)} bytes, not a whole number of 28x28 images ({IMAGE_BYTES} bytes each)",
        )
    _count(len(data) // IMAGE_BYTES, limit)
    return np.frombuffer(data, np.uint8).reshape(-1, *IMAGE_SHAPE)


def upload_schema(ck, limit: int) -> dict:
    """The JSON schema of a request's `samples` (the OpenAPI document's)."""
    row = {
        "type": "array",
        "minItems": IMAGE_SHAPE[1],
        "maxItems": IMAGE_SHAPE[1],
        "items": {"type": "integer", "minimum": 0, "maximum": 255},
    }
    image = {"type": "array", "minItems": IMAGE_SHAPE[0], "maxItems": IMAGE_SHAPE[0], "items": row}
    return {
        "type": "object",
        "description": "the device's latest unlabelled 28x28 grey-scale images, most recent last: exactly one of "
        "images (nested lists) and images_b64 (compact)",
        "oneOf": [{"required": ["images"]}, {"required": ["images_b64"]}],
        "additionalProperties": False,
        "properties": {
            "images": {
                "type": "array",
                "minItems": 1,
                "maxItems": limit,
                "description": "images, each 28 rows of 28 integer pixels 0..255",
                "items": image,
            },
            "images_b64": {
                "type": "string",
                "contentEncoding": "base64",
                "minLength": _b64_length(IMAGE_BYTES),
                "maxLength": _b64_length(limit * IMAGE_BYTES),
                "description": f"standard padded base64 (RFC 4648) of K*{IMAGE_BYTES} pixel bytes, 1 <= K <= {limit}: "
                "a C-order (K, 28, 28) uint8 array, image by image, row by row",
            },
        },
    }


def _b64_length(n_bytes: int) -> int:
    return 4 * -(-n_bytes // 3)


def upload_body_bytes(limit: int) -> int:
    """The default request-body limit: `limit` images as compact nested lists (< 4 KiB each, every
    pixel written "255, "), plus the rest of the request."""
    return 4096 * limit + 1024
