"""The per-device image shift protocol (`img-v1`): MNIST -> simulated phones that drift in time.

MNIST has no writer ids, so devices are defined from a seed. Each device has its own label mix
(Dirichlet over the 10 digits) and its own input style (rotation, scale, stroke thickness,
contrast, background, inversion, noise). Along its timeline (cloud period, then validation,
then test) the device drifts: the label mix and the style are "old" for most of the cloud period,
move linearly to "new" over its last `ramp` fraction, and are "new" in the device periods. So a
model trained in the cloud is out of date on the phone, and the device's latest upload (K
unlabelled images) carries what changed. Exact rules: docs/data-protocol.md ("img-v1").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_runtime.errors import MntoolError
from mntool.data.mnist import MNIST_COUNTS, Mnist, fetch_mnist, load_mnist

IMAGE_PROTOCOL_VERSION = "img-v1"
SPLITS = ("train", "valid", "test")
N_CLASSES = 10
SIDE = 28
MNIST_TEST_OFFSET = MNIST_COUNTS["train"]  # `source` >= this: MNIST test image (source - offset)
_STREAMS = {"devices": 0, "labels": 1, "pools": 2, "pixels": 3, "shuffle": 7}  # one RNG stream each


@dataclass(frozen=True)
class StylePrior:
    """How device styles are drawn (part of `img-v1`: changing a value changes the protocol).

    Old style: each parameter uniform in its `*_old` range. New style = old + a drift whose
    magnitude is uniform in the `*_drift` range and whose sign is a fair coin, clipped to the
    `*_bounds` range (a drift that would leave it is reflected: applied with the other sign).
    """

    rotation_old: tuple[float, float] = (-15.0, 15.0)  # degrees, counter-clockwise
    rotation_drift: tuple[float, float] = (10.0, 25.0)
    rotation_bounds: tuple[float, float] = (-45.0, 45.0)
    scale_old: tuple[float, float] = (0.85, 1.1)  # digit size factor about the image centre
    scale_drift: tuple[float, float] = (0.1, 0.2)
    scale_bounds: tuple[float, float] = (0.7, 1.25)
    thickness_old: tuple[int, ...] = (-1, 0, 0, 1)  # stroke level, uniform over these entries
    thickness_bounds: tuple[int, int] = (-1, 2)  # levels: -1 thin, 0 as is, 1 bold, 2 bolder; drift +-1
    foreground_old: tuple[float, float] = (0.65, 1.0)  # ink intensity (1 = white ink), before inversion
    foreground_drift: tuple[float, float] = (0.15, 0.3)
    foreground_bounds: tuple[float, float] = (0.55, 1.0)
    background_old: tuple[float, float] = (0.0, 0.2)  # paper intensity
    background_drift: tuple[float, float] = (0.1, 0.2)
    background_bounds: tuple[float, float] = (0.0, 0.25)
    noise_old: tuple[float, float] = (0.0, 0.06)  # std of additive Gaussian pixel noise
    noise_drift: tuple[float, float] = (0.04, 0.1)
    noise_bounds: tuple[float, float] = (0.0, 0.15)
    invert_probability: float = 0.1  # a device draws dark ink on light paper (fixed per device)
    jitter_rotation: float = 4.0  # per image: + N(0, this) degrees
    jitter_scale: float = 0.04  # per image: * exp(N(0, this))
    jitter_shift: float = 0.75  # per image: + N(0, this) pixels in x and in y


STYLE_PRIOR = StylePrior()
_CONTINUOUS = ("rotation", "scale", "foreground", "background", "noise")


@dataclass(frozen=True)
class ImageProtocolConfig:
    n_devices: int = 100
    cloud_per_device: int = 320  # images per device in the cloud period (from MNIST train split)
    valid_per_device: int = 64  # validation period (from MNIST train split, disjoint from cloud)
    test_per_device: int = 64  # test period (from MNIST *test* split)
    upload_len: int = 32  # K: images a device uploads (unlabelled) when it requests parameters
    request_every: int = 32  # cloud period: a device re-requests every this many images (blocks)
    dirichlet_alpha: float = 0.5  # label-mix concentration per device
    ramp: float = 0.35  # last fraction of the cloud period over which the device drifts from old to new
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_devices", "cloud_per_device", "valid_per_device", "test_per_device"):
            if getattr(self, name) < 1:
                raise MntoolError(f"image protocol {name} must be >= 1 (got {getattr(self, name)})")
        if self.n_devices < 2:
            raise MntoolError(f"image protocol n_devices must be >= 2 (got {self.n_devices})")
        if not 1 <= self.upload_len < self.cloud_per_device:
            raise MntoolError(
                f"image protocol upload_len must be in 1..cloud_per_device-1 (got {self.upload_len}, "
                f"cloud_per_device {self.cloud_per_device})"
            )
        if self.request_every < 1:
            raise MntoolError(f"image protocol request_every must be >= 1 (got {self.request_every})")
        if not self.dirichlet_alpha > 0:
            raise MntoolError(f"image protocol dirichlet_alpha must be > 0 (got {self.dirichlet_alpha})")
        if not 0 <= self.ramp <= 1:
            raise MntoolError(f"image protocol ramp must be in [0, 1] (got {self.ramp})")

    @property
    def timeline_len(self) -> int:
        return self.cloud_per_device + self.valid_per_device + self.test_per_device


# ---- style transforms -----------------------------------------------------------------------
def _stroke_levels(x: np.ndarray) -> np.ndarray:
    """(4, n, 28, 28): x at thickness levels -1 (grey erosion over a 3x3 cross, averaged with x),
    0 (x), 1 (grey dilation over a 3x3 cross), 2 (grey dilation over a 3x3 square); zero outside."""
    n = len(x)
    padded = np.zeros((n, SIDE + 2, SIDE + 2), dtype=np.float32)
    padded[:, 1:-1, 1:-1] = x

    def near(dy: int, dx: int) -> np.ndarray:
        return padded[:, 1 + dy : 1 + dy + SIDE, 1 + dx : 1 + dx + SIDE]

    out = np.empty((4, n, SIDE, SIDE), dtype=np.float32)
    thin, bold, bolder = out[0], out[2], out[3]
    out[1] = x
    np.minimum(near(0, 1), near(0, -1), out=thin)
    np.maximum(near(0, 1), near(0, -1), out=bold)
    for dy, dx in ((1, 0), (-1, 0)):
        np.minimum(thin, near(dy, dx), out=thin)
        np.maximum(bold, near(dy, dx), out=bold)
    np.minimum(thin, x, out=thin)
    np.maximum(bold, x, out=bold)
    thin += x
    thin *= 0.5
    bolder[:] = bold
    for dy, dx in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        np.maximum(bolder, near(dy, dx), out=bolder)
    return out


def _affine(x: np.ndarray, rotation: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Rotate each image by `rotation` degrees (counter-clockwise as displayed) and scale it about
    the image centre, then move it by `shift` (n, 2) pixels (x right, y down); bilinear, zero
    outside. x (n, 28, 28) float32."""
    n = len(x)
    c = (SIDE - 1) / 2
    theta = np.deg2rad(rotation)
    cos, sin = (np.cos(theta) / scale).astype(np.float32), (np.sin(theta) / scale).astype(np.float32)
    grid = np.arange(SIDE, dtype=np.float32) - c
    u = grid[None, None, :] - shift[:, 0, None, None].astype(np.float32)  # output x relative to the centre
    v = grid[None, :, None] - shift[:, 1, None, None].astype(np.float32)  # output y (down)
    # inverse map of a counter-clockwise (on screen, y down) rotation by theta, then 1/scale
    sx = cos[:, None, None] * u - sin[:, None, None] * v + c + 1  # +1: index into the padded image
    sy = sin[:, None, None] * u + cos[:, None, None] * v + c + 1
    padded = np.zeros((n, SIDE + 2, SIDE + 2), dtype=np.float32)
    padded[:, 1:-1, 1:-1] = x
    np.clip(sx, 0, SIDE + 1 - 1e-3, out=sx)  # outside the image: the zero border
    np.clip(sy, 0, SIDE + 1 - 1e-3, out=sy)
    x0, y0 = sx.astype(np.int32), sy.astype(np.int32)  # floor: both are >= 0
    fx, fy = sx - x0, sy - y0
    w = SIDE + 2
    i00 = (np.arange(n, dtype=np.int32) * (w * w))[:, None, None] + y0 * w + x0
    flat = padded.reshape(-1)
    top = flat[i00]
    top += (flat[i00 + 1] - top) * fx
    bottom = flat[i00 + w]
    bottom += (flat[i00 + (w + 1)] - bottom) * fx
    top += (bottom - top) * fy
    return top


