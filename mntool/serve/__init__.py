"""`mntool serve`, the HTTP patch service, as a package (docs/serving.md):

- `app`: the service (`PatchService`), its Starlette app and `serve` (uvicorn, worker processes);
- `config`: `ServeConfig`, every knob and its default;
- `batching`: micro-batching (torch-free); `metrics`: Prometheus metrics, every worker in one scrape;
- `openapi`: the OpenAPI document; `routes`: the URL paths;
- `process`: the real server as a child process, for tests, benchmarks and examples.

Names load on first use, so importing the package (or `mntool.serve.config`) does not load torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "PatchJob": "app",
    "PatchService": "app",
    "RequestError": "app",
    "ServeError": "app",
    "create_app": "app",
    "serve": "app",
    "ServeConfig": "config",
    "ServerProcess": "process",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'mntool.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mntool.serve.{_HOMES[name]}"), name)
