"""The patch service: devices upload recent samples, get back signed patches for their artifact.

`PatchService` holds what every request reads (generator, artifacts' weight maps, signing key)
and turns a batch of parsed requests into patches with one generator call. `create_app` wraps it
in a Starlette ASGI app (endpoints, limits, auth, metrics); `serve` binds the socket and runs uvicorn with one
or more worker processes. The service is stateless, so replicas scale out behind any load
balancer (docs/serving.md).
"""
from __future__ import annotations

import gc
import hmac
import json
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from device_runtime import weight_map as wmap
from device_runtime.errors import MntoolError
from device_runtime.weight_map import WeightMap
from mntool.generate import Generator, SamplesError
from mntool.patches import build_patch, load_signing_key
from mntool.serve_batching import BatchConfig, BatchTimeout, MicroBatcher, Overloaded
from mntool.serve_metrics import ServiceMetrics
from mntool.serve_openapi import openapi_document

CONFIG_ENV = "MNTOOL_SERVE_CONFIG"  # how `serve` hands its config to worker processes
MAX_DEVICE_ID = 128
HEX = frozenset("0123456789abcdef")


class ServeError(MntoolError):
    """The service cannot start: a bad checkpoint, artifact, key or option."""


class RequestError(MntoolError):
    """A request the service refuses; `status` is the HTTP status, `code` a stable slug."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class ServeConfig:
    checkpoint: str
    artifacts: list[str]
    signing_key: str | None = None  # Ed25519 private key; None serves unsigned patches
    token: str | None = None  # bearer token devices must send; None turns auth off
    max_batch: int = 64  # requests per generator call (1 = no batching)
    max_wait_ms: float = 2.0  # how long a request may wait for others to share its batch
    max_queue: int = 1024  # waiting requests beyond this get 503 at once
    max_body_bytes: int = 16384  # a full upload (30 ids) is ~250 B
    max_samples: int | None = None  # item ids per upload; None = the checkpoint's recent_len
    request_timeout_s: float = 5.0  # a patch not ready by then is answered 503
    torch_threads: int = 1  # per worker process: on few cores, processes beat threads

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeConfig":
        return cls(**json.loads(text))

    @property
    def batching(self) -> BatchConfig:
        return BatchConfig(self.max_batch, self.max_wait_ms, self.max_queue)


@dataclass(frozen=True)
class ServedArtifact:
    path: Path
    weight_map: WeightMap

    def describe(self) -> dict:
        wm = self.weight_map
        return {"fingerprint": wm.fingerprint, "target": wm.target, "artifact": wm.artifact, "weight_map": wm.to_dict()}


@dataclass(frozen=True)
class PatchJob:
    """One parsed, validated request: which artifact, and the upload padded to (recent_len,)."""

    artifact: ServedArtifact
    recent: np.ndarray


@dataclass
class PatchService:
    """Everything a worker needs to answer patch requests; read-only after `load`."""

    config: ServeConfig
    generator: Generator
    artifacts: dict[str, ServedArtifact]  # by fingerprint
    signing_key: Ed25519PrivateKey | None
    max_samples: int
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)

    @classmethod
    def load(cls, config: ServeConfig) -> "PatchService":
        """Artifacts and key first (cheap), then the checkpoint, then their agreement."""
        if not config.artifacts:
            raise ServeError("give at least one --artifact to serve patches for")
        artifacts: dict[str, ServedArtifact] = {}
        for path in map(Path, config.artifacts):
            wm = wmap.load(path)
            if wm.fingerprint in artifacts:
                raise ServeError(f"{path} and {artifacts[wm.fingerprint].path} are the same artifact (fingerprint {wm.fingerprint[:12]})")
            artifacts[wm.fingerprint] = ServedArtifact(path, wm)
        key = load_signing_key(Path(config.signing_key)) if config.signing_key else None
        torch.set_num_threads(config.torch_threads)
        generator = Generator.load(config.checkpoint)
        for served in artifacts.values():
            shapes = {t.name: tuple(t.shape) for t in served.weight_map.tensors}
            if shapes != generator.shapes:
                raise ServeError(
                    f"{served.path} holds adaptive tensors {shapes}, but {config.checkpoint} generates {generator.shapes}: "
                    "export the artifact from this checkpoint"
                )
        max_samples = config.max_samples if config.max_samples is not None else generator.recent_len
        if not 1 <= max_samples <= generator.recent_len:
            raise ServeError(f"max samples must be 1..{generator.recent_len} (what {config.checkpoint} reads), got {max_samples}")
        return cls(config, generator, artifacts, key, max_samples)

    # ---- requests -------------------------------------------------------------------------------
    def parse(self, body: bytes) -> PatchJob:
        """Validate a POST /v1/patches body; RequestError (400/404/422) names the first problem."""
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, ValueError) as err:
            raise RequestError(400, "malformed_json", f"body is not valid JSON: {err}") from None
        except RecursionError:  # e.g. 8,000 nested brackets fit in the body limit
            raise RequestError(400, "malformed_json", "body nests JSON too deeply") from None
        if not isinstance(request, dict):
            raise RequestError(400, "malformed_request", "body must be a JSON object")
        device_id, fingerprint, samples = request.get("device_id"), request.get("fingerprint"), request.get("samples")
        if not isinstance(device_id, str) or not 1 <= len(device_id) <= MAX_DEVICE_ID:
            raise RequestError(400, "malformed_request", f"device_id must be a string of 1..{MAX_DEVICE_ID} characters")
        if not isinstance(fingerprint, str) or len(fingerprint) != 64 or not set(fingerprint) <= HEX:
            raise RequestError(400, "malformed_request", "fingerprint must be 64 lowercase hex digits (the artifact's weight-map fingerprint)")
        items = samples.get("items") if isinstance(samples, dict) else None
        if not isinstance(items, list):
            raise RequestError(400, "malformed_request", 'samples must be {"items": [item ids, most recent last]}')
        if len(items) > self.max_samples:
            raise RequestError(422, "too_many_samples", f"{len(items)} samples; this service takes at most {self.max_samples}")
        if not all(type(i) is int for i in items):
            raise RequestError(422, "bad_item_id", "samples.items must hold integer item ids only")
        artifact = self.artifacts.get(fingerprint)
        if artifact is None:
            raise RequestError(404, "unknown_fingerprint", f"no artifact with fingerprint {fingerprint[:12]}... is served here (GET /v1/artifacts)")
        try:
            recent = self.generator.check_recent(np.asarray(items, dtype=np.int64))
        except OverflowError:
            raise RequestError(422, "bad_item_id", f"an item id is outside the vocabulary 1..{self.generator.n_items}") from None
        except SamplesError as err:
            raise RequestError(422, "bad_item_id", str(err)) from None
        return PatchJob(artifact, recent[0])

    def build_patches(self, jobs: list[PatchJob]) -> list[bytes | Exception]:
        """One generator call for every job, then one patch per job (its own artifact's layout)."""
        params = self.generator.generate_batch(np.stack([job.recent for job in jobs]))
        patches: list[bytes | Exception] = []
        for i, job in enumerate(jobs):
            try:
                patches.append(build_patch(job.artifact.weight_map, {n: p[i] for n, p in params.items()}, self.signing_key))
            except MntoolError as err:
                patches.append(err)
        return patches

    def describe(self) -> list[dict]:
        return [a.describe() for a in self.artifacts.values()]


# ---- HTTP ---------------------------------------------------------------------------------------
def _error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


class _MetricsMiddleware:
    """Pure ASGI: counts every HTTP response by endpoint and status and times it."""

    def __init__(self, app, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(scope["path"], status[0], time.perf_counter() - started)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, "body_too_large", f"body of {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: PatchService) -> Starlette:
    """The ASGI app over a loaded service; its batcher runs while the app is up. Plain Starlette
    (FastAPI's core): FastAPI's extra layers cost ~0.1 ms per request and we use none of its
    validation on the hot path; the OpenAPI document is written out in `serve_openapi`."""
    cfg = service.config
    batcher: MicroBatcher[PatchJob, bytes] = MicroBatcher(service.build_patches, cfg.batching, service.metrics.observe_batch)
    service.metrics.queue_waiting = lambda: batcher.waiting
    document = openapi_document(service.generator.n_items, service.max_samples, MAX_DEVICE_ID, auth=bool(cfg.token))
    expected = cfg.token.encode() if cfg.token else None

    def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise RequestError(401, "unauthorized", "invalid bearer token")

    async def patches(request: Request) -> Response:
        authorize(request)
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "unsupported_media_type", f"content type must be application/json, got {content_type or 'none'!r}")
        try:
            body = await _read_body(request, cfg.max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is left to read it; counted in the metrics
        job = service.parse(body)
        try:
            patch = await batcher.submit(job, cfg.request_timeout_s)
        except Overloaded as err:
            raise RequestError(503, "overloaded", str(err)) from None
        except BatchTimeout:
            raise RequestError(503, "timeout", f"no patch within {cfg.request_timeout_s} s; retry shortly") from None
        return Response(patch, media_type="application/octet-stream")

    async def artifacts(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(service.describe())

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "pid": service.metrics.pid, "checkpoint": str(cfg.checkpoint),
                             "method": service.generator.method, "artifacts": len(service.artifacts),
                             "signed": service.signing_key is not None, "auth": bool(cfg.token)})

    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(document)

    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {"Retry-After": "1"} if err.status == 503 else None
        return _error_response(err.status, err.code, str(err), headers)

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error_response(err.status_code, "http_error", str(err.detail), err.headers)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        # torch and the checkpoint leave ~10^5 long-lived objects; a full collection walking them
        # stalls every request in flight for tens of ms (it showed as the p99). Freeze them once.
        gc.collect()
        gc.freeze()
        await batcher.start()
        yield
        await batcher.stop()

    return Starlette(
        routes=[
            Route("/v1/patches", patches, methods=["POST"]),
            Route("/v1/artifacts", artifacts, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        middleware=[Middleware(_MetricsMiddleware, metrics=service.metrics)],
        exception_handlers={RequestError: request_error, HTTPException: http_error},
        lifespan=lifespan,
    )


def app_from_env() -> Starlette:
    """uvicorn factory for worker processes: the config comes from $MNTOOL_SERVE_CONFIG."""
    return create_app(PatchService.load(ServeConfig.from_json(os.environ[CONFIG_ENV])))


# ---- running ------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one), bound before any worker starts so the
    printed address is the real one and clients connecting early simply wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    access_log: bool = False,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run the service until interrupted, in this process or in `workers` processes that each
    load the checkpoint. The socket is bound and the config validated here first (a bad option
    fails once, in one line, not in every worker); then `on_listening(url)` is told the address."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if workers < 1:
        raise ServeError(f"workers must be >= 1, got {workers}")
    sock = bind(host, port)
    service = PatchService.load(config)
    bound_host, bound_port = sock.getsockname()[:2]
    if on_listening is not None:
        on_listening(f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}")
    options = dict(loop="auto", http="auto", access_log=access_log, log_level="warning", timeout_keep_alive=30, lifespan="on")
    if workers == 1:
        uvicorn.Server(uvicorn.Config(create_app(service), **options)).run(sockets=[sock])
        return
    del service
    os.environ[CONFIG_ENV] = config.to_json()
    uv_config = uvicorn.Config("mntool.serve:app_from_env", factory=True, workers=workers, **options)
    Multiprocess(uv_config, sockets=[sock]).run()
