"""kill -9 during in-place applies never leaves a half-written model or a state out of step.

A child process applies three patches in turn, in a loop, to a large artifact (A/B slots:
`device_runtime.install`); the parent kills it at random moments and checks that the artifact's
name always resolves to one whole state (original or one patch applied) and that the recorded
sequence is that patch's. Kills that landed inside an apply (after it began writing the inactive
slot, before the switch) are recognisable by an inactive slot that no longer holds the state two
applies back. Half the kills are at random moments; the other half are aimed: the child reports
each slot it has written and synced (and lingers 50 ms there, before its switch), and the parent
kills it right after such a report, so every aimed kill must land inside an apply and the test
cannot pass vacuously however fast the machine's disk is.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_patch_format import random_params, synthetic_artifact

from device_runtime import weight_map as wmap
from device_runtime.install import SLOT, apply_patch_file, read_state
from device_runtime.patch import apply_patch_bytes, parse_patch
from mntool.patches import build_patch

SHAPES = {"head.weight": (1024, 1024), "head.bias": (1024,)}  # 4 MB of adaptive bytes
CHILD = """
import os
import sys
import time
from pathlib import Path
from device_runtime.install import apply_patch_file
from mntool.patches import build_patch
from test_patch_format import random_params
artifact, n = Path(sys.argv[1]), int(sys.argv[2])
params = [random_params({"head.weight": (1024, 1024), "head.bias": (1024,)}, seed=s) for s in (1, 2, 3)]
patches = [build_patch(artifact, params[q % 3], sequence=q) for q in (n, n + 1, n + 2)]  # patch q: params[q % 3]
_fdatasync = os.fdatasync
def fdatasync(fd):  # the apply's only sync: its slot is written, its switch not yet made
    _fdatasync(fd)
    print("synced", flush=True)
    time.sleep(0.05)
os.fdatasync = fdatasync
print("ready", flush=True)
i = 0
while True:
    apply_patch_file(artifact, patches[i % 3])
    i += 1
    patches[(i - 1) % 3] = build_patch(artifact, params[(n + i + 2) % 3], sequence=n + i + 2)
"""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_kill_9_during_in_place_apply_leaves_old_or_new(tmp_path):
    root = tmp_path / "art"
    root.mkdir()
    artifact = synthetic_artifact(root, SHAPES, static_bytes=8 << 20)  # large, so a write takes a while
    wm = wmap.load(artifact)
    original = artifact.read_bytes()
    sidecar = wmap.sidecar_path(artifact).read_bytes()
    wholes = {digest(original): -1}
    for seed in (1, 2, 3):
        patched = apply_patch_bytes(original, build_patch(artifact, random_params(SHAPES, seed=seed)), wm)
        wholes[digest(patched)] = seed - 1  # the params' index: the patch numbered q carries params[q % 3]

    rng, seen, aimed, aimed_inside = random.Random(0), set(), 0, 0
    # the first apply, here: from then on the artifact's name is a link to a slot, and an aimed
    # kill's apply writes the inactive slot (not the one-off copy of the plain file)
    apply_patch_file(artifact, build_patch(artifact, random_params(SHAPES, seed=2), sequence=1))

    def params_index(sequence: int) -> int:
        """Which params the patch numbered `sequence` carried; -1: none (the original artifact)."""
        return -1 if sequence == 0 else sequence % 3

    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{tests_dir}{os.pathsep}{tests_dir.parent}"}
    for kill in range(40):  # random kills: about 1 in 7 lands inside an apply; aimed ones: all do
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(artifact), str(read_state(artifact).sequence + 1)],
            stdout=subprocess.PIPE,
            cwd=tests_dir.parent,
            env=env,
        )
        assert child.stdout.readline().strip() == b"ready"
        aim = kill % 2 == 1
        if aim:  # right after the k-th apply has synced its slot, before that apply's switch
            for _ in range(rng.randint(1, 3)):
                assert child.stdout.readline().strip() == b"synced"
            time.sleep(rng.uniform(0, 0.01))
        else:
            time.sleep(rng.uniform(0.01, 0.2))
        child.send_signal(signal.SIGKILL)
        child.wait()
        which = wholes.get(digest(artifact.read_bytes()))
        assert which is not None, "a kill -9 left a half-written artifact"
        state = read_state(artifact)
        assert which == params_index(state.sequence), "the recorded sequence is not the one whose bytes are active"
        seen.add(which)
        # after a whole apply of sequence s, the inactive slot holds sequence s - 1; anything else
        # means the kill landed inside the next apply (its slot written, partly or wholly, not switched)
        slots = [e for e in os.listdir(root) if SLOT.fullmatch(e) and e != os.readlink(artifact)]
        landed = bool(slots) and wholes.get(digest((root / slots[0]).read_bytes())) != params_index(state.sequence - 1)
        if aim:
            aimed += 1
            aimed_inside += landed
        assert wmap.sidecar_path(artifact).read_bytes() == sidecar
    assert aimed == 20 and aimed_inside == aimed, f"only {aimed_inside} of {aimed} aimed kills landed inside an apply"
    assert len(seen) >= 2
    last = build_patch(artifact, random_params(SHAPES, seed=1), sequence=read_state(artifact).sequence + 10)
    apply_patch_file(artifact, last)  # leftovers of killed applies do not get in the way
    assert read_state(artifact).sequence == parse_patch(last).freshness.sequence
    assert not [e for e in os.listdir(root) if ".mntmp-" in e]
    assert len([e for e in os.listdir(root) if SLOT.fullmatch(e)]) == 2
    wmap.load(artifact)