def _render(
    raw: np.ndarray, params: dict[str, np.ndarray], invert: np.ndarray, rng: np.random.Generator, chunk: int = 4096
) -> np.ndarray:
    """Apply each image's style: raw (n, 28, 28) uint8 -> (n, 28, 28) uint8.

    `params` holds per-image arrays: `rotation`, `scale`, `foreground`, `background`, `noise`
    (already interpolated and jittered), `shift` (n, 2), `thickness_old`, `thickness_new` (levels)
    and `w` (the old -> new weight that blends the two stroke levels). Steps: stroke level,
    rotation/scale/shift (bilinear), intensity `background + (foreground - background) * x`,
    inversion `1 - x`, additive Gaussian noise, clip to [0, 1], round to 0..255.
    """
    out = np.empty(raw.shape, dtype=np.uint8)
    for lo in range(0, len(raw), chunk):
        sl = slice(lo, lo + chunk)
        n = len(raw[sl])
        x = raw[sl].astype(np.float32) * np.float32(1 / 255)
        levels = _stroke_levels(x)
        rows = np.arange(n)
        w = params["w"][sl].astype(np.float32)[:, None, None]
        old = levels[params["thickness_old"][sl] + 1, rows]
        new = levels[params["thickness_new"][sl] + 1, rows]
        x = old + (new - old) * w
        x = _affine(x, params["rotation"][sl], params["scale"][sl], params["shift"][sl])
        bg = params["background"][sl].astype(np.float32)[:, None, None]
        fg = params["foreground"][sl].astype(np.float32)[:, None, None]
        x = bg + (fg - bg) * x
        x = np.where(invert[sl][:, None, None], 1 - x, x)
        x += rng.standard_normal(x.shape, dtype=np.float32) * params["noise"][sl].astype(np.float32)[:, None, None]
        out[sl] = np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)
    return out


