"""Patch format v2 on synthetic artifacts: round trips for every artifact shape, and every kind
of bad input rejected with the artifact byte-identical. Also home of the synthetic-artifact
helpers the other test_patch*.py files import."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import blake3
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime import weight_map as wmap
from device_runtime.install import apply_patch_file
from device_runtime.patch import (
    ENTRY,
    HEADER,
    NUMPY_DTYPES,
    Freshness,
    PatchError,
    TrustPolicy,
    apply_patch_bytes,
    pack_patch,
    parse_patch,
    verify_patch,
)
from device_runtime.signing import SignatureError
from device_runtime.weight_map import TensorEntry, WeightMap, WeightMapError
from mntool.patches import build_patch, certify_keys, signer_for

HEAD = {"head.weight": (8, 16), "head.bias": (8,)}
# (artifact path relative to root, {file: static bytes before the adaptive region}, adaptive file)
LAYOUTS = {
    "tflite": ("model.tflite", {"model.tflite": 1000}, "model.tflite"),
    "onnx": ("model.onnx", {"model.onnx": 700, "adaptive.bin": 0}, "adaptive.bin"),
    "coreml": (
        "model.mlpackage",
        {
            "Manifest.json": 90,
            "Data/com.apple.CoreML/model.mlmodel": 500,
            "Data/com.apple.CoreML/weights/weight.bin": 3000,
        },
        "Data/com.apple.CoreML/weights/weight.bin",
    ),
}


def synthetic_artifact(
    root: Path,
    shapes: dict[str, tuple[int, ...]] = HEAD,
    *,
    target: str = "tflite",
    dtype: str = "float32",
    transpose: tuple[str, ...] = (),
    seed: int = 0,
    static_bytes: int | None = None,
) -> Path:
    """An artifact shaped like the exporters' (file set, adaptive tensors 64-aligned after random
    static bytes in one file) with random contents and a valid weight map sidecar.
    `static_bytes` overrides the size of the static part before the adaptive tensors."""
    rng = np.random.default_rng(seed)
    name, statics, adaptive_file = LAYOUTS[target]
    if static_bytes is not None:
        statics = {**statics, adaptive_file: static_bytes}
    contents = {f: bytearray(rng.bytes(n)) for f, n in statics.items()}
    region, tensors = contents[adaptive_file], []
    for tname, shape in shapes.items():
        layout = "transpose" if tname in transpose else "identity"
        stored = tuple(reversed(shape)) if layout == "transpose" else tuple(shape)
        offset = -(-len(region) // 64) * 64
        values = rng.standard_normal(stored).astype(NUMPY_DTYPES[dtype]).tobytes()
        region.extend(bytes(offset - len(region)) + values)
        tensors.append(TensorEntry(tname, tuple(shape), adaptive_file, offset, len(values), dtype, layout, stored, 64))
    artifact = root / name
    artifact_root = artifact if target == "coreml" else root
    for f, data in contents.items():
        (artifact_root / f).parent.mkdir(parents=True, exist_ok=True)
        (artifact_root / f).write_bytes(data)
    fingerprint = wmap.compute_fingerprint({f: bytes(d) for f, d in contents.items()}, tensors, name)
    wm = WeightMap(target, name, tuple(contents), fingerprint, (), (), tuple(tensors))
    wmap.save(wm, artifact)
    return artifact


def random_params(shapes: dict[str, tuple[int, ...]] = HEAD, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`: equal before/after means byte-identical, nothing added."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def stored_bytes(artifact: Path, name: str) -> np.ndarray:
    """The adaptive tensor `name` as it sits in the artifact on disk, in PyTorch layout, float32."""
    wm = wmap.load(artifact)
    t = wm.tensor(name)
    raw = (wmap.artifact_root(artifact) / t.file).read_bytes()[t.offset : t.offset + t.nbytes]
    arr = np.frombuffer(raw, NUMPY_DTYPES[t.dtype]).reshape(t.stored_shape).astype(np.float32)
    return arr.T if t.layout == "transpose" else arr


# ---- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("target", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_file_round_trip_in_place_and_copy(tmp_path, target, dtype):
    artifact = synthetic_artifact(tmp_path / "a", target=target, dtype=dtype, transpose=("head.weight",))
    params = random_params()
    data = build_patch(artifact, params)
    apply_patch_file(artifact, data)
    out = tmp_path / "b" / ("patched" + artifact.suffix)
    apply_patch_file(artifact, data, out=out)
    for path in (artifact, out):
        wmap.load(path)  # still matches its weight map (fingerprint check)
        for name, value in params.items():
            expected = value.astype(dtype).astype(np.float32)
            np.testing.assert_array_equal(stored_bytes(path, name), expected)


def test_patched_artifact_can_be_patched_again(tmp_path):
    artifact = synthetic_artifact(tmp_path)
    first, second = random_params(seed=1), random_params(seed=2)
    apply_patch_file(artifact, build_patch(artifact, first))
    apply_patch_file(artifact, build_patch(artifact, second))
    np.testing.assert_array_equal(stored_bytes(artifact, "head.bias"), second["head.bias"])


@pytest.mark.parametrize("target", sorted(LAYOUTS))
def test_renamed_copy_keeps_the_fingerprint_and_takes_the_same_patches(tmp_path, target):
    artifact = synthetic_artifact(tmp_path / "a", target=target)
    copy = tmp_path / "phone" / ("renamed" + artifact.suffix)
    apply_patch_file(artifact, build_patch(artifact, random_params(seed=1)), out=copy)
    assert wmap.load(copy).fingerprint == wmap.load(artifact).fingerprint
    later = random_params(seed=2)
    apply_patch_file(copy, build_patch(artifact, later))  # a patch built for the original
    np.testing.assert_array_equal(stored_bytes(copy, "head.bias"), later["head.bias"])


def test_only_adaptive_bytes_change(tmp_path):
    artifact = synthetic_artifact(tmp_path)
    before = artifact.read_bytes()
    apply_patch_file(artifact, build_patch(artifact, random_params()))
    after = artifact.read_bytes()
    changed = np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))
    spans = [(t.offset, t.offset + t.nbytes) for t in wmap.load(artifact).tensors]
    assert changed.size and all(any(a <= i < b for a, b in spans) for i in changed)


@pytest.mark.parametrize("target", sorted(LAYOUTS))
def test_in_memory_apply_equals_file_apply_and_leaves_bytes_input_alone(tmp_path, target):
    artifact = synthetic_artifact(tmp_path, target=target)
    wm = wmap.load(artifact)
    files = wmap.read_artifact_files(artifact, wm.files)
    data = build_patch(artifact, random_params())
    patched = apply_patch_bytes(files if target != "tflite" else files[wm.files[0]], data, wm)
    assert wmap.read_artifact_files(artifact, wm.files) == files  # disk untouched
    apply_patch_file(artifact, data)
    on_disk = wmap.read_artifact_files(artifact, wm.files)
    if target == "tflite":
        assert patched == on_disk[wm.files[0]]
    else:
        assert {f: bytes(b) for f, b in patched.items()} == on_disk


def test_in_memory_bytearray_is_patched_in_place(tmp_path):
    artifact = synthetic_artifact(tmp_path)
    wm = wmap.load(artifact)
    buf = bytearray(artifact.read_bytes())
    result = apply_patch_bytes(buf, build_patch(artifact, random_params()), wm, check_artifact=False)
    assert result is buf and bytes(buf) != artifact.read_bytes()


def test_in_memory_multi_file_needs_only_the_adaptive_file_without_artifact_check(tmp_path):
    artifact = synthetic_artifact(tmp_path, target="onnx")
    wm = wmap.load(artifact)
    adaptive = {"adaptive.bin": (tmp_path / "adaptive.bin").read_bytes()}
    data = build_patch(artifact, random_params())
    assert apply_patch_bytes(adaptive, data, wm, check_artifact=False)["adaptive.bin"] != adaptive["adaptive.bin"]
    with pytest.raises(PatchError, match="needs all its files"):
        apply_patch_bytes(adaptive, data, wm)


def test_parse_reports_header(tmp_path):
    artifact = synthetic_artifact(tmp_path, transpose=("head.weight",), dtype="float16")
    p = parse_patch(build_patch(artifact, random_params()))
    wm = wmap.load(artifact)
    assert (p.target, p.fingerprint, p.signed) == ("tflite", wm.fingerprint, False)
    assert [(t.name, t.dtype, t.layout, t.stored_shape) for t in p.tensors] == [
        ("head.weight", "float16", "transpose", (16, 8)),
        ("head.bias", "float16", "identity", (8,)),
    ]
    assert all(t.payload_offset % 64 == 0 for t in p.tensors)


# ---- bad input: every one rejected, artifact byte-identical ---------------------------------
@pytest.fixture
def case(tmp_path):
    """An artifact, a valid unsigned patch for it, and the tree's hashes before anything ran."""
    artifact = synthetic_artifact(tmp_path / "art")
    data = build_patch(artifact, random_params())
    return artifact, data, tree_hashes(tmp_path / "art")


