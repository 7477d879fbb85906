"""kill -9 during in-place applies never leaves a half-written model.

A child process applies two patches alternately, in a loop, to a large artifact; the parent
kills it at random moments and checks the artifact is exactly one of the three whole states
(original, A applied, B applied). Kills that landed mid-write are recognisable by the temporary
file they leave behind; the test insists that some did, so it cannot pass vacuously.
"""
from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_patch_format import random_params, synthetic_artifact

from device_runtime import weight_map as wmap
from device_runtime.patch import apply_patch_bytes, apply_patch_file
from mntool.patches import build_patch

SHAPES = {"head.weight": (512, 512), "head.bias": (512,)}  # 1 MB of adaptive bytes
CHILD = """
import sys
from pathlib import Path
from device_runtime.patch import apply_patch_file
artifact, patches = Path(sys.argv[1]), [Path(p).read_bytes() for p in sys.argv[2:]]
apply_patch_file(artifact, patches[0])
print("ready", flush=True)
i = 1
while True:
    apply_patch_file(artifact, patches[i % 2])
    i += 1
"""


def test_kill_9_during_in_place_apply_leaves_old_or_new(tmp_path):
    root = tmp_path / "art"
    root.mkdir()
    artifact = synthetic_artifact(root, SHAPES, static_bytes=8 << 20)  # large, so a write takes a while
    wm = wmap.load(artifact)
    original = artifact.read_bytes()
    patch_paths = []
    for seed in (1, 2):
        path = tmp_path / f"p{seed}.mnpatch"
        path.write_bytes(build_patch(artifact, random_params(SHAPES, seed=seed)))
        patch_paths.append(path)
    states = {hashlib.sha256(original).hexdigest(): "original"}
    for path in patch_paths:
        patched = apply_patch_bytes(original, path.read_bytes(), wm)
        states[hashlib.sha256(patched).hexdigest()] = path.name
    sidecar = wmap.sidecar_path(artifact).read_bytes()
    tmp_file = root / f".{artifact.name}.mnpatch-tmp"

    rng, mid_write, seen = random.Random(0), 0, set()
    for _ in range(20):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(artifact), *map(str, patch_paths)],
            stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent,
        )
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        mid_write += tmp_file.exists()
        state = states.get(hashlib.sha256(artifact.read_bytes()).hexdigest())
        assert state is not None, "a kill -9 left a half-written artifact"
        seen.add(state)
        assert wmap.sidecar_path(artifact).read_bytes() == sidecar
    assert mid_write > 0, "no kill landed during a write; the test proved nothing"
    assert seen >= {"p1.mnpatch", "p2.mnpatch"}
    apply_patch_file(artifact, patch_paths[0])  # a stale temporary file does not get in the way
    assert not tmp_file.exists()
    wmap.load(artifact)
