"""Fetching and reading MovieLens-100k: the real package-index route, the GroupLens zip route over
real HTTP (served from localhost), hash verification, both file formats, and clean failures."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from device_runtime.errors import MntoolError
from mntool.cli.main import main
from mntool.data import build_dataset, fetch_movielens_100k, load_interactions
from mntool.data import fetch as fetch_module
from mntool.data.fetch import DATA_DIR_ENV, default_dest, read_manifest
from mntool.data.movielens import RECBOLE_SHA256, sha256_file

RECBOLE_FILES = sorted(RECBOLE_SHA256)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def write_udata(inter: Path, out: Path) -> Path:
    """GroupLens u.data from a RecBole .inter: the same rows without the header line."""
    out.write_text("".join(inter.read_text().splitlines(keepends=True)[1:]))
    return out


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> Path:
    """One real fetch (GroupLens if reachable, else the recbole wheel from the package index)."""
    return fetch_movielens_100k(tmp_path_factory.mktemp("cache") / "ml-100k")


def test_fetch_delivers_verified_release_files(fetched, ml100k_dir):
    manifest = read_manifest(fetched)
    assert manifest["source"] in ("pypi:recbole==1.2.1", fetch_module.GROUPLENS_URL)
    if manifest["source"].startswith("pypi"):
        assert {n: sha256_file(fetched / n) for n in RECBOLE_FILES} == RECBOLE_SHA256
        assert (fetched / "ml-100k.inter").read_bytes() == (ml100k_dir / "ml-100k.inter").read_bytes()
    assert len(load_interactions(fetched)) == 100_000


def test_second_fetch_is_a_no_op(fetched, capsys):
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in fetched.iterdir()}
    lines: list[str] = []
    assert fetch_movielens_100k(fetched, log=lines.append) == fetched
    assert lines == [f"{fetched}: cached copy verifies; nothing to fetch"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in fetched.iterdir()} == before
    assert main(["data", "fetch", "movielens-100k", "--dest", str(fetched), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reused"] is True and out["path"] == str(fetched)


def test_default_cache_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_dest() == tmp_path / "ml-100k"
    monkeypatch.delenv(DATA_DIR_ENV)
    assert default_dest() == Path.home() / ".cache" / "mntool" / "data" / "ml-100k"


@pytest.fixture
def corrupt_copy(ml100k_dir, tmp_path) -> Path:
    copy = tmp_path / "ml-100k"
    copy.mkdir()
    for name in RECBOLE_FILES:
        shutil.copy(ml100k_dir / name, copy / name)
    data = bytearray((copy / "ml-100k.inter").read_bytes())
    data[500] = ord("9") if data[500] != ord("9") else ord("8")  # one digit of one rating row
    (copy / "ml-100k.inter").write_bytes(bytes(data))
    return copy


def test_corrupt_copy_is_rejected_and_left_untouched(corrupt_copy, capsys):
    before = snapshot(corrupt_copy)
    with pytest.raises(MntoolError, match=r"ml-100k.inter is corrupt: SHA-256"):
        load_interactions(corrupt_copy)
    with pytest.raises(MntoolError, match=r"corrupt.*--force"):
        fetch_movielens_100k(corrupt_copy)
    assert main(["data", "fetch", "movielens-100k", "--dest", str(corrupt_copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ml-100k.inter is corrupt" in err and err.count("\n") == 1
    assert snapshot(corrupt_copy) == before
    assert len(load_interactions(corrupt_copy, verify=False)) == 100_000  # a deliberate edit stays readable


def test_force_replaces_a_corrupt_copy(corrupt_copy):
    fetch_movielens_100k(corrupt_copy, force=True)
    assert {n: sha256_file(corrupt_copy / n) for n in RECBOLE_FILES} == RECBOLE_SHA256


def test_grouplens_format_reads_the_same_ratings(ml100k_dir, ml100k_interactions, ml100k_dataset, tmp_path):
    udata = write_udata(ml100k_dir / "ml-100k.inter", tmp_path / "u.data")
    grouplens = load_interactions(tmp_path)
    for field in ("user", "item", "timestamp", "rating", "user_ids", "item_ids"):
        assert np.array_equal(getattr(grouplens, field), getattr(ml100k_interactions, field)), field
    assert np.array_equal(build_dataset(grouplens).test_rank.candidates, ml100k_dataset.test_rank.candidates)
    rows = udata.read_text().splitlines()
    user, item, rating, ts = rows[10].split("\t")
    rows[10] = "\t".join([user, item, str(int(rating) % 5 + 1), ts])  # one rating changed
    udata.write_text("\n".join(rows) + "\n")
    with pytest.raises(MntoolError, match="u.data is corrupt: its ratings differ"):
        load_interactions(udata)


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "x.inter",
            "user_id:token\titem_id:token\ttimestamp:float\n1\t2\n",
            r"x.inter:2: expected 3 tab-separated fields, got 2",
        ),
        ("x.inter", "user_id:token\titem_id:token\n1\t2\n", r"no 'timestamp' field"),
        (
            "x.inter",
            "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tsoon\n",
            r"timestamp column holds a value that is not a number",
        ),
        ("x.inter", "user_id:token\titem_id:token\ttimestamp:float\n", r"holds no interactions"),
        ("x.data", "1\t2\t3\t4.5\n", r"timestamps must be whole seconds"),
        ("x.csv", "1,2,3,4\n", r"unknown interaction format"),
    ],
)
def test_malformed_files(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(MntoolError, match=message):
        load_interactions(tmp_path / name)


def test_missing_data(tmp_path):
    with pytest.raises(MntoolError, match="does not exist"):
        load_interactions(tmp_path / "nowhere")
    with pytest.raises(MntoolError, match="holds no interaction file"):
        load_interactions(tmp_path)


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
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_grouplens_zip_route(http_server, ml100k_dir, tmp_path, monkeypatch):
    root, url = http_server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("ml-100k/u.data", write_udata(ml100k_dir / "ml-100k.inter", tmp_path / "u.data").read_bytes())
        z.writestr("ml-100k/u.item", (ml100k_dir / "ml-100k.item").read_bytes())
        z.writestr("ml-100k/u.user", (ml100k_dir / "ml-100k.user").read_bytes())
    (root / "ml-100k.zip").write_bytes(buffer.getvalue())
    monkeypatch.setattr(fetch_module, "GROUPLENS_URL", f"{url}/ml-100k.zip")
    dest = fetch_movielens_100k(tmp_path / "cache")
    assert sorted(p.name for p in dest.iterdir()) == ["source.json", "u.data", "u.item", "u.user"]
    assert read_manifest(dest)["source"] == f"{url}/ml-100k.zip"
    assert len(load_interactions(dest)) == 100_000

    (root / "ml-100k.zip").write_bytes(b"not a zip")
    with pytest.raises(MntoolError, match="ml-100k.zip does not hold"):
        fetch_movielens_100k(tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_every_route_failing_is_one_error(http_server, tmp_path, monkeypatch):
    _, url = http_server
    monkeypatch.setattr(fetch_module, "GROUPLENS_URL", f"{url}/missing.zip")
    monkeypatch.setattr(fetch_module, "RECBOLE_REQUIREMENT", "recbole==0.0.0")
    with pytest.raises(
        MntoolError,
        match=r"could not fetch movielens-100k \(grouplens: HTTP 404 File not found; package index: pip download failed",
    ):
        fetch_movielens_100k(tmp_path / "ml-100k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["www"]