# ---- the dataset ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSet:
    """One period, all devices, rows sorted by (device, position)."""

    images: np.ndarray  # (N, 28, 28) uint8, style already applied
    label: np.ndarray  # (N,) int64
    device: np.ndarray  # (N,) int64 device index 0..n_devices-1
    position: np.ndarray  # (N,) int64 position in the device's timeline (0-based across all periods)
    block: np.ndarray  # (N,) int64 index into ImageDeviceDataset.train_uploads (cloud period only; -1 elsewhere)
    source: np.ndarray  # (N,) int64 MNIST image: index in train, or MNIST_TEST_OFFSET + index in test
    split: str = ""

    def __post_init__(self) -> None:
        n = len(self.label)
        assert self.images.shape == (n, SIDE, SIDE), "images must be (N, 28, 28)"
        assert all(len(a) == n for a in (self.device, self.position, self.block, self.source))

    def __len__(self) -> int:
        return len(self.label)

    def take(self, index) -> ImageSet:
        """The rows at `index` (an index array or boolean mask), in that order."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self) if f.name != "split"}
        )

    def for_devices(self, devices) -> ImageSet:
        """The rows of the given device indices; MntoolError when none is left."""
        kept = self.take(np.isin(self.device, np.asarray(devices, dtype=np.int64)))
        if len(kept) == 0:
            raise MntoolError(
                f"empty split {self.split!r}: none of the {len(np.atleast_1d(devices))} selected devices has rows in it"
            )
        return kept


@dataclass(frozen=True)
class ImageDeviceDataset:
    """Cloud training images with their lagged uploads, and the device periods (module doc)."""

    config: ImageProtocolConfig
    train: ImageSet  # cloud period, positions whose block start q >= K (a full upload before the block)
    valid: ImageSet
    test: ImageSet
    train_uploads: np.ndarray  # (B, K, 28, 28) uint8: block b's upload, the K images at positions [q-K, q)
    train_upload_device: np.ndarray  # (B,) int64 device of each block
    train_upload_start: np.ndarray  # (B,) int64 q: the block's first position (its request time)
    train_upload_labels: np.ndarray  # (B, K) int64 labels of the upload (only fine-tuning may read them)
    devices: np.ndarray  # (U,) int64 device indices in this dataset (sorted)
    valid_uploads: np.ndarray  # (U, K, 28, 28) uint8: each device's upload for the validation period
    test_uploads: np.ndarray  # (U, K, 28, 28) uint8: ... for the test period
    valid_upload_labels: np.ndarray  # (U, K) int64
    test_upload_labels: np.ndarray  # (U, K) int64
    timeline_source: np.ndarray  # (U, T) int64 the MNIST image at each position (`ImageSet.source` coding)
    styles: list  # per device index of the build (all devices): {"old", "new", "mix_old", "mix_new"}, JSON-able
    build_info: dict  # {"fallback_draws": {"train": n, "test": n}, "build_seconds": s}
    protocol_version: str = IMAGE_PROTOCOL_VERSION

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    @property
    def device_ids(self) -> np.ndarray:
        return self.devices

    def split(self, name: str) -> ImageSet:
        if name not in SPLITS:
            raise MntoolError(f"unknown split {name!r} (one of {', '.join(SPLITS)})")
        return getattr(self, name)

    def device_upload(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(devices (U,), uploads (U, K, 28, 28)): each device's latest K images before the
        `valid` or `test` period began (valid: its last K cloud images; test: its last K images
        before the test period, validation first)."""
        return self.devices, self._upload(split, self.valid_uploads, self.test_uploads)

    def device_upload_labels(self, split: str) -> np.ndarray:
        """(U, K) labels of `device_upload(split)`: what a labelled baseline (fine-tuning) reads."""
        return self._upload(split, self.valid_upload_labels, self.test_upload_labels)

    def _upload(self, split: str, valid: np.ndarray, test: np.ndarray) -> np.ndarray:
        if split not in ("valid", "test"):
            raise MntoolError(f"devices request parameters for 'valid' or 'test', not {split!r}")
        return valid if split == "valid" else test

    def for_devices(self, devices) -> ImageDeviceDataset:
        """The same dataset restricted to some device indices (block indices renumbered)."""
        devices = np.asarray(devices, dtype=np.int64)
        keep = np.isin(self.devices, devices)
        keep_block = np.isin(self.train_upload_device, devices)
        renumber = np.cumsum(keep_block) - 1
        train = self.train.for_devices(devices)
        train = dataclasses.replace(train, block=renumber[train.block])
        return dataclasses.replace(
            self,
            train=train,
            valid=self.valid.for_devices(devices),
            test=self.test.for_devices(devices),
            train_uploads=self.train_uploads[keep_block],
            train_upload_device=self.train_upload_device[keep_block],
            train_upload_start=self.train_upload_start[keep_block],
            train_upload_labels=self.train_upload_labels[keep_block],
            devices=self.devices[keep],
            valid_uploads=self.valid_uploads[keep],
            test_uploads=self.test_uploads[keep],
            valid_upload_labels=self.valid_upload_labels[keep],
            test_upload_labels=self.test_upload_labels[keep],
            timeline_source=self.timeline_source[keep],
        )

    def upload_donors(self, seed: int = 0) -> np.ndarray:
        """(U,) the device whose uploads each device reads under `with_shuffled_uploads(seed)`:
        a uniformly random derangement (no device reads its own)."""
        if self.n_devices < 2:
            raise MntoolError("shuffling uploads needs at least 2 devices")
        rng = np.random.default_rng([seed, _STREAMS["shuffle"]])
        while True:
            perm = rng.permutation(self.n_devices)
            if not np.any(perm == np.arange(self.n_devices)):
                return self.devices[perm]

    def with_shuffled_uploads(self, seed: int = 0) -> ImageDeviceDataset:
        """An experimental control: every device reads another device's uploads (a derangement,
        `upload_donors(seed)`), in every period; cloud block (d, q) reads the block of the donor
        at the same start q. Uploads keep their distribution and their place in time but no
        longer describe the device they come with. Images and labels of the splits are untouched."""
        donor = self.upload_donors(seed)
        slot = np.searchsorted(self.devices, donor)
        block_of = {
            (int(d), int(q)): b for b, (d, q) in enumerate(zip(self.train_upload_device, self.train_upload_start))
        }
        donor_of = dict(zip(self.devices.tolist(), donor.tolist()))
        source_block = np.array(
            [block_of[(donor_of[int(d)], int(q))] for d, q in zip(self.train_upload_device, self.train_upload_start)],
            dtype=np.int64,
        )
        return dataclasses.replace(
            self,
            train_uploads=self.train_uploads[source_block],
            train_upload_labels=self.train_upload_labels[source_block],
            valid_uploads=self.valid_uploads[slot],
            test_uploads=self.test_uploads[slot],
            valid_upload_labels=self.valid_upload_labels[slot],
            test_upload_labels=self.test_upload_labels[slot],
        )


