"""The service's URL paths: their one home, read by the app, its OpenAPI document and its metric
labels. The device side keeps its own `device_runtime.client.PATCHES_PATH` (it never imports
`mntool`); tests/test_serve.py checks that the two agree."""

from __future__ import annotations

PATCHES = "/v1/patches"
ARTIFACTS = "/v1/artifacts"
STATUS = "/v1/status"
HEALTHZ = "/healthz"
METRICS = "/metrics"
OPENAPI = "/openapi.json"
ALL = (PATCHES, ARTIFACTS, STATUS, HEALTHZ, METRICS, OPENAPI)
