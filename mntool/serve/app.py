"""The patch service: devices upload recent samples, get back signed patches for their artifact.

`PatchService` holds what every request reads (generators, artifacts' weight maps, signing key)
and turns a batch of parsed requests into patches with one generator call per generator and upload
size, each request failing alone. A service may serve artifacts of several checkpoints (model
versions, e.g. the old and the new cloud model while devices move over): each artifact is
explicitly paired with the checkpoint whose generator makes its patches, and a request is routed
by its artifact's fingerprint. What an upload is (item ids, images) and how it is checked belong to the
served checkpoint's task (`mntool.tasks`: `parse_upload`, `upload_schema`, `upload_body_bytes`).
`create_app` wraps it in a Starlette ASGI app (endpoints, limits, auth, JSON errors,
metrics); `serve` binds the socket and runs uvicorn with one or more worker processes. The
service is stateless, so replicas scale out behind any load balancer (docs/serving.md).
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from device_runtime import weight_map as wmap
from device_runtime.errors import MntoolError
from device_runtime.patch import Signer
from device_runtime.weight_map import WeightMap
from mntool.generate import Generator
from mntool.patches import build_patch, load_signer
from mntool.serve import routes
from mntool.serve.batching import BatchTimeout, MicroBatcher, Overloaded
from mntool.serve.config import ServeConfig
from mntool.serve.metrics import CONTENT_TYPE, MULTIPROC_ENV, ServiceMetrics
from mntool.serve.openapi import openapi_document
from mntool.tasks import SamplesError

CONFIG_ENV = "MNTOOL_SERVE_CONFIG"  # how `serve` hands its config to worker processes
MAX_DEVICE_ID = 128
HEX = frozenset("0123456789abcdef")
log = logging.getLogger(__name__)


class ServeError(MntoolError):
    """The service cannot start: a bad checkpoint, artifact, key or option."""


class RequestError(MntoolError):
    """A request the service refuses; `status` is the HTTP status, `code` a stable slug."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ServedArtifact:
    path: Path
    weight_map: WeightMap
    checkpoint: str  # the checkpoint whose generator makes this artifact's patches, as given
    generator: Generator = field(repr=False, compare=False)

    def describe(self) -> dict:
        wm = self.weight_map
        return {
            "fingerprint": wm.fingerprint,
            "target": wm.target,
            "artifact": wm.artifact,
            "checkpoint": self.checkpoint,
            "weight_map": wm.to_dict(),
        }


@dataclass(frozen=True)
class PatchJob:
    """One parsed, validated request: which artifact, and the upload as the task's `parse_upload`
    returns it (recommender: item ids left-padded with 0 to recent_len; images: (K, 28, 28) uint8)."""

    artifact: ServedArtifact
    recent: list[int] | np.ndarray
    device_id: str  # the patch is bound to it


