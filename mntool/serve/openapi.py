"""The patch service's OpenAPI 3.1 document, written out: the contract a device team codes against.

Served at /openapi.json. The upload (`samples`) is described by the served checkpoint's task
(`upload_schema`: item ids for the recommender, images for mnist) with the running service's own
limits (max samples, vocabulary size), and the bearer security scheme appears when auth is on.
"""

from __future__ import annotations

from device_runtime.weight_map import TARGETS
from mntool.serve import routes

ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "stable slug, e.g. unknown_fingerprint"},
        "message": {"type": "string", "description": "one line naming the cause"},
    },
}

ARTIFACT = {
    "type": "object",
    "required": ["fingerprint", "target", "artifact", "checkpoint", "weight_map"],
    "properties": {
        "fingerprint": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "target": {"type": "string", "enum": list(TARGETS)},
        "artifact": {"type": "string", "description": "the artifact's file (or .mlpackage) name"},
        "checkpoint": {
            "type": "string",
            "description": "the checkpoint (model version) whose generator makes this artifact's patches",
        },
        "weight_map": {"type": "object", "description": "the artifact's weight map (docs/weight-map.md)"},
    },
}

HEALTH = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}

STATUS = {
    "type": "object",
    "required": ["status", "pid", "checkpoint", "task", "method", "artifacts", "checkpoints", "signed", "auth"],
    "properties": {
        "status": {"const": "ok"},
        "pid": {"type": "integer"},
        "checkpoint": {"type": "string", "description": "the main checkpoint (`mntool serve CHECKPOINT`)"},
        "task": {
            "type": "string",
            "description": "what the checkpoint's devices upload: movielens (item ids), mnist (images)",
        },
        "method": {"type": "string", "description": "the main checkpoint's method"},
        "artifacts": {"type": "integer", "description": "artifacts served, of every checkpoint"},
        "checkpoints": {
            "type": "array",
            "description": "every checkpoint served (the main one first, then those of --also)",
            "items": {
                "type": "object",
                "required": ["checkpoint", "method", "artifacts"],
                "properties": {
                    "checkpoint": {"type": "string"},
                    "method": {"type": "string"},
                    "artifacts": {"type": "integer"},
                },
            },
        },
        "signed": {"type": "boolean"},
        "auth": {"type": "boolean"},
    },
}


def _errors(*statuses: int) -> dict:
    why = {
        400: "malformed request",
        401: "missing or invalid bearer token",
        404: "unknown fingerprint",
        413: "body too large",
        415: "content type is not application/json",
        422: "the samples break a limit: too many (or, for images, no) samples, an item id outside the vocabulary, "
        "an image not 28x28, a pixel not an integer 0..255, bad base64",
        500: "this request's patch could not be made (the server logs why); other requests are not affected",
        503: "overloaded or timed out; retry",
    }
    return {
        str(s): {
            "description": why[s],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for s in statuses
    }


def openapi_document(samples: dict, max_device_id: int, auth: bool, task: str) -> dict:
    """The document for a service whose uploads (`samples`) have the JSON schema `samples` (the
    served checkpoint's task's `upload_schema`)."""
    security = [{"bearer": []}] if auth else []
    patch_request = {
        "type": "object",
        "required": ["device_id", "fingerprint", "samples"],
        "properties": {
            "device_id": {"type": "string", "minLength": 1, "maxLength": max_device_id},
            "fingerprint": {
                "type": "string",
                "pattern": "^[0-9a-f]{64}$",
                "description": "weight-map fingerprint of the device's artifact (GET /v1/artifacts)",
            },
            "samples": samples,
        },
    }

    def json_ok(description: str, schema: dict) -> dict:
        return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}

    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "mntool patch service",
            "version": "1",
            "description": "Devices upload their recent samples and receive a signed patch for their compiled "
            f"model (docs/serving.md, docs/patch-format.md). This service's checkpoints are of task {task}.",
        },
        "paths": {
            routes.PATCHES: {
                "post": {
                    "summary": "A patch for the device's artifact, generated from its recent samples",
                    "operationId": "create_patch",
                    "security": security,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PatchRequest"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "the patch (docs/patch-format.md)",
                            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                        },
                        **_errors(400, 401, 404, 413, 415, 422, 500, 503),
                    },
                }
            },
            routes.ARTIFACTS: {
                "get": {
                    "summary": "The artifacts served: fingerprint, target, the checkpoint serving it, weight map",
                    "operationId": "list_artifacts",
                    "security": security,
                    "responses": {
                        **json_ok(
                            "served artifacts", {"type": "array", "items": {"$ref": "#/components/schemas/Artifact"}}
                        ),
                        **_errors(401),
                    },
                }
            },
            routes.STATUS: {
                "get": {
                    "summary": "What the answering worker serves: pid, checkpoint, method, artifacts, signed, auth",
                    "operationId": "status",
                    "security": security,
                    "responses": {**json_ok("worker status", STATUS), **_errors(401)},
                }
            },
            routes.HEALTHZ: {
                "get": {
                    "summary": "Liveness: 200 once the answering worker has loaded its checkpoint",
                    "operationId": "health",
                    "responses": json_ok("alive", HEALTH),
                }
            },
            routes.METRICS: {
                "get": {
                    "summary": "Prometheus metrics of the whole server (every worker)",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "exposition format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            routes.OPENAPI: {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "responses": json_ok("OpenAPI 3.1", {"type": "object"}),
                }
            },
        },
        "components": {"schemas": {"PatchRequest": patch_request, "Error": ERROR, "Artifact": ARTIFACT}},
    }
    if auth:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "the token given to `mntool serve --token`"}
        }
    return document
