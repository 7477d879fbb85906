"""Hot swap in memory, O(patch): two private copies of an artifact's files (A and B, like the
on-disk slots of `device_runtime.install`). A swap verifies a patch, writes only its bytes into
the copy that no live runner reads, and opens a runner on that copy.

Why private `bytes` written through ctypes: the Python bindings of LiteRT (`model_content`) and
ONNX Runtime (model bytes, external files in memory) accept only immutable `bytes`, which they
read in place without copying. Patching a `bytearray` and converting it copies the whole model
on every swap (twice, counting the copy that made it mutable), which costs more than loading the
model. A phone app keeps one mutable buffer per slot; here each slot is a `bytes` object that
only this class holds (never hashed, shared or returned) and writes in place, and only while no
runner reads it: a swap first closes the runner of two swaps ago if the app has not released
it (`release_previous`) already.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from device_runtime import weight_map as wmap
from device_runtime.patch import DeviceState, Patch, TrustPolicy, frozen_bytes, verify_patch
from device_runtime.runners import Runner, RunnerConfig, open_runner
from device_runtime.weight_map import WeightMap

_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = [ctypes.py_object]


def _private_copy(data: bytes | bytearray | memoryview) -> bytes:
    """A new `bytes` object no one else refers to (`bytes(b)` of a `bytes` would return `b`
    itself). Only files holding adaptive tensors are ever written, and those have at least 2
    bytes, so CPython's shared 0- and 1-byte objects are never among them."""
    return bytes(bytearray(data))


def _write(target: bytes, offset: int, source: memoryview) -> None:
    """Copy `source` into the private `target` at `offset` (bounds checked by the caller)."""
    src = np.frombuffer(source, np.uint8)
    ctypes.memmove(_bytes_address(target) + offset, src.ctypes.data, src.nbytes)


class HotSwap:
    """An artifact loaded from memory that takes patches without reloading from disk.

    `runner` is the live runner; `swap(patch)` returns the new one. The previous one stays valid
    until `release_previous()` (call it once nothing uses it any more, off the latency path) or
    the next swap, which closes it if still open. `state` is the freshness state the swaps advanced; a device keeps it
    (e.g. the client stores it with the artifact) so a restart refuses replays too.
    """

    def __init__(
        self,
        artifact: Path,
        *,
        weight_map: WeightMap | None = None,
        files: Mapping[str, bytes | bytearray] | None = None,
        runtime: str | None = None,
        config: RunnerConfig = RunnerConfig(),
        policy: TrustPolicy = TrustPolicy(),
        state: DeviceState = DeviceState(),
    ) -> None:
        self.artifact = Path(artifact)
        self.weight_map = weight_map or wmap.load(self.artifact)
        source = files if files is not None else wmap.read_artifact_files(self.artifact, self.weight_map.files)
        self._slots = [{f: _private_copy(source[f]) for f in self.weight_map.files} for _ in range(2)]
        self._sizes = {f: len(b) for f, b in self._slots[0].items()}
        self._runtime, self._config, self.policy, self.state = runtime, config, policy, state
        self._runners: list[Runner | None] = [self._open(0), None]
        self._active = 0

    @property
    def runner(self) -> Runner:
        return self._runners[self._active]

    def _open(self, slot: int) -> Runner:
        return open_runner(
            self.artifact,
            runtime=self._runtime,
            files=self._slots[slot],
            weight_map=self.weight_map,
            config=self._config,
        )

    def swap(self, patch: bytes | bytearray | memoryview) -> tuple[Runner, Patch]:
        """Verify `patch` (policy and state), write it into the idle slot, open a runner on it.
        On any error nothing was written and the live runner is unchanged."""
        p = verify_patch(frozen_bytes(patch), self.weight_map, self._sizes, self.policy, self.state)
        self.release_previous()  # the runner of two swaps ago reads the slot about to change
        idle = 1 - self._active
        slot = self._slots[idle]
        for t in p.tensors:
            _write(slot[t.file], t.offset, p.tensor_bytes(t))
        self._runners[idle] = self._open(idle)
        self._active = idle
        self.state = self.state.after(p)
        return self._runners[idle], p

    def release_previous(self) -> None:
        """Close the runner the last swap replaced (its slot is where the next swap writes)."""
        idle = 1 - self._active
        if self._runners[idle] is not None:
            self._runners[idle].close()
            self._runners[idle] = None

    def close(self) -> None:
        for runner in self._runners:
            if runner is not None:
                runner.close()
        self._runners = [None, None]
