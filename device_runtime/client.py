"""The device's client of `mntool serve`: upload recent samples, get a patch, apply it, reload.

The upload is the device's recent item ids (a recommender) or its recent images (an image
classifier: a (K, 28, 28) uint8 array or nested lists, sent as base64; `samples_json`).

`refresh` asks the service for a patch for the local artifact (by its weight-map fingerprint),
verifies it (signature through the root key's key list, or the server's key; expiry, device,
sequence), writes it into the artifact crash-safely (`install.apply_patch_file`: A/B slots) and
opens a fresh runner on the patched model. Standard-library HTTP only; 5xx answers, timeouts and refused connections are
retried with exponential backoff, 4xx answers are final. A patch that fails any check is never
applied: the artifact stays byte-identical.

The bearer token never leaves the server's origin: the URL must be https (plain http only to a
loopback host), and redirects are not followed (a 3xx answer is a ClientError naming its target).
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_runtime import weight_map as wmap
from device_runtime.errors import MntoolError
from device_runtime.install import apply_patch_file
from device_runtime.patch import Patch, TrustPolicy
from device_runtime.runners import Runner, RunnerConfig, open_runner
from device_runtime.signing import load_public_key

PATCHES_PATH = "/v1/patches"
IMAGE_SHAPE = (28, 28)  # the image task's images (mntool.tasks.mnist.IMAGE_SHAPE; the server checks it too)
Upload = Sequence[int] | Sequence[Sequence[Sequence[int]]] | np.ndarray  # item ids, or (K, 28, 28) images


class ClientError(MntoolError):
    """The server URL is not https (nor loopback http), the service refused the request (3xx, 4xx),
    or it could not be reached after every retry."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ClientConfig:
    timeout_s: float = 5.0  # per attempt: connect + answer
    retries: int = 3  # further attempts after 5xx, timeouts and connection errors
    backoff_s: float = 0.2  # wait before the first retry; doubles each time, plus up to 25% jitter
    max_backoff_s: float = 5.0  # cap on one wait (also on a server's Retry-After)
    max_patch_bytes: int = 64 << 20  # a larger answer is refused unread


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Makes every 3xx an HTTPError: urllib would otherwise re-send the Authorization header to
    wherever the redirect points (another host, or https -> http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _check_server_url(server_url: str) -> None:
    """Refuse, before connecting, a URL the token must not travel to: anything but https, except
    http to a loopback host (localhost, 127.0.0.0/8, ::1)."""
    parts = urllib.parse.urlsplit(server_url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and _is_loopback(host):
        return
    raise ClientError(f"server URL {server_url!r} must be https:// (plain http:// only to a loopback host)")


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Refresh:
    """What one refresh did: the verified patch it applied and the runner on the patched model."""

    runner: Runner
    patch: Patch
    attempts: int  # HTTP attempts it took (1 = no retry)
    fetch_seconds: float  # upload -> patch received, retries included
    apply_seconds: float  # verify + crash-safe write + runner reload


def samples_json(upload: Upload) -> dict:
    """The request's `samples` for a device's upload: `{"items": [ids]}` for recent item ids (a
    1-D sequence of integers, most recent last), `{"images_b64": "..."}` for recent images (a
    (K, 28, 28) array or nested lists of integer pixels 0..255, most recent last: the C-order
    uint8 bytes, base64). Images of another shape, non-integer or out-of-range pixels are a
    ClientError here, before anything is sent."""
    if isinstance(upload, np.ndarray):
        arr = upload
    elif isinstance(upload, (list, tuple)) and len(upload) and isinstance(upload[0], (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(upload)
        except ValueError as err:
            raise ClientError(f"images must be a (K, 28, 28) array of pixels: {err}".splitlines()[0]) from None
    else:
        return {"items": [int(i) for i in upload]}
    if arr.ndim == 1:
        return {"items": [int(i) for i in arr]}
    if arr.ndim != 3 or arr.shape[1:] != IMAGE_SHAPE:
        raise ClientError(f"images must be a (K, 28, 28) array (K images, most recent last), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise ClientError(f"image pixels must be integers 0..255 (uint8), got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ClientError(f"image pixels must be 0..255, got {arr.min()}..{arr.max()}")
    pixels = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    return {"images_b64": base64.b64encode(pixels).decode("ascii")}


def fetch_patch(
    server_url: str,
    fingerprint: str,
    upload: Upload,
    *,
    device_id: str,
    token: str | None = None,
    config: ClientConfig = ClientConfig(),
) -> tuple[bytes, int]:
    """POST the upload (item ids or images, see `samples_json`) to `server_url`/v1/patches;
    returns (patch bytes, attempts). Unverified: the caller must verify before use (`refresh` does)."""
    _check_server_url(server_url)
    body = json.dumps({"device_id": device_id, "fingerprint": fingerprint, "samples": samples_json(upload)}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = server_url.rstrip("/") + PATCHES_PATH
    wait = config.backoff_s
    for attempt in range(1, config.retries + 2):
        try:
            with _OPENER.open(urllib.request.Request(url, body, headers), timeout=config.timeout_s) as answer:
                data = answer.read(config.max_patch_bytes + 1)
            if len(data) > config.max_patch_bytes:
                raise ClientError(f"{url} sent more than {config.max_patch_bytes} bytes; refusing it as a patch")
            return data, attempt
        except urllib.error.HTTPError as err:
            if 300 <= err.code < 400:
                raise ClientError(
                    f"{url} redirects ({err.code}) to {err.headers.get('Location')!r}; redirects are not followed "
                    "(point the client at the final URL)",
                    err.code,
                ) from None
            message = _error_message(err)
            if err.code < 500:
                raise ClientError(f"{url} refused the request ({err.code}): {message}", err.code) from None
            failure, retry_after = f"{err.code}: {message}", _retry_after(err)
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            failure, retry_after = f"{type(reason).__name__}: {reason}", None
        if attempt > config.retries:
            break
        pause = retry_after if retry_after is not None else wait * (1 + 0.25 * random.random())
        time.sleep(min(pause, config.max_backoff_s))
        wait *= 2
    raise ClientError(f"{url} failed {config.retries + 1} times; last: {failure}")


def _error_message(err: urllib.error.HTTPError) -> str:
    """The service's one-line message from its JSON error body, else the HTTP reason."""
    try:
        return json.loads(err.read(65536))["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return str(err.reason)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    try:
        return max(0.0, float(err.headers.get("Retry-After", "")))
    except ValueError:
        return None


def refresh(
    server_url: str,
    artifact: Path | str,
    upload: Upload,
    *,
    verify_key: bytes | Path | str | None = None,
    root_key: bytes | Path | str | None = None,
    token: str | None = None,
    device_id: str = "device",
    config: ClientConfig = ClientConfig(),
    runner_config: RunnerConfig = RunnerConfig(),
    on_reload: Callable[[Runner], None] | None = None,
) -> Refresh:
    """Fetch a patch for `artifact` from the device's `upload` (its recent item ids, or its
    recent images as a (K, 28, 28) uint8 array or nested lists; most recent last), verify it (`root_key`: the root public key whose key list certifies the server's online key; or
    `verify_key`: the server's own public key; each raw 32 bytes or a .pub/raw key file), check
    it is fresh, for `device_id` and newer than the last one applied, write it into `artifact`
    in place (A/B slots) and return a runner on the patched model (also passed to `on_reload`).
    Unsigned, forged, altered, expired, replayed or misdirected patches raise and leave
    `artifact` untouched."""
    if (verify_key is None) == (root_key is None):
        raise ClientError("give exactly one of verify_key and root_key: a patch is applied only if signed")
    artifact = Path(artifact)
    policy = TrustPolicy(verify_key=_raw_key(verify_key), root_key=_raw_key(root_key), device_id=device_id)
    weight_map = wmap.load(artifact, check_fingerprint=False)
    started = time.perf_counter()
    data, attempts = fetch_patch(
        server_url, weight_map.fingerprint, upload, device_id=device_id, token=token, config=config
    )
    fetched = time.perf_counter()
    patch = apply_patch_file(artifact, data, policy=policy, weight_map=weight_map)
    runner = open_runner(artifact, weight_map=weight_map, config=runner_config)
    if on_reload is not None:
        on_reload(runner)
    return Refresh(runner, patch, attempts, fetched - started, time.perf_counter() - fetched)


def _raw_key(key: bytes | Path | str | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return load_public_key(Path(key))
