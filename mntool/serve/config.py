"""The service's configuration: every knob of `mntool serve` with its default (the CLI's defaults
are these), handed to worker processes as JSON. Light on purpose: no torch, so `--help` is fast."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from mntool.patches import DEFAULT_TTL_S
from mntool.serve.batching import BatchConfig


@dataclass
class ServeConfig:
    checkpoint: str
    artifacts: list[str]
    signing_key: str | None = None  # Ed25519 private key (the online key); None serves unsigned patches
    key_list: str | None = None  # the root-signed key list certifying signing_key (mntool certify)
    patch_ttl_s: float = DEFAULT_TTL_S  # each patch expires this long after it is built
    token: str | None = None  # bearer token devices must send; None turns auth off
    max_batch: int = 64  # requests per generator call (1 = no batching)
    max_wait_ms: float = 2.0  # how long a request may wait for others to share its batch
    max_queue: int = 1024  # waiting requests beyond this get 503 at once
    max_body_bytes: int | None = None  # None = the task's: 16384 for item ids (30 are ~250 B), 4096 per image + 1024
    max_samples: int | None = None  # item ids (images) per upload; None = what the checkpoint reads
    request_timeout_s: float = 5.0  # a patch not ready by then is answered 503
    torch_threads: int = 1  # per worker process: on few cores, processes beat threads
    # further [checkpoint, artifact] pairs (`--also`): each artifact served with patches from its own checkpoint
    also: list[list[str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        return cls(**json.loads(text))

    @property
    def batching(self) -> BatchConfig:
        return BatchConfig(self.max_batch, self.max_wait_ms, self.max_queue)