def rejected(artifact: Path, before: dict, patch: bytes, match: str, error=PatchError, **kwargs) -> None:
    with pytest.raises(error, match=match):
        apply_patch_file(artifact, patch, **kwargs)
    assert tree_hashes(wmap.artifact_root(artifact)) == before


def meta_end(data: bytes) -> int:
    """End of the header + table + strings + seal: every byte before the payload."""
    return parse_patch(data).total_size - len(parse_patch(data).payload)


def test_truncated_at_every_byte_of_the_header_and_table(case):
    artifact, data, before = case
    wm = wmap.load(artifact)
    for n in range(meta_end(data)):
        with pytest.raises(PatchError):
            verify_patch(data[:n], wm, {"model.tflite": 10**9})
    rejected(artifact, before, data[:-1], "truncated")


def test_extended_patch_rejected(case):
    artifact, data, before = case
    rejected(artifact, before, data + b"\0", "extended")


def test_every_flipped_bit_in_header_and_table_rejected(case):
    artifact, data, _ = case
    wm = wmap.load(artifact)
    for i in range(meta_end(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(PatchError):
                verify_patch(bad, wm, {"model.tflite": 10**9})


def test_flipped_payload_bits_rejected_as_payload_hash_mismatch(case):
    artifact, data, before = case
    start = meta_end(data)
    for i in range(start, len(data), 37):
        bad = bytearray(data)
        bad[i] ^= 0x10
        rejected(artifact, before, bytes(bad), "payload is corrupt")


def test_wrong_magic_and_version(case):
    artifact, data, before = case
    rejected(artifact, before, b"PK\3\4" + data[4:], "bad magic")
    rejected(artifact, before, data[:8] + (3).to_bytes(2, "little") + data[10:], "version 3 is not supported")


def test_patch_for_another_model_rejected(case, tmp_path):
    artifact, _, before = case
    other = synthetic_artifact(tmp_path / "other", seed=7)
    rejected(artifact, before, build_patch(other, random_params()), "built for another model")


def test_patch_for_another_target_rejected(case, tmp_path):
    artifact, _, before = case
    other = synthetic_artifact(tmp_path / "other", target="onnx")
    rejected(artifact, before, build_patch(other, random_params()), "for a onnx artifact")


def altered_map(artifact: Path, **changes) -> WeightMap:
    """The artifact's weight map (same fingerprint) with its first tensor changed: a patch packed
    from it is well formed and well hashed but describes wrong bytes."""
    wm = wmap.load(artifact)
    first = TensorEntry(**{**wm.tensors[0].__dict__, **changes})
    return WeightMap(**{**wm.__dict__, "tensors": (first, *wm.tensors[1:])})


FRESH = Freshness(sequence=1, issued_at=1, expires_at=2**40)


def packed(wm: WeightMap, fill: float = 0.5) -> bytes:
    return pack_patch(wm, {t.name: np.full(t.stored_shape, fill, NUMPY_DTYPES[t.dtype]) for t in wm.tensors}, FRESH)


@pytest.mark.parametrize(
    "changes, what",
    [
        ({"dtype": "float16", "nbytes": 256}, "wrong dtype"),
        ({"shape": (16, 8), "stored_shape": (16, 8)}, "wrong shape"),
        ({"offset": 1024 - 64}, "overlaps non-adaptive bytes"),
        ({"offset": 1 << 20}, "outside the file"),
    ],
)
def test_destinations_must_match_the_weight_map(case, changes, what):
    artifact, _, before = case
    rejected(artifact, before, packed(altered_map(artifact, **changes)), "does not match the weight map")


def test_destination_outside_the_artifact_bytes_rejected_in_memory(case):
    artifact, data, _ = case
    wm = wmap.load(artifact)
    short = artifact.read_bytes()[: wm.tensors[-1].offset]
    with pytest.raises(PatchError, match="lie outside"):
        apply_patch_bytes(short, data, wm, check_artifact=False)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_rejected(case, value):
    artifact, _, before = case
    rejected(artifact, before, packed(wmap.load(artifact), value), "NaN or Inf")


def test_signature_checks(case):
    artifact, _, before = case
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    params = random_params()
    signed = build_patch(artifact, params, key)
    unsigned = build_patch(artifact, params)
    rejected(artifact, before, signed, "not by the given verify key", policy=TrustPolicy(verify_key=raw_public(other)))
    rejected(artifact, before, unsigned, "not signed", policy=TrustPolicy(verify_key=raw_public(key)))
    apply_patch_file(artifact, signed, policy=TrustPolicy(verify_key=raw_public(key)))
    np.testing.assert_array_equal(stored_bytes(artifact, "head.bias"), params["head.bias"])


def test_resigned_tampered_header_is_caught_by_the_signature(case):
    """An attacker who edits the table and re-computes the checksum cannot re-sign."""
    artifact, _, before = case
    key = Ed25519PrivateKey.generate()
    data = bytearray(build_patch(artifact, random_params(), key))
    seal = len(parse_patch(bytes(data)).signed_message)
    data[HEADER.size + ENTRY.size + 32] ^= 0x40  # second tensor's destination offset
    data[seal + 64 : seal + 96] = blake3.blake3(data[: seal + 64]).digest()
    rejected(
        artifact, before, bytes(data), "does not verify", SignatureError, policy=TrustPolicy(verify_key=raw_public(key))
    )


def test_missing_artifact_patch_or_sidecar(case, tmp_path):
    artifact, data, before = case
    with pytest.raises(WeightMapError, match="does not exist"):
        apply_patch_file(tmp_path / "nope.tflite", data)
    rejected(artifact, before, tmp_path / "nope.mnpatch", "does not exist")
    wmap.sidecar_path(artifact).rename(tmp_path / "sidecar.json")
    with pytest.raises(WeightMapError, match="no weight map"):
        apply_patch_file(artifact, data)


def test_read_only_artifact_rejected(case):
    artifact, data, before = case
    artifact.chmod(0o444)
    rejected(artifact, before, data, "read-only")
    assert stat.S_IMODE(artifact.stat().st_mode) == 0o444


def test_artifact_changed_outside_adaptive_bytes_rejected(case):
    artifact, data, _ = case
    raw = bytearray(artifact.read_bytes())
    raw[10] ^= 1
    artifact.write_bytes(raw)
    before = tree_hashes(artifact.parent)
    rejected(artifact, before, data, "changed outside its adaptive tensors")


def test_copy_refuses_to_overwrite_the_artifact_or_share_its_weight_files(tmp_path):
    artifact = synthetic_artifact(tmp_path, target="onnx")
    data = build_patch(artifact, random_params())
    before = tree_hashes(tmp_path)
    with pytest.raises(PatchError, match="use --in-place"):
        apply_patch_file(artifact, data, out=artifact)
    with pytest.raises(PatchError, match="would share"):
        apply_patch_file(artifact, data, out=tmp_path / "patched.onnx")
    assert tree_hashes(tmp_path) == before


def test_in_place_keeps_file_mode_and_leaves_two_slots_and_no_temporary_files(tmp_path):
    artifact = synthetic_artifact(tmp_path, target="coreml")
    weight_bin = artifact / LAYOUTS["coreml"][2]
    weight_bin.chmod(0o640)
    for seed in (1, 2, 3):
        apply_patch_file(artifact, build_patch(artifact, random_params(seed=seed)))
    assert stat.S_IMODE(weight_bin.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.rglob("*") if "mntmp" in p.name]
    assert sorted(os.listdir(tmp_path)) == ["model.mlpackage", "model.mlpackage.weightmap.json"]
    slots = sorted(p.name[: len(".weight.bin.mnslot-a")] for p in weight_bin.parent.iterdir() if ".mnslot-" in p.name)
    assert slots == [".weight.bin.mnslot-a", ".weight.bin.mnslot-b"] and weight_bin.is_symlink()


def test_worked_example_sizes(tmp_path):
    """docs/patch-format.md, "Worked sizes": the numbers there are the writer's."""
    artifact = synthetic_artifact(tmp_path, {"head.weight": (64, 64), "head.bias": (64,)}, transpose=("head.weight",))
    params = {"head.weight": np.zeros((64, 64), np.float32), "head.bias": np.zeros(64, np.float32)}
    unsigned = parse_patch(build_patch(artifact, params))
    assert (len(unsigned.signed_message), unsigned.total_size - len(unsigned.payload), unsigned.total_size) == (
        552,
        704,
        17344,
    )
    assert [(t.payload_offset, t.nbytes) for t in unsigned.tensors] == [(0, 16384), (16384, 256)]
    assert (
        bytes(unsigned.signed_message[HEADER.size + 2 * ENTRY.size :][:33]) == b"head.weight\0<artifact>\0head.bias\0"
    )
    root, online = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signer = signer_for(online, certify_keys(root, [raw_public(online)], serial=1))
    signed = parse_patch(build_patch(artifact, params, signer))
    assert (len(signed.signed_message), signed.total_size - len(signed.payload), signed.total_size) == (736, 832, 17472)