@dataclass
class PatchService:
    """Everything a worker needs to answer patch requests; read-only after `load`. `generator` is
    the main checkpoint's (`config.checkpoint`); `generators` holds every served checkpoint's, by
    the checkpoint path as given, and each artifact names its own (`ServedArtifact.generator`)."""

    config: ServeConfig
    generator: Generator
    artifacts: dict[str, ServedArtifact]  # by fingerprint
    signer: Signer | None
    max_samples: int
    max_body_bytes: int
    generators: dict[str, Generator]
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)

    @classmethod
    def load(cls, config: ServeConfig) -> PatchService:
        """Artifacts and key first (cheap), then the checkpoints, then their agreement. `config.also`:
        further (checkpoint, artifact) pairs (`mntool serve --also`), each artifact served with
        patches from the checkpoint it is paired with."""
        if not config.artifacts:
            raise ServeError("give at least one --artifact to serve patches for")
        main = str(config.checkpoint)
        pairs = [(main, Path(a)) for a in config.artifacts] + [(str(c), Path(a)) for c, a in config.also]
        maps: dict[str, tuple[str, Path, WeightMap]] = {}  # fingerprint -> (checkpoint, artifact, weight map)
        for checkpoint, path in pairs:
            wm = wmap.load(path)
            if wm.fingerprint in maps:
                other_checkpoint, other_path, _ = maps[wm.fingerprint]
                if other_checkpoint == checkpoint:
                    raise ServeError(
                        f"{path} and {other_path} are the same artifact (fingerprint {wm.fingerprint[:12]})"
                    )
                raise ServeError(
                    f"{path} (for {checkpoint}) and {other_path} (for {other_checkpoint}) are the same artifact "
                    f"(fingerprint {wm.fingerprint[:12]}): a device names its model by fingerprint, so one fingerprint "
                    "gets its patches from one checkpoint"
                )
            maps[wm.fingerprint] = (checkpoint, path, wm)
        if config.key_list and not config.signing_key:
            raise ServeError("--key-list certifies a signing key: give --signing-key too")
        key = (
            load_signer(Path(config.signing_key), Path(config.key_list) if config.key_list else None)
            if config.signing_key
            else None
        )
        torch.set_num_threads(config.torch_threads)
        generators: dict[str, Generator] = {}
        loaded: dict[Path, Generator] = {}  # one generator per checkpoint directory, however it is spelt
        for checkpoint in dict.fromkeys(c for c, _ in pairs):
            resolved = Path(checkpoint).resolve()
            if resolved not in loaded:
                loaded[resolved] = Generator.load(checkpoint)
            generators[checkpoint] = loaded[resolved]
        generator = generators[main]
        for checkpoint, other in generators.items():
            _check_same_uploads(main, generator, checkpoint, other)
        artifacts: dict[str, ServedArtifact] = {}
        for fingerprint, (checkpoint, path, wm) in maps.items():
            paired = generators[checkpoint]
            shapes = {t.name: tuple(t.shape) for t in wm.tensors}
            if shapes != paired.shapes:
                raise ServeError(
                    f"{path} holds adaptive tensors {shapes}, but {checkpoint} generates {paired.shapes}: "
                    "export the artifact from this checkpoint"
                )
            artifacts[fingerprint] = ServedArtifact(path, wm, checkpoint, paired)
        max_samples = config.max_samples if config.max_samples is not None else generator.max_samples
        if not 1 <= max_samples <= generator.max_samples:
            raise ServeError(
                f"max samples must be 1..{generator.max_samples} (what {config.checkpoint} reads), got {max_samples}"
            )
        max_body = config.max_body_bytes
        if max_body is None:
            max_body = generator.task.upload_body_bytes(max_samples)
        service = cls(config, generator, artifacts, key, max_samples, max_body, generators)
        service.metrics.serve_fingerprints(artifacts)
        return service

    # ---- requests -------------------------------------------------------------------------------
    def parse(self, body: bytes) -> PatchJob:
        """Validate a POST /v1/patches body; RequestError (400/404/422) names the first problem.
        The `samples` are the task's to check (`parse_upload`): its "malformed_request" is a 400,
        any other of its codes a 422. Nothing unchecked reaches the generator."""
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, ValueError) as err:
            raise RequestError(400, "malformed_json", f"body is not valid JSON: {err}") from None
        except RecursionError:  # e.g. 8,000 nested brackets fit in the body limit
            raise RequestError(400, "malformed_json", "body nests JSON too deeply") from None
        if type(request) is not dict:
            raise RequestError(400, "malformed_request", "body must be a JSON object")
        device_id, fingerprint = request.get("device_id"), request.get("fingerprint")
        if type(device_id) is not str or not 1 <= len(device_id) <= MAX_DEVICE_ID:
            raise RequestError(400, "malformed_request", f"device_id must be a string of 1..{MAX_DEVICE_ID} characters")
        artifact = self.artifacts.get(fingerprint) if type(fingerprint) is str else None  # a served one is well-formed
        if artifact is None and (type(fingerprint) is not str or len(fingerprint) != 64 or not set(fingerprint) <= HEX):
            raise RequestError(
                400,
                "malformed_request",
                "fingerprint must be 64 lowercase hex digits (the artifact's weight-map fingerprint)",
            )
        # Every served checkpoint reads the same uploads (checked at start); an unknown fingerprint's
        # samples are checked by the main one's task, so a bad upload is a 4xx before the 404.
        generator = self.generator if artifact is None else artifact.generator
        try:
            upload = generator.task.parse_upload(generator.checkpoint, request.get("samples"), self.max_samples)
        except SamplesError as err:
            code = err.code
            raise RequestError(400 if code == "malformed_request" else 422, code, str(err)) from None
        if artifact is None:
            raise RequestError(
                404,
                "unknown_fingerprint",
                f"no artifact with fingerprint {fingerprint[:12]}... is served here (GET {routes.ARTIFACTS})",
            )
        return PatchJob(artifact, upload, device_id)

    def build_patches(self, jobs: list[PatchJob]) -> list[bytes | Exception]:
        """One generator call for every job of one generator and one upload size (a micro-batch is
        split by the checkpoint its artifacts are paired with, never mixing two generators in one
        call; the recommender pads every upload to one size; image uploads hold 1..max_samples
        images, and a batch stacks uploads of one K), then one patch per job (its own artifact's
        layout). Failures stay with their request: if a batched call raises, each of its jobs is
        retried alone, and a job whose generation or patch fails gets a RequestError (500), the
        others their patches."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((id(job.artifact.generator), len(job.recent)), []).append(i)
        if len(groups) == 1:
            return self._build_patches(jobs)
        results: list = [None] * len(jobs)
        for positions in groups.values():
            for i, result in zip(positions, self._build_patches([jobs[i] for i in positions])):
                results[i] = result
        return results

    def _build_patches(self, jobs: list[PatchJob]) -> list[bytes | Exception]:
        """`build_patches` for jobs of one generator whose uploads have one size."""
        generator = jobs[0].artifact.generator
        try:
            params = generator.generate_batch(np.array([job.recent for job in jobs]))
        except Exception as err:
            if len(jobs) > 1:
                return [result for job in jobs for result in self._build_patches([job])]
            return [_internal("generation_failed", "generating this upload's parameters failed", err)]
        patches: list[bytes | Exception] = []
        for i, job in enumerate(jobs):
            try:
                patches.append(
                    build_patch(
                        job.artifact.weight_map,
                        {n: p[i] for n, p in params.items()},
                        self.signer,
                        device_id=job.device_id,
                        ttl_s=self.config.patch_ttl_s,
                    )
                )
            except Exception as err:
                patches.append(_internal("patch_failed", "building this upload's patch failed", err))
            else:
                self.metrics.observe_patch(job.artifact.weight_map.fingerprint)
        return patches

    def describe(self) -> list[dict]:
        return [a.describe() for a in self.artifacts.values()]

    def checkpoints(self) -> list[dict]:
        """Every served checkpoint: its method and how many artifacts it serves (GET /v1/status)."""
        return [
            {
                "checkpoint": checkpoint,
                "method": generator.method,
                "artifacts": sum(a.checkpoint == checkpoint for a in self.artifacts.values()),
            }
            for checkpoint, generator in self.generators.items()
        ]


def _check_same_uploads(main: str, generator: Generator, checkpoint: str, other: Generator) -> None:
    """Devices upload one way to one server: every checkpoint it serves must read the same uploads
    (task, samples per upload, their schema: e.g. the item vocabulary) as the main one."""
    if other is generator:
        return
    if other.task.NAME != generator.task.NAME:
        raise ServeError(
            f"{checkpoint} is a {other.task.NAME} checkpoint and {main} a {generator.task.NAME} one: "
            "one server serves one task"
        )
    if other.max_samples != generator.max_samples:
        raise ServeError(
            f"{checkpoint} reads uploads of {other.max_samples} samples and {main} of {generator.max_samples}: "
            "the checkpoints one server serves must read the same uploads"
        )
    limit = generator.max_samples
    if other.task.upload_schema(other.checkpoint, limit) != generator.task.upload_schema(generator.checkpoint, limit):
        raise ServeError(
            f"{checkpoint} and {main} read different uploads (their schemas differ, e.g. the item vocabulary: "
            f"{getattr(other.checkpoint, 'n_items', '?')} vs {getattr(generator.checkpoint, 'n_items', '?')} items): "
            "the checkpoints one server serves must read the same uploads"
        )


def _internal(code: str, what: str, err: Exception) -> RequestError:
    """A 500 for one request: the cause goes to the server log, the device gets one line."""
    log.error("%s: %s", what, err, exc_info=err)
    detail = f": {err}" if isinstance(err, MntoolError) else f" ({type(err).__name__}; see the server log)"
    return RequestError(500, code, f"{what}{detail}".splitlines()[0])


# ---- HTTP ---------------------------------------------------------------------------------------
def _error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _error_headers(err: RequestError) -> dict[str, str]:
    return {"WWW-Authenticate": "Bearer"} if err.status == 401 else {"Retry-After": "1"} if err.status == 503 else {}


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


class _ClientGone(Exception):
    """The client closed the connection before its request was answered."""


class _PatchRoute:
    """POST /v1/patches as plain ASGI in front of the Starlette app, which answers every other
    path. The hot path skips Starlette's request, routing, exception-middleware and response
    objects (benchmarks/serve_profile.py sets its cost beside GET /healthz through Starlette)."""

    def __init__(self, app, answer: Callable) -> None:
        self.app, self.answer = app, answer  # answer(headers, receive) -> patch bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != routes.PATCHES:
            await self.app(scope, receive, send)
            return
        try:
            if scope["method"] != "POST":
                raise RequestError(405, "http_error", "Method Not Allowed")
            patch = await self.answer(dict(scope["headers"]), receive)
        except RequestError as err:
            headers = {**_error_headers(err), **({"Allow": "POST"} if err.status == 405 else {})}
            await _send(send, err.status, "application/json", _error_json(err.code, str(err)), headers)
        except _ClientGone:
            await _send(send, 499, "text/plain", b"")  # nobody reads it; counted in the metrics
        except Exception as err:
            log.error("POST %s failed", routes.PATCHES, exc_info=err)
            await _send(
                send,
                500,
                "application/json",
                _error_json("internal_error", f"the server failed on this request ({type(err).__name__}; see its log)"),
            )
        else:
            await _send(send, 200, "application/octet-stream", patch)


def _error_json(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode()


async def _send(send, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _read_body(declared: bytes | None, receive, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes."""
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, "body_too_large", f"body of {declared.decode('latin-1')} bytes; the limit is {limit}")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def create_app(service: PatchService):
    """The ASGI app over a loaded service; its batcher runs while the app is up. POST /v1/patches
    is plain ASGI (`_PatchRoute`), the other endpoints a Starlette app: we read and check the raw
    body ourselves, and the OpenAPI document is written out in `openapi`. Every answer that is
    not a patch is JSON, unexpected exceptions included (500)."""
    cfg = service.config
    batcher: MicroBatcher[PatchJob, bytes] = MicroBatcher(
        service.build_patches, cfg.batching, service.metrics.observe_batch
    )
    service.metrics.queue_waiting = lambda: batcher.waiting
    generator = service.generator
    document = openapi_document(
        generator.task.upload_schema(generator.checkpoint, service.max_samples),
        MAX_DEVICE_ID,
        auth=bool(cfg.token),
        task=generator.task.NAME,
    )
    expected = cfg.token.encode() if cfg.token else None

    def authorize(header: str) -> None:
        """`header`: the request's Authorization value."""
        if expected is None:
            return
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise RequestError(401, "unauthorized", "invalid bearer token")

    async def patch(headers: dict[bytes, bytes], receive) -> bytes:
        authorize(headers.get(b"authorization", b"").decode("latin-1"))
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(
                415, "unsupported_media_type", f"content type must be application/json, got {content_type or 'none'!r}"
            )
        job = service.parse(await _read_body(headers.get(b"content-length"), receive, service.max_body_bytes))
        try:
            return await batcher.submit(job, cfg.request_timeout_s)
        except Overloaded as err:
            raise RequestError(503, "overloaded", str(err)) from None
        except BatchTimeout:
            raise RequestError(503, "timeout", f"no patch within {cfg.request_timeout_s} s; retry shortly") from None

    async def artifacts(request: Request) -> JSONResponse:
        authorize(request.headers.get("authorization", ""))
        return JSONResponse(service.describe())

    async def status(request: Request) -> JSONResponse:
        authorize(request.headers.get("authorization", ""))
        return JSONResponse(
            {
                "status": "ok",
                "pid": service.metrics.pid,
                "checkpoint": str(cfg.checkpoint),
                "task": service.generator.task.NAME,
                "method": service.generator.method,
                "artifacts": len(service.artifacts),
                "checkpoints": service.checkpoints(),
                "signed": service.signer is not None,
                "auth": bool(cfg.token),
            }
        )

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})  # liveness only, for anyone: the details are at /v1/status

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(document)

    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return _error_response(err.status, err.code, str(err), _error_headers(err))

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error_response(err.status_code, "http_error", str(err.detail), err.headers)

    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer is sent.
        return _error_response(
            500, "internal_error", f"the server failed on this request ({type(err).__name__}; see its log)"
        )

    @asynccontextmanager
    async def lifespan(app: Starlette):
        # torch and the checkpoint leave ~10^5 long-lived objects; a full collection walking them
        # stalls every request in flight for tens of ms (it showed as the p99). Freeze them once.
        gc.collect()
        gc.freeze()
        await batcher.start()
        yield
        await batcher.stop()

    others = Starlette(
        routes=[
            Route(routes.ARTIFACTS, artifacts, methods=["GET"]),
            Route(routes.STATUS, status, methods=["GET"]),
            Route(routes.HEALTHZ, healthz, methods=["GET"]),
            Route(routes.METRICS, metrics, methods=["GET"]),
            Route(routes.OPENAPI, openapi, methods=["GET"]),
        ],
        exception_handlers={RequestError: request_error, HTTPException: http_error, Exception: unexpected},
        lifespan=lifespan,
    )
    return _MetricsMiddleware(_PatchRoute(others, patch), service.metrics)


def app_from_env():
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
    load the checkpoints. The socket is bound and the config validated here first (a bad option
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
    options = dict(
        loop="auto", http="auto", access_log=access_log, log_level="warning", timeout_keep_alive=30, lifespan="on"
    )
    if workers == 1:
        uvicorn.Server(uvicorn.Config(create_app(service), **options)).run(sockets=[sock])
        return
    del service
    uv_config = uvicorn.Config("mntool.serve.app:app_from_env", factory=True, workers=workers, **options)
    # The workers' metrics meet in a directory of this server's own (docs/serving.md, Metrics).
    with tempfile.TemporaryDirectory(prefix="mntool-metrics-") as shared:
        os.environ[CONFIG_ENV] = config.to_json()
        os.environ[MULTIPROC_ENV] = shared
        Multiprocess(uv_config, sockets=[sock]).run()
