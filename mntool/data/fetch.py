"""Getting MovieLens-100k onto this machine, verified, without any data hub.

Routes, in order: the GroupLens zip, then the RecBole 1.2.1 wheel from the Python package index
(it ships the data as `recbole/dataset_example/ml-100k/`). Files land in a cache directory only
after they verify, so a failed fetch leaves the cache as it was. See docs/data-protocol.md.
The route machinery (`fetch_by_routes`, `download`, `pip_download`) is shared with mnist.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from device_runtime.errors import MntoolError
from mntool.data.movielens import GROUPLENS_CONTENT_SHA256, RECBOLE_SHA256, DataFileError, sha256_file, verify_dir

DATA_DIR_ENV = "MNTOOL_DATA_DIR"
DATASET = "movielens-100k"
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_FILES = ("u.data", "u.item", "u.user")
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
MANIFEST = "source.json"

Log = Callable[[str], None]


class FetchError(MntoolError):
    """No route could deliver a verified copy of the data set."""


def data_root() -> Path:
    """Where fetched data sets are cached: `$MNTOOL_DATA_DIR`, else `~/.cache/mntool/data`."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "mntool" / "data").expanduser()


def default_dest() -> Path:
    return data_root() / "ml-100k"


def is_cached(dest: Path) -> bool:
    """True when `dest` holds a complete copy that verifies; MntoolError when a file is corrupt."""
    dest = Path(dest)
    if not dest.is_dir():
        return False
    try:
        verified = verify_dir(dest)
    except DataFileError as err:
        raise DataFileError(f"{err} (replace it: mntool data fetch {DATASET} --force)") from None
    return set(RECBOLE_SHA256) <= set(verified) or (
        set(GROUPLENS_CONTENT_SHA256) <= set(verified) and all((dest / n).is_file() for n in GROUPLENS_FILES)
    )


def read_manifest(dest: Path) -> dict:
    """The record `fetch_movielens_100k` wrote beside the files ({} for a copy placed by hand)."""
    path = Path(dest) / MANIFEST
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        raise MntoolError(f"{path} is not valid JSON; delete it or fetch again with --force") from None


def fetch_movielens_100k(
    dest: Path | str | None = None, *, force: bool = False, timeout: float = 5.0, log: Log | None = None
) -> Path:
    """Make sure a verified MovieLens-100k copy is in `dest` (default `default_dest()`); return it.

    A copy that already verifies is kept as is (no network). A corrupt cached file is an error
    unless `force`, which fetches afresh and replaces the release files.
    """
    dest = Path(dest).expanduser() if dest is not None else default_dest()
    log = log or (lambda message: None)
    if not force and is_cached(dest):
        log(f"{dest}: cached copy verifies; nothing to fetch")
        return dest
    routes = (("grouplens", _from_grouplens), ("package index", _from_recbole_wheel))
    return fetch_by_routes(dest, DATASET, routes, verify_dir, staging_prefix=".ml-100k-", timeout=timeout, log=log)


Route = Callable[[Path, float, Log], str]  # (staging dir, timeout, log) -> source; files land in staging


def fetch_by_routes(
    dest: Path,
    dataset: str,
    routes: tuple[tuple[str, Route], ...],
    verify: Callable[[Path], dict[str, str]],
    *,
    staging_prefix: str,
    timeout: float,
    log: Log,
    manifest: Callable[[str, dict[str, str]], dict] | None = None,
) -> Path:
    """Try `routes` in order; the first that delivers files into a staging directory beside
    `dest` which pass `verify` is installed into `dest` (one rename per file, `source.json` last).

    A route raising `RouteUnavailable` falls through to the next; any other error (for example
    a corrupt delivery, `FetchError`) stops the fetch. Nothing in `dest` changes unless a route
    succeeds. `manifest(source, verified)` gives the record to write (default: dataset, source,
    the verified names); `_install` adds per-file SHA-256 and the time.
    """
    failures = []
    for name, route in routes:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix, dir=dest.parent))
        try:
            source = route(staging, timeout, log)
            try:
                verified = verify(staging)
            except DataFileError as err:
                raise FetchError(f"{name} route delivered a corrupt copy: {err}") from None
            record = (
                manifest(source, verified)
                if manifest
                else {"dataset": dataset, "source": source, "verified": sorted(verified)}
            )
            _install(staging, dest, record)
            log(f"{dest}: {', '.join(sorted(verified))} verified ({source})")
            return dest
        except RouteUnavailable as err:
            log(f"{name} route unavailable: {err}")
            failures.append(f"{name}: {err}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    raise FetchError(f"could not fetch {dataset} ({'; '.join(failures)})")


class RouteUnavailable(Exception):
    """A route could not deliver (network, index); the next route is tried."""


def _from_grouplens(staging: Path, timeout: float, log: Log) -> str:
    _extract(io.BytesIO(download(GROUPLENS_URL, timeout, log)), "ml-100k/", GROUPLENS_FILES, staging, "ml-100k.zip")
    return GROUPLENS_URL


def download(url: str, timeout: float, log: Log) -> bytes:
    """The body at `url` (progress on stderr); RouteUnavailable when it cannot be had."""
    log(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            buffer = io.BytesIO()
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=None) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    buffer.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise RouteUnavailable(f"HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise RouteUnavailable(getattr(err, "reason", err)) from None
    return buffer.getvalue()


def _from_recbole_wheel(staging: Path, timeout: float, log: Log) -> str:
    wheel_dir = staging / "wheel"
    wheel = pip_download(RECBOLE_REQUIREMENT, wheel_dir, log)
    with open(wheel, "rb") as f:
        _extract(f, RECBOLE_MEMBER_DIR, tuple(RECBOLE_SHA256), staging, wheel.name)
    shutil.rmtree(wheel_dir)
    return f"pypi:{RECBOLE_REQUIREMENT}"


def pip_download(requirement: str, wheel_dir: Path, log: Log, timeout: float = 300) -> Path:
    """`python -m pip download --no-deps --only-binary=:all: REQUIREMENT` into `wheel_dir` (the
    interpreter running mntool, so its index settings apply); the wheel's path. RouteUnavailable
    when pip fails or brings no wheel of that project."""
    log(f"downloading the {requirement} wheel from the package index (pip)")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        requirement,
        "-d",
        str(wheel_dir),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RouteUnavailable(f"pip download timed out after {timeout:g} s") from None
    project = re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0]
    wheels = sorted(wheel_dir.glob(f"{re.sub(r'[-_.]+', '_', project)}-*.whl"))
    if done.returncode != 0 or not wheels:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        raise RouteUnavailable(f"pip download failed: {lines[-1]}")
    return wheels[0]


def _extract(archive, member_dir: str, names: tuple[str, ...], staging: Path, label: str) -> None:
    try:
        with zipfile.ZipFile(archive) as z:
            for name in names:
                (staging / name).write_bytes(z.read(member_dir + name))
    except (zipfile.BadZipFile, KeyError) as err:
        raise FetchError(f"{label} does not hold {member_dir}{{{','.join(names)}}}: {err}") from None


def _install(staging: Path, dest: Path, manifest: dict) -> None:
    """Move the staged files into `dest` (same file system, one rename each), manifest last."""
    names = sorted(p.name for p in staging.iterdir())
    manifest = {
        **manifest,
        "files": {name: sha256_file(staging / name) for name in names},
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    dest.mkdir(parents=True, exist_ok=True)
    for name in (*names, MANIFEST):
        os.replace(staging / name, dest / name)
