"""Cloud side of patches: parameter checks and layout (cast, transpose), keys, recent samples."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from test_patch_format import HEAD, random_params, synthetic_artifact

from device_runtime import weight_map as wmap
from device_runtime.patch import parse_patch
from device_runtime.signing import SignatureError, load_public_key, verify_signature
from mntool.patches import (
    ParamsError,
    SigningKeyError,
    build_patch,
    keygen,
    load_params,
    load_recent,
    load_signing_key,
    stored_tensors,
)


@pytest.fixture
def weight_map(tmp_path):
    return wmap.load(synthetic_artifact(tmp_path, dtype="float16", transpose=("head.weight",)))


def test_stored_tensors_cast_and_transpose(weight_map):
    params = random_params()
    stored = stored_tensors(weight_map, {**params, "head.bias": params["head.bias"].astype(np.float64)})
    assert stored["head.weight"].dtype == np.float16 and stored["head.weight"].flags.c_contiguous
    np.testing.assert_array_equal(stored["head.weight"], params["head.weight"].T.astype(np.float16))
    np.testing.assert_array_equal(stored["head.bias"], params["head.bias"].astype(np.float16))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p: p.pop("head.bias"), r"missing \['head.bias'\]"),
        (lambda p: p.update({"head.extra": np.zeros(3, np.float32)}), r"extra \['head.extra'\]"),
        (lambda p: p.update({"head.bias": np.zeros(9, np.float32)}), r"shape \(9,\), the artifact expects \(8,\)"),
        (lambda p: p.update({"head.weight": p["head.weight"].T.copy()}), "shape"),
        (lambda p: p.update({"head.bias": np.zeros(8, np.int64)}), "not a float type"),
        (lambda p: p["head.bias"].__setitem__(3, np.nan), "NaN or Inf"),
        (lambda p: p["head.bias"].__setitem__(3, 1e6), "overflow the artifact's float16"),
    ],
)
def test_bad_params_rejected(weight_map, change, match):
    params = random_params()
    change(params)
    with pytest.raises(ParamsError, match=match):
        stored_tensors(weight_map, params)


def test_keygen_sign_verify(tmp_path, weight_map):
    pair = keygen(tmp_path / "keys" / "cloud")
    assert stat.S_IMODE(pair.private.stat().st_mode) == 0o600
    assert pair.public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        keygen(tmp_path / "keys" / "cloud")
    p = parse_patch(build_patch(weight_map, random_params(), load_signing_key(pair.private)))
    public = load_public_key(pair.public)
    verify_signature(public, p.signed_message, p.signature)
    with pytest.raises(SignatureError):
        verify_signature(public, bytes(p.signed_message) + b"x", p.signature)


def test_raw_keys_are_accepted(tmp_path):
    key = load_signing_key(keygen(tmp_path / "k").private)
    raw_private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "seed").write_bytes(raw_private)
    (tmp_path / "pub").write_bytes(raw_public)
    assert load_signing_key(tmp_path / "seed").sign(b"m") == key.sign(b"m")
    assert load_public_key(tmp_path / "pub") == load_public_key(tmp_path / "k.pub") == raw_public


def test_bad_key_files(tmp_path):
    pair = keygen(tmp_path / "k")
    with pytest.raises(SignatureError, match="neither a PEM public key"):
        load_public_key(pair.private)
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_signing_key(pair.public)
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_signing_key(tmp_path / "missing.key")


def test_load_params_and_recent(tmp_path):
    np.savez(tmp_path / "p.npz", **random_params())
    assert sorted(load_params(tmp_path / "p.npz")) == sorted(HEAD)
    (tmp_path / "r.json").write_text(json.dumps({"items": [5, 9, 2]}))
    np.savez(tmp_path / "r.npz", items=np.array([5, 9, 2]))
    for path in ("r.json", "r.npz"):
        assert load_recent(tmp_path / path).tolist() == [5, 9, 2]


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"item": [1]}', "no 'items'"),
        ('{"items": 3}', "flat list"),
        ('{"items": [[1, 2]]}', "flat list"),
        ("[1, 2]", "no 'items'"),
        ("{not json", "not readable"),
    ],
)
def test_bad_recent_samples(tmp_path, content, match):
    (tmp_path / "r.json").write_text(content)
    with pytest.raises(ParamsError, match=match):
        load_recent(tmp_path / "r.json")