# ---- building -------------------------------------------------------------------------------
def drift_weight(config: ImageProtocolConfig) -> np.ndarray:
    """(T,) weight of the new state at each timeline position: 0 for the first (1 - ramp) of the
    cloud period, rising linearly to 1 at the end of the cloud period, 1 afterwards."""
    t = np.arange(config.timeline_len, dtype=np.float64)
    c = config.cloud_per_device
    start = (1 - config.ramp) * c
    if c - start <= 0:
        return (t >= c).astype(np.float64)
    return np.clip((t - start) / (c - start), 0.0, 1.0)


def _categorical(prob: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One draw per row of `prob` (.., 10) by inverse CDF with uniforms `u` (..)."""
    cdf = np.cumsum(prob, axis=-1)
    cdf /= cdf[..., -1:]
    return np.minimum((cdf <= u[..., None]).sum(axis=-1), N_CLASSES - 1).astype(np.int64)


def _serve(
    labels: np.ndarray, mix: np.ndarray, pool_labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """Draw images without replacement: each request (its label, its device's current `mix`)
    gets an unused image of that label from the pool. Pools are shuffled per class; requests are
    served in a random order; requests beyond a class's pool redraw their label from their mix
    restricted to classes with images left, and are served again. Returns (pool index, final
    label, number of redraws)."""
    labels = labels.copy()
    pool = rng.permutation(len(pool_labels))
    pool = pool[np.argsort(pool_labels[pool], kind="stable")]  # grouped by class, shuffled within
    size = np.bincount(pool_labels, minlength=N_CLASSES)
    offset = np.concatenate([[0], np.cumsum(size)[:-1]])
    used = np.zeros(N_CLASSES, dtype=np.int64)
    assigned = np.full(len(labels), -1, dtype=np.int64)
    todo = rng.permutation(len(labels))
    redraws = 0
    while len(todo):
        todo = todo[np.argsort(labels[todo], kind="stable")]  # served in random order within a class
        lab = labels[todo]
        count = np.bincount(lab, minlength=N_CLASSES)
        rank = np.arange(len(todo)) - (np.cumsum(count) - count)[lab]
        ok = rank < (size - used)[lab]
        assigned[todo[ok]] = pool[offset[lab[ok]] + used[lab[ok]] + rank[ok]]
        used += np.bincount(lab[ok], minlength=N_CLASSES)
        todo = todo[~ok]
        if len(todo):
            left = (used < size).astype(np.float64)
            prob = mix[todo] * left
            empty = prob.sum(axis=1) <= 0
            prob[empty] = (size - used)[None, :]
            labels[todo] = _categorical(prob, rng.random(len(todo)))
            redraws += len(todo)
            todo = todo[rng.permutation(len(todo))]
    return assigned, labels, redraws


def _draw_styles(rng: np.random.Generator, n: int, prior: StylePrior) -> tuple[dict, dict, np.ndarray]:
    """Per device (n,) old and new style parameters and the (fixed) inversion flag."""
    old, new = {}, {}
    for name in _CONTINUOUS:
        lo, hi = getattr(prior, f"{name}_bounds")
        old[name] = rng.uniform(*getattr(prior, f"{name}_old"), size=n)
        step = rng.uniform(*getattr(prior, f"{name}_drift"), size=n) * rng.choice([-1.0, 1.0], size=n)
        step = np.where((old[name] + step < lo) | (old[name] + step > hi), -step, step)
        new[name] = np.clip(old[name] + step, lo, hi)
    lo, hi = prior.thickness_bounds
    old["thickness"] = rng.choice(np.array(prior.thickness_old, dtype=np.int64), size=n)
    step = rng.choice(np.array([-1, 1], dtype=np.int64), size=n)
    step = np.where((old["thickness"] + step < lo) | (old["thickness"] + step > hi), -step, step)
    new["thickness"] = old["thickness"] + step
    invert = rng.random(n) < prior.invert_probability
    return old, new, invert


def build_image_dataset(mnist: Mnist, config: ImageProtocolConfig | None = None) -> ImageDeviceDataset:
    """Apply the image shift protocol (docs/data-protocol.md, `img-v1`) to MNIST."""
    started = time.perf_counter()
    config = config or ImageProtocolConfig()
    prior = STYLE_PRIOR
    n_dev, c, v, t_len = config.n_devices, config.cloud_per_device, config.valid_per_device, config.timeline_len
    k, e = config.upload_len, config.request_every
    n_train, n_test = len(mnist.train_labels), len(mnist.test_labels)
    if n_dev * (c + v) > n_train or n_dev * config.test_per_device > n_test:
        raise MntoolError(
            f"{n_dev} devices need {n_dev * (c + v)} MNIST train images (has {n_train}) and "
            f"{n_dev * config.test_per_device} test images (has {n_test}); use fewer devices or fewer images each"
        )
    starts = np.arange(0, c, e)
    starts = starts[starts >= k]  # cloud blocks with a full upload before them
    n_blocks = len(starts)
    if n_blocks == 0:
        raise MntoolError(
            f"empty split 'train': no cloud block (every {e} images) starts at or after upload_len {k} "
            f"within cloud_per_device {c}"
        )

    def rng(stream: str) -> np.random.Generator:
        return np.random.default_rng([config.seed, _STREAMS[stream]])

    # 1. Devices: label mixes and styles.
    devices = rng("devices")
    alpha = np.full(N_CLASSES, config.dirichlet_alpha)
    mix_old, mix_new = devices.dirichlet(alpha, size=n_dev), devices.dirichlet(alpha, size=n_dev)
    old, new, invert = _draw_styles(devices, n_dev, prior)

    # 2. Labels along each timeline, from the interpolated mix.
    w = drift_weight(config)  # (T,)
    mix = (1 - w)[None, :, None] * mix_old[:, None, :] + w[None, :, None] * mix_new[:, None, :]  # (U, T, 10)
    labels = _categorical(mix, rng("labels").random((n_dev, t_len)))

    # 3. Images without replacement: cloud + validation from MNIST train, test from MNIST test.
    pools = rng("pools")
    source = np.empty((n_dev, t_len), dtype=np.int64)
    redraws = {}
    for split, cols, pool_labels, offset in (
        ("train", slice(0, c + v), mnist.train_labels, 0),
        ("test", slice(c + v, t_len), mnist.test_labels, MNIST_TEST_OFFSET),
    ):
        want = labels[:, cols]
        index, got, redraws[split] = _serve(want.reshape(-1), mix[:, cols].reshape(-1, N_CLASSES), pool_labels, pools)
        labels[:, cols] = got.reshape(want.shape)
        source[:, cols] = index.reshape(want.shape) + offset
    raw = np.empty((n_dev, t_len, SIDE, SIDE), dtype=np.uint8)
    from_test = source >= MNIST_TEST_OFFSET
    raw[~from_test] = mnist.train_images[source[~from_test]]
    raw[from_test] = mnist.test_images[source[from_test] - MNIST_TEST_OFFSET]
    raw = raw.reshape(-1, SIDE, SIDE)

    # 4. Style: interpolated per position, jittered per image, then rendered.
    pixels = rng("pixels")
    ww = np.broadcast_to(w, (n_dev, t_len)).reshape(-1)
    dev = np.repeat(np.arange(n_dev), t_len)
    params = {name: (1 - ww) * old[name][dev] + ww * new[name][dev] for name in _CONTINUOUS}
    params["rotation"] = params["rotation"] + pixels.normal(0, prior.jitter_rotation, size=len(dev))
    params["scale"] = params["scale"] * np.exp(pixels.normal(0, prior.jitter_scale, size=len(dev)))
    params["shift"] = pixels.normal(0, prior.jitter_shift, size=(len(dev), 2))
    params["thickness_old"], params["thickness_new"], params["w"] = old["thickness"][dev], new["thickness"][dev], ww
    images = _render(raw, params, invert[dev], pixels).reshape(n_dev, t_len, SIDE, SIDE)

    # 5. Periods, cloud blocks and uploads.
    block_of_position = np.full(t_len, -1, dtype=np.int64)
    for j, q in enumerate(starts):
        block_of_position[q : min(q + e, c)] = j
    ids = np.arange(n_dev, dtype=np.int64)

    def period(name: str, positions: np.ndarray, blocks: bool) -> ImageSet:
        d = np.repeat(ids, len(positions))
        p = np.tile(positions, n_dev)
        block = d * n_blocks + block_of_position[p] if blocks else np.full(len(d), -1, dtype=np.int64)
        return ImageSet(images[d, p], labels[d, p], d, p, block, source[d, p], split=name)

    train_positions = np.flatnonzero(block_of_position >= 0)
    window = np.arange(-k, 0)
    block_q = np.tile(starts, n_dev)
    block_d = np.repeat(ids, n_blocks)
    valid_at, test_at = c + window, c + v + window

    mix_tv = 0.5 * np.abs(mix_old - mix_new).sum(axis=1)
    styles = [
        {
            "old": {
                **{n: float(old[n][i]) for n in _CONTINUOUS},
                "thickness": int(old["thickness"][i]),
                "invert": bool(invert[i]),
            },
            "new": {
                **{n: float(new[n][i]) for n in _CONTINUOUS},
                "thickness": int(new["thickness"][i]),
                "invert": bool(invert[i]),
            },
            "mix_old": [float(p) for p in mix_old[i]],
            "mix_new": [float(p) for p in mix_new[i]],
            "mix_tv": float(mix_tv[i]),
        }
        for i in range(n_dev)
    ]
    return ImageDeviceDataset(
        config=config,
        train=period("train", train_positions, blocks=True),
        valid=period("valid", np.arange(c, c + v), blocks=False),
        test=period("test", np.arange(c + v, t_len), blocks=False),
        train_uploads=images[block_d[:, None], block_q[:, None] + window],
        train_upload_device=block_d,
        train_upload_start=block_q,
        train_upload_labels=labels[block_d[:, None], block_q[:, None] + window],
        devices=ids,
        valid_uploads=images[:, valid_at],
        test_uploads=images[:, test_at],
        valid_upload_labels=labels[:, valid_at],
        test_upload_labels=labels[:, test_at],
        timeline_source=source,
        styles=styles,
        build_info={"fallback_draws": redraws, "build_seconds": round(time.perf_counter() - started, 3)},
    )


def load_image_dataset(
    data_dir: Path | str | None = None,
    config: ImageProtocolConfig | dict | None = None,
    log: Callable[[str], None] | None = None,
) -> ImageDeviceDataset:
    """`build_image_dataset` over MNIST in `data_dir`, or over the fetched cache (fetched on first use)."""
    if isinstance(config, dict):
        config = ImageProtocolConfig(**config)
    path = Path(data_dir) if data_dir is not None else fetch_mnist(log=log)
    return build_image_dataset(load_mnist(path), config or ImageProtocolConfig())


# ---- statistics -----------------------------------------------------------------------------
def _entropy_bits(counts: np.ndarray) -> np.ndarray:
    p = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=-1)


def stats(dataset: ImageDeviceDataset) -> dict:
    """Sizes and how much each device shifts: what `mntool data stats --dataset mnist` prints."""
    cfg = dataset.config
    devices = dataset.devices
    out = {
        "protocol_version": dataset.protocol_version,
        "devices": dataset.n_devices,
        **{f"{s}_images": len(dataset.split(s)) for s in SPLITS},
        "train_blocks": len(dataset.train_uploads),
        "upload_len": cfg.upload_len,
    }
    for s in SPLITS:
        part = dataset.split(s)
        pooled = np.bincount(part.label, minlength=N_CLASSES)
        per_device = np.zeros((len(devices), N_CLASSES))
        np.add.at(per_device, (np.searchsorted(devices, part.device), part.label), 1)
        out[f"{s}_label_entropy_bits"] = round(float(_entropy_bits(pooled)), 4)
        out[f"{s}_device_label_entropy_bits"] = round(float(_entropy_bits(per_device).mean()), 4)
    # the shift: drawn (mixes, styles) and realised (cloud before the ramp vs validation labels)
    styles = [dataset.styles[d] for d in devices]
    out["mix_tv_old_new"] = round(float(np.mean([s["mix_tv"] for s in styles])), 4)
    early_end = (1 - cfg.ramp) * cfg.cloud_per_device
    early = dataset.train.take(dataset.train.position < early_end)
    if len(early):
        hist = {}
        for name, part in (("early", early), ("valid", dataset.valid)):
            h = np.zeros((len(devices), N_CLASSES))
            np.add.at(h, (np.searchsorted(devices, part.device), part.label), 1)
            hist[name] = h / np.maximum(h.sum(axis=1, keepdims=True), 1)
        out["label_tv_cloud_early_valid"] = round(
            float(0.5 * np.abs(hist["early"] - hist["valid"]).sum(axis=1).mean()), 4
        )
    for name in (*_CONTINUOUS, "thickness"):
        out[f"mean_abs_drift_{name}"] = round(float(np.mean([abs(s["new"][name] - s["old"][name]) for s in styles])), 4)
    out["inverted_devices"] = int(sum(s["old"]["invert"] for s in styles))
    out["fallback_draws"] = dict(dataset.build_info["fallback_draws"])
    out["build_seconds"] = dataset.build_info["build_seconds"]
    return out
