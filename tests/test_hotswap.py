"""Hot swap in memory (A/B private buffers): each swap's runner computes what the patched
artifact computes, the artifact on disk and the caller's buffers never change, the runner of two
swaps ago is closed before its buffer is reused, and a refused patch leaves the live runner as
it was. On LiteRT and ONNX Runtime, on real exported artifacts."""

from __future__ import annotations

import numpy as np
import pytest
from small_artifacts import fresh_params

from device_runtime import weight_map as wmap
from device_runtime.bench import generate_inputs
from device_runtime.errors import MntoolError
from device_runtime.hotswap import HotSwap
from device_runtime.patch import apply_patch_bytes
from device_runtime.runners import open_runner
from mntool.patches import build_patch


def outputs_of(runner, feeds) -> np.ndarray:
    return np.concatenate([np.ravel(v) for v in runner.run(feeds).values()])


def test_swaps_compute_the_patched_model_and_touch_nothing_else(artifact):
    wm = wmap.load(artifact)
    files = wmap.read_artifact_files(artifact, wm.files)
    before = {f: bytes(b) for f, b in files.items()}
    swapper = HotSwap(artifact, weight_map=wm, files=files)
    feeds = generate_inputs(swapper.runner.free_inputs, wm.extra.get("vocab_size"), seed=0)
    unpatched = outputs_of(swapper.runner, feeds)
    runners = []
    for seed in (1, 2, 3):
        patch = build_patch(artifact, fresh_params(artifact, seed))
        runner, applied = swapper.swap(patch)
        runners.append(runner)
        with open_runner(artifact, weight_map=wm, files=apply_patch_bytes(files, patch, wm)) as reference:
            np.testing.assert_array_equal(outputs_of(runner, feeds), outputs_of(reference, feeds))
        assert not np.array_equal(outputs_of(runner, feeds), unpatched)
        assert swapper.state.sequence == applied.freshness.sequence
    np.testing.assert_array_equal(outputs_of(runners[1], feeds), outputs_of(runners[1], feeds))  # previous still live
    assert files == before and wmap.read_artifact_files(artifact, wm.files) == before
    with pytest.raises(MntoolError, match="replay or rollback"):
        swapper.swap(patch)
    live = outputs_of(swapper.runner, feeds)
    bad = bytearray(build_patch(artifact, fresh_params(artifact, 4)))
    bad[-1] ^= 0xFF
    with pytest.raises(MntoolError, match="payload is corrupt"):
        swapper.swap(bytes(bad))
    np.testing.assert_array_equal(outputs_of(swapper.runner, feeds), live)
    swapper.close()
