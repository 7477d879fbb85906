"""Patch format v2 on synthetic artifacts: freshness (expiry, sequence, device binding), key
rotation through root-signed key lists, the v1 policy, and the update-path defects of issue 14
(a key implies a signature; -o copies are independent; in-place applies are exclusive, never
follow a planted symlink, and write exactly the bytes they verified). Every refusal leaves the
artifact's tree byte-identical."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from legacy_patch_v1 import pack_patch_v1
from test_patch_format import random_params, raw_public, stored_bytes, synthetic_artifact, tree_hashes

import device_runtime.install as install
import device_runtime.patch as patch_mod
from device_runtime import weight_map as wmap
from device_runtime.errors import MntoolError
from device_runtime.install import apply_patch_file, read_state
from device_runtime.layout import stored_tensors
from device_runtime.patch import PatchError, TrustPolicy, apply_patch_bytes, parse_patch, verify_patch
from mntool.patches import build_patch, certify_keys, signer_for

NOW = 1_800_000_000


@pytest.fixture
def keys():
    root, online, spare = (Ed25519PrivateKey.generate() for _ in range(3))
    return root, online, spare


@pytest.fixture
def art(tmp_path):
    artifact = synthetic_artifact(tmp_path / "art")
    return artifact, tmp_path / "art"


def refused(artifact: Path, patch: bytes, match: str, **kwargs) -> None:
    before = tree_hashes(wmap.artifact_root(artifact))
    with pytest.raises(MntoolError, match=match):
        apply_patch_file(artifact, patch, **kwargs)
    assert tree_hashes(wmap.artifact_root(artifact)) == before


# ---- freshness --------------------------------------------------------------------------------
def test_expired_patch_refused(art):
    artifact, _ = art
    patch = build_patch(artifact, random_params(), ttl_s=60, now=NOW)
    refused(artifact, patch, "expired", policy=TrustPolicy(now=NOW + 60))
    apply_patch_file(artifact, patch, policy=TrustPolicy(now=NOW + 59))


def test_replayed_and_older_patches_refused_newer_accepted(art):
    artifact, _ = art
    first = build_patch(artifact, random_params(seed=1), sequence=10)
    apply_patch_file(artifact, first)
    assert read_state(artifact).sequence == 10
    refused(artifact, first, "not newer than the last applied \\(10\\)")  # replay
    refused(artifact, build_patch(artifact, random_params(seed=2), sequence=9), "rollback refused")
    newer = random_params(seed=3)
    apply_patch_file(artifact, build_patch(artifact, newer, sequence=11))
    np.testing.assert_array_equal(stored_bytes(artifact, "head.bias"), newer["head.bias"])
    assert read_state(artifact).sequence == 11


def test_in_memory_state_check(art):
    artifact, _ = art
    wm = wmap.load(artifact)
    patch = build_patch(artifact, random_params(), sequence=5)
    state = patch_mod.DeviceState(sequence=5)
    with pytest.raises(PatchError, match="replay or rollback"):
        apply_patch_bytes(artifact.read_bytes(), patch, wm, state=state)
    assert state.after(parse_patch(patch)).sequence == 5
    apply_patch_bytes(artifact.read_bytes(), patch, wm, state=patch_mod.DeviceState(sequence=4))


def test_device_binding(art):
    artifact, _ = art
    patch = build_patch(artifact, random_params(), device_id="phone-1")
    refused(artifact, patch, "bound to one device")
    refused(artifact, patch, "for another device", policy=TrustPolicy(device_id="phone-2"))
    apply_patch_file(artifact, patch, policy=TrustPolicy(device_id="phone-1"))
    assert b"phone-1" not in patch  # only a hash of the id travels
    apply_patch_file(artifact, build_patch(artifact, random_params()), policy=TrustPolicy(device_id="phone-2"))


# ---- authenticity: a key implies a signature; key rotation ----------------------------------
def test_a_verify_key_alone_refuses_unsigned_patches(art, keys):
    artifact, _ = art
    _, online, _ = keys
    unsigned = build_patch(artifact, random_params())
    refused(artifact, unsigned, "not signed", policy=TrustPolicy(verify_key=raw_public(online)))
    apply_patch_file(artifact, unsigned, policy=TrustPolicy(verify_key=raw_public(online), allow_unsigned=True))


def test_key_rotation_and_revocation(art, keys):
    artifact, _ = art
    root, online, spare = keys
    policy = TrustPolicy(root_key=raw_public(root))
    list1 = certify_keys(root, [raw_public(online)], serial=1)
    apply_patch_file(artifact, build_patch(artifact, random_params(), signer_for(online, list1)), policy=policy)
    assert read_state(artifact).keys_serial == 1
    # online leaked: the root certifies spare and revokes online (serial 2)
    list2 = certify_keys(root, [raw_public(spare)], revoked=[raw_public(online)], serial=2)
    apply_patch_file(artifact, build_patch(artifact, random_params(), signer_for(spare, list2)), policy=policy)
    assert read_state(artifact).keys_serial == 2
    # the thief signs with online and attaches the old list: refused as a key-list rollback
    stolen = build_patch(artifact, random_params(), signer_for(online, list1))
    refused(artifact, stolen, "older than serial 2", policy=policy)
    # ... or forges a list the root did not sign
    forged = certify_keys(online, [raw_public(online)], serial=9)
    refused(artifact, build_patch(artifact, random_params(), signer_for(online, forged)), "another root", policy=policy)


def test_revoked_unlisted_and_expired_keys_refused(art, keys):
    artifact, _ = art
    root, online, spare = keys
    policy = TrustPolicy(root_key=raw_public(root))
    revoking = certify_keys(root, [raw_public(spare)], revoked=[raw_public(online)], serial=1)
    with pytest.raises(Exception, match="does not certify"):
        signer_for(online, revoking)  # the cloud refuses to build it, so forge the signer
    revoked = build_patch(artifact, random_params(), patch_mod.Signer(online.sign, raw_public(online), revoking))
    refused(artifact, revoked, "is revoked", policy=policy)
    unlisted = build_patch(
        artifact,
        random_params(),
        patch_mod.Signer(online.sign, raw_public(online), certify_keys(root, [raw_public(spare)], serial=1)),
    )
    refused(artifact, unlisted, "not in its key list", policy=policy)
    short = certify_keys(root, [raw_public(online)], serial=1, key_ttl_s=10, now=NOW)
    patch = build_patch(artifact, random_params(), signer_for(online, short), now=NOW)
    refused(artifact, patch, "signing key .* expired", policy=TrustPolicy(root_key=raw_public(root), now=NOW + 11))
    listless = build_patch(artifact, random_params(), online)
    refused(artifact, listless, "no key list", policy=policy)


def test_wrong_verify_key_and_bad_signature(art, keys):
    artifact, _ = art
    _, online, spare = keys
    patch = build_patch(artifact, random_params(), online)
    refused(artifact, patch, "not by the given verify key", policy=TrustPolicy(verify_key=raw_public(spare)))
    forged = patch_mod.Signer(spare.sign, raw_public(online))  # claims online's key, signs with another
    refused(
        artifact,
        build_patch(artifact, random_params(), forged),
        "does not verify",
        policy=TrustPolicy(verify_key=raw_public(online)),
    )


def test_every_flipped_bit_of_a_signed_patch_with_key_list_rejected(art, keys):
    artifact, _ = art
    root, online, _ = keys
    data = build_patch(
        artifact, random_params(), signer_for(online, certify_keys(root, [raw_public(online)], serial=1))
    )
    wm = wmap.load(artifact)
    policy = TrustPolicy(root_key=raw_public(root))
    meta = parse_patch(data).total_size - len(parse_patch(data).payload)
    for i in range(meta):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(MntoolError):
                verify_patch(bytes(bad), wm, {"model.tflite": 10**9}, policy)


# ---- v1 ---------------------------------------------------------------------------------------
def test_v1_patches_need_an_explicit_flag(art, keys):
    artifact, _ = art
    _, online, _ = keys
    wm = wmap.load(artifact)
    params = random_params()
    v1 = pack_patch_v1(wm, stored_tensors(wm, params), online.sign)
    assert parse_patch(v1).version == 1
    refused(artifact, v1, "v1 has no expiry")
    refused(
        artifact, v1, "v1 patch carries no key list", policy=TrustPolicy(root_key=raw_public(online), allow_v1=True)
    )
    apply_patch_file(artifact, v1, policy=TrustPolicy(verify_key=raw_public(online), allow_v1=True))
    np.testing.assert_array_equal(stored_bytes(artifact, "head.bias"), params["head.bias"])


# ---- defect 1: -o copies are complete and independent -----------------------------------------
def test_onnx_copies_never_share_a_weight_file(tmp_path):
    artifact = synthetic_artifact(tmp_path / "src", target="onnx")
    out = tmp_path / "out"
    p1, p2 = random_params(seed=1), random_params(seed=2)
    apply_patch_file(artifact, build_patch(artifact, p1), out=out / "u1.onnx")
    before = tree_hashes(out)
    with pytest.raises(PatchError, match="already exists"):
        apply_patch_file(artifact, build_patch(artifact, p2), out=out / "u2.onnx")
    assert tree_hashes(out) == before  # u1 still has its own weights
    np.testing.assert_array_equal(stored_bytes(out / "u1.onnx", "head.bias"), p1["head.bias"])
    apply_patch_file(artifact, build_patch(artifact, p2), out=tmp_path / "out2" / "u2.onnx")
    np.testing.assert_array_equal(stored_bytes(tmp_path / "out2" / "u2.onnx", "head.bias"), p2["head.bias"])


# ---- defect 3: exclusive, no fixed temporary names, no writing through symlinks ---------------
def test_a_planted_symlink_at_the_old_temporary_name_redirects_nothing(art, tmp_path):
    artifact, root = art
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, root / f".{artifact.name}.mnpatch-tmp")
    for seed in (1, 2, 3):
        apply_patch_file(artifact, build_patch(artifact, random_params(seed=seed)))
    assert victim.read_bytes() == b"precious"
    wmap.load(artifact)


def test_a_planted_symlink_as_the_inactive_slot_is_refused(art, tmp_path):
    artifact, root = art
    apply_patch_file(artifact, build_patch(artifact, random_params(seed=1)))
    apply_patch_file(artifact, build_patch(artifact, random_params(seed=2)))
    inactive = next(e for e in os.listdir(root) if install.SLOT.fullmatch(e) and e != os.readlink(artifact))
    victim = tmp_path / "victim"
    victim.write_bytes((root / inactive).read_bytes())
    (root / inactive).unlink()
    os.symlink(victim, root / inactive)
    snapshot = victim.read_bytes()
    with pytest.raises(PatchError, match="cannot write|not a regular file"):
        apply_patch_file(artifact, build_patch(artifact, random_params(seed=3)))
    assert victim.read_bytes() == snapshot


def test_an_artifact_that_is_a_foreign_symlink_is_refused(art, tmp_path):
    artifact, root = art
    elsewhere = tmp_path / "elsewhere.tflite"
    artifact.rename(elsewhere)
    os.symlink(elsewhere, artifact)
    refused(artifact, build_patch(artifact, random_params()), "symlink mntool did not make")


def test_concurrent_appliers_serialise(art):
    artifact, _ = art
    patches = [build_patch(artifact, random_params(seed=s), sequence=s + 1) for s in range(12)]
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        try:
            apply_patch_file(artifact, patches[i])
            results[i] = "ok"
        except PatchError as err:
            results[i] = str(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(patches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == "ok" or "replay or rollback" in r for r in results.values()), results
    state = read_state(artifact)
    applied = [i for i, r in results.items() if r == "ok"]
    assert state.sequence == max(applied) + 1  # the newest applied patch is the one recorded ...
    np.testing.assert_array_equal(
        stored_bytes(artifact, "head.bias"),  # ... and the one whose bytes are active
        random_params(seed=max(applied))["head.bias"],
    )
    wmap.load(artifact)


# ---- defect 4: the bytes verified are the bytes written -----------------------------------------
def test_a_caller_buffer_changed_after_verification_is_not_written(art, monkeypatch):
    artifact, _ = art
    wm = wmap.load(artifact)
    good = random_params()
    buffer = bytearray(build_patch(artifact, good))
    payload_start = parse_patch(bytes(buffer)).total_size - len(parse_patch(bytes(buffer)).payload)
    real = patch_mod.verify_patch

    def racing(data, *args, **kwargs):
        verified = real(data, *args, **kwargs)
        buffer[payload_start:] = np.full(len(buffer) - payload_start, 0xFF, np.uint8).tobytes()  # NaNs
        return verified

    monkeypatch.setattr(patch_mod, "verify_patch", racing)
    patched = apply_patch_bytes(artifact.read_bytes(), buffer, wm)
    bias = wm.tensor("head.bias")
    np.testing.assert_array_equal(
        np.frombuffer(patched[bias.offset : bias.offset + bias.nbytes], np.float32), good["head.bias"]
    )


def test_a_copy_is_made_from_the_bytes_that_were_checked(art, tmp_path, monkeypatch):
    artifact, _ = art
    real = install.check_artifact_fingerprint

    def tamper_after_check(files, wm):
        real(files, wm)
        raw = bytearray(artifact.read_bytes())
        raw[5] ^= 0xFF  # someone changes the artifact right after the check
        artifact.write_bytes(raw)

    monkeypatch.setattr(install, "check_artifact_fingerprint", tamper_after_check)
    out = tmp_path / "copy" / "model.tflite"
    apply_patch_file(artifact, build_patch(artifact, random_params()), out=out)
    wmap.load(out)  # the copy matches its weight map: it holds the checked bytes, not the tampered ones


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_finite_check_is_exact(tmp_path, dtype):
    """The fast finiteness test: huge finite values (whose squares overflow) pass, one NaN or Inf
    anywhere is refused, in both stored dtypes."""
    artifact = synthetic_artifact(tmp_path, {"w": (64, 64)}, dtype=dtype)
    wm = wmap.load(artifact)
    huge = np.full((64, 64), 6e4 if dtype == "float16" else 3e38, np.float32)
    apply_patch_bytes(artifact.read_bytes(), build_patch(artifact, {"w": huge}), wm)
    for bad in (np.nan, np.inf, -np.inf):
        stored = np.full((64, 64), 1.0, dtype)
        stored[17, 33] = bad
        data = patch_mod.pack_patch(wm, {"w": stored}, patch_mod.Freshness(1, 1, 2**40))
        with pytest.raises(PatchError, match="NaN or Inf"):
            apply_patch_bytes(artifact.read_bytes(), data, wm)


def test_an_artifact_replaced_under_its_slots_gets_fresh_slots_and_state(tmp_path):
    """`cp new.tflite model.tflite` writes through the symlink into the active slot; the other
    slot still holds the old artifact. Even with the artifact check off, the next apply must not
    make that stale slot active: slots are named for their artifact's fingerprint."""
    artifact = synthetic_artifact(tmp_path / "a", seed=0)
    for sequence in (1, 2):
        apply_patch_file(artifact, build_patch(artifact, random_params(seed=sequence), sequence=sequence))
    new = synthetic_artifact(tmp_path / "new", seed=5)
    artifact.write_bytes(new.read_bytes())  # follows the symlink, as cp does
    wmap.sidecar_path(artifact).write_bytes(wmap.sidecar_path(new).read_bytes())
    assert read_state(artifact).sequence == 0  # the state was the old artifact's
    params = random_params(seed=7)
    apply_patch_file(artifact, build_patch(new, params, sequence=1), check_artifact=False)
    wmap.load(artifact)  # every non-adaptive byte is the new artifact's
    np.testing.assert_array_equal(stored_bytes(artifact, "head.bias"), params["head.bias"])
    fingerprint = wmap.load(artifact).fingerprint[:12]
    assert fingerprint in os.readlink(artifact) and read_state(artifact).sequence == 1
    apply_patch_file(artifact, build_patch(new, params, sequence=2), check_artifact=False)
    wmap.load(artifact)
    slots = [e for e in os.listdir(tmp_path / "a") if install.SLOT.fullmatch(e)]
    assert len(slots) == 2 and all(fingerprint in e for e in slots)
