"""Property tests of format v1: valid patches of any shape round-trip exactly; every random
corruption of a patch (bit flips, byte overwrites, truncation, extension) is rejected and leaves
the artifact's bytes untouched."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_patch_format import LAYOUTS, raw_public, synthetic_artifact

from device_runtime import weight_map as wmap
from device_runtime.errors import MntoolError
from device_runtime.patch import NUMPY_DTYPES, TrustPolicy, apply_patch_bytes
from mntool.patches import build_patch

KEY = Ed25519PrivateKey.generate()
shape = st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple)
specs = st.fixed_dictionaries(
    {
        "shapes": st.dictionaries(
            st.from_regex(r"[a-z]{1,6}(\.[a-z0-9_]{1,8}){0,2}", fullmatch=True), shape, min_size=1, max_size=4
        ),
        "target": st.sampled_from(sorted(LAYOUTS)),
        "dtype": st.sampled_from(sorted(NUMPY_DTYPES)),
        "transpose_2d": st.booleans(),
        "signed": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def case(spec: dict, root: Path):
    """(weight map, artifact files in memory, params, patch bytes) for one drawn spec."""
    transpose = tuple(n for n, s in spec["shapes"].items() if len(s) == 2) if spec["transpose_2d"] else ()
    artifact = synthetic_artifact(
        root, spec["shapes"], target=spec["target"], dtype=spec["dtype"], transpose=transpose, seed=spec["seed"]
    )
    wm = wmap.load(artifact)
    rng = np.random.default_rng(spec["seed"])
    params = {n: (rng.standard_normal(s) * 10).astype(np.float32) for n, s in spec["shapes"].items()}
    data = build_patch(wm, params, KEY if spec["signed"] else None)
    return wm, wmap.read_artifact_files(artifact, wm.files), params, data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs)
def test_valid_patches_round_trip(spec):
    with tempfile.TemporaryDirectory() as tmp:
        wm, files, params, data = case(spec, Path(tmp))
    patched = apply_patch_bytes(
        files, data, wm, policy=TrustPolicy(verify_key=raw_public(KEY) if spec["signed"] else None)
    )
    for t in wm.tensors:
        stored = np.frombuffer(bytes(patched[t.file][t.offset : t.offset + t.nbytes]), NUMPY_DTYPES[t.dtype])
        stored = stored.reshape(t.stored_shape)
        value = params[t.name].astype(NUMPY_DTYPES[t.dtype])
        np.testing.assert_array_equal(stored.T if t.layout == "transpose" else stored, value)


corruptions = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(0, 7)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**9), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=80)),
)


def corrupt(data: bytes, how: tuple) -> bytes | None:
    """`data` corrupted as `how` says, or None when that corruption changes nothing."""
    kind, *args = how
    out = bytearray(data)
    if kind == "flip":
        out[args[0] % len(out)] ^= 1 << args[1]
    elif kind == "overwrite":
        at = args[0] % len(out)
        out[at : at + len(args[1])] = args[1][: len(out) - at]
    elif kind == "truncate":
        out = out[: args[0] % len(out)]
    else:
        out += args[0]
    return None if out == data else bytes(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, how=corruptions)
def test_random_corruptions_are_rejected(spec, how):
    with tempfile.TemporaryDirectory() as tmp:
        wm, files, _, data = case(spec, Path(tmp))
    bad = corrupt(data, how)
    if bad is None:
        return
    writable = {f: bytearray(b) for f, b in files.items()}
    try:
        apply_patch_bytes(writable, bad, wm)
    except MntoolError:
        assert writable == files
    else:
        raise AssertionError(f"corruption {how[0]} was accepted")
