"""The patch verbs as a user runs them (subprocess): outputs, --json, and for bad input exit
code 1, exactly one `error: ...` line on stderr, no traceback, the artifact byte-identical."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_patch_format import random_params, stored_bytes, synthetic_artifact, tree_hashes

from device_runtime import weight_map as wmap

MNTOOL = str(Path(sys.executable).with_name("mntool"))


def mntool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([MNTOOL, *map(str, args)], capture_output=True, text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess, match: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def setup(tmp_path):
    artifact = synthetic_artifact(tmp_path / "art", target="onnx", transpose=("head.weight",))
    params = random_params()
    np.savez(tmp_path / "params.npz", **params)
    assert mntool("keygen", "-o", tmp_path / "cloud").returncode == 0
    return tmp_path, artifact, params


def test_keygen_make_patch_apply_inspect(setup):
    tmp, artifact, params = setup
    made = mntool(
        "make-patch",
        artifact,
        "--params",
        tmp / "params.npz",
        "--sign",
        tmp / "cloud.key",
        "-o",
        tmp / "p.mnpatch",
        "--json",
    )
    assert made.returncode == 0, made.stderr
    header = json.loads(made.stdout)
    assert header["signed"] and header["fingerprint"] == wmap.load(artifact).fingerprint

    out = tmp / "copy" / "patched.onnx"
    applied = mntool("patch-weights", artifact, tmp / "p.mnpatch", "-o", out, "--verify-key", tmp / "cloud.pub")
    assert applied.returncode == 0, applied.stderr
    assert "signature verified" in applied.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "adaptive.bin",
        "patched.onnx",
        "patched.onnx.weightmap.json",
    ]
    np.testing.assert_array_equal(stored_bytes(out, "head.weight"), params["head.weight"])

    inplace = mntool("patch-weights", artifact, tmp / "p.mnpatch", "--in-place", "--json")
    assert inplace.returncode == 0 and json.loads(inplace.stdout)["in_place"] is True
    np.testing.assert_array_equal(stored_bytes(artifact, "head.bias"), params["head.bias"])

    shown = mntool("inspect", tmp / "p.mnpatch")
    assert shown.returncode == 0 and "signed" in shown.stdout and "head.weight" in shown.stdout
    shown = json.loads(mntool("inspect", artifact, "--json").stdout)
    assert shown["format"] == "mntool-weight-map" and shown["target"] == "onnx"


def test_every_verb_has_help_with_an_example():
    for verb in ("keygen", "certify", "make-patch", "generate", "patch-weights", "inspect"):
        result = mntool(verb, "--help")
        assert result.returncode == 0 and "Example" in result.stdout and "mntool " + verb in result.stdout


def test_bad_inputs_give_one_line_and_leave_the_artifact_alone(setup):
    tmp, artifact, _ = setup
    before = tree_hashes(artifact.parent)
    other = synthetic_artifact(tmp / "other", target="onnx", transpose=("head.weight",), seed=5)
    assert mntool("make-patch", other, "--params", tmp / "params.npz", "-o", tmp / "other.mnpatch").returncode == 0
    assert mntool("make-patch", artifact, "--params", tmp / "params.npz", "-o", tmp / "p.mnpatch").returncode == 0
    good = (tmp / "p.mnpatch").read_bytes()
    assert (
        mntool(
            "make-patch",
            artifact,
            "--params",
            tmp / "params.npz",
            "--device-id",
            "phone-1",
            "-o",
            tmp / "bound.mnpatch",
        ).returncode
        == 0
    )
    assert (
        mntool(
            "make-patch", artifact, "--params", tmp / "params.npz", "--ttl", "1s", "-o", tmp / "expired.mnpatch"
        ).returncode
        == 0
    )
    time.sleep(1.1)
    (tmp / "flipped.mnpatch").write_bytes(good[:50] + bytes([good[50] ^ 4]) + good[51:])
    (tmp / "truncated.mnpatch").write_bytes(good[:100])
    (tmp / "payload.mnpatch").write_bytes(good[:-3] + bytes([good[-3] ^ 1]) + good[-2:])
    cases = [
        (("flipped.mnpatch", "--in-place"), "corrupt"),
        (("truncated.mnpatch", "--in-place"), "truncated"),
        (("payload.mnpatch", "--in-place"), "payload is corrupt"),
        (("other.mnpatch", "--in-place"), "built for another model"),
        (("p.mnpatch", "--in-place", "--verify-key", tmp / "cloud.pub"), "not signed"),
        (("bound.mnpatch", "--in-place"), "bound to one device"),
        (("bound.mnpatch", "--in-place", "--device-id", "phone-2"), "for another device"),
        (("expired.mnpatch", "--in-place"), "expired"),
        (("missing.mnpatch", "--in-place"), "does not exist"),
        (("params.npz", "--in-place"), "bad magic"),
    ]
    for (patch, *opts), match in cases:
        one_line_error(mntool("patch-weights", artifact, tmp / patch, *opts), match)
        assert tree_hashes(artifact.parent) == before, patch
    (artifact.parent / "adaptive.bin").chmod(0o444)
    one_line_error(mntool("patch-weights", artifact, tmp / "p.mnpatch", "--in-place"), "read-only")
    one_line_error(mntool("patch-weights", tmp / "nope.onnx", tmp / "p.mnpatch", "--in-place"), "does not exist")
    assert tree_hashes(artifact.parent) == before


def test_bad_cloud_inputs_give_one_line(setup):
    tmp, artifact, params = setup
    np.savez(tmp / "short.npz", **{"head.weight": params["head.weight"]})
    one_line_error(
        mntool("make-patch", artifact, "--params", tmp / "short.npz", "-o", tmp / "x.mnpatch"), "missing ['head.bias']"
    )
    one_line_error(
        mntool("make-patch", artifact, "--params", tmp / "nope.npz", "-o", tmp / "x.mnpatch"), "does not exist"
    )
    one_line_error(
        mntool(
            "make-patch", artifact, "--params", tmp / "params.npz", "--sign", tmp / "cloud.pub", "-o", tmp / "x.mnpatch"
        ),
        "not an unencrypted PEM private key",
    )
    one_line_error(mntool("keygen", "-o", tmp / "cloud"), "refusing to overwrite")
    one_line_error(mntool("inspect", tmp / "nope.tflite"), "does not exist")
    assert not (tmp / "x.mnpatch").exists()


def test_root_key_rotation_from_the_command_line(setup):
    """keygen a root and two online keys, certify, sign with the list, apply with only the root
    public key; rotate (revoke the first key), and the first key's patches are refused."""
    tmp, artifact, _ = setup
    for name in ("root", "online1", "online2"):
        assert mntool("keygen", "-o", tmp / name).returncode == 0
    assert (
        mntool(
            "certify",
            "--root",
            tmp / "root.key",
            "--key",
            tmp / "online1.pub",
            "--serial",
            "1",
            "-o",
            tmp / "l1.mnkeys",
        ).returncode
        == 0
    )
    rotated = mntool(
        "certify",
        "--root",
        tmp / "root.key",
        "--key",
        tmp / "online2.pub",
        "--revoke",
        tmp / "online1.pub",
        "--serial",
        "2",
        "-o",
        tmp / "l2.mnkeys",
        "--json",
    )
    assert rotated.returncode == 0 and [k["revoked"] for k in json.loads(rotated.stdout)["keys"]] == [False, True]
    for n, (key, keys) in enumerate([("online1", "l1"), ("online2", "l2"), ("online1", "l1")]):
        made = mntool(
            "make-patch",
            artifact,
            "--params",
            tmp / "params.npz",
            "--sign",
            tmp / f"{key}.key",
            "--key-list",
            tmp / f"{keys}.mnkeys",
            "--device-id",
            "phone-1",
            "-o",
            tmp / f"p{n}.mnpatch",
        )
        assert made.returncode == 0, made.stderr
    device = ("--in-place", "--root-key", tmp / "root.pub", "--device-id", "phone-1")
    for n in (0, 1):
        applied = mntool("patch-weights", artifact, tmp / f"p{n}.mnpatch", *device)
        assert applied.returncode == 0 and "signature verified" in applied.stdout, applied.stderr
    before = tree_hashes(artifact.parent)
    one_line_error(mntool("patch-weights", artifact, tmp / "p1.mnpatch", *device), "replay or rollback refused")
    one_line_error(mntool("patch-weights", artifact, tmp / "p2.mnpatch", *device), "older than serial 2")
    assert tree_hashes(artifact.parent) == before
    one_line_error(
        mntool(
            "make-patch",
            artifact,
            "--params",
            tmp / "params.npz",
            "--sign",
            tmp / "online1.key",
            "--key-list",
            tmp / "l2.mnkeys",
            "-o",
            tmp / "x.mnpatch",
        ),
        "does not certify",
    )
    shown = mntool("inspect", tmp / "p1.mnpatch")
    assert "key list serial 2" in shown.stdout and "sequence" in shown.stdout
