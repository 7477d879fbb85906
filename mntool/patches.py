"""Cloud side of patches: lay parameters out as the artifact stores them, pack, sign; keys.

Parameters arrive as float arrays in PyTorch shapes, keyed by the names given as `adaptive` at
export (from an .npz, or from the MetaNetwork generator). Everything the device must not do
happens here: transposing, casting to the artifact's dtype, checking the values fit it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime import weight_map as wmap
from device_runtime.keys import KeyListError, OnlineKey, pack_keylist_message, parse_keylist
from device_runtime.layout import LayoutError, stored_tensors
from device_runtime.patch import ANY_DEVICE, Freshness, Signer, device_hash, pack_patch
from device_runtime.signing import SigningKeyError, load_private_key
from device_runtime.weight_map import WeightMap

if TYPE_CHECKING:
    from device_runtime.staged import StagedArtifact
    from mntool.generate import Generator


ParamsError = LayoutError  # parameters that cannot become a patch: one error class, defined beside the layout rules


DEFAULT_TTL_S = 7 * 24 * 3600  # a patch nobody applied within a week is stale: the device asks again
DEFAULT_KEYLIST_TTL_S = 365 * 24 * 3600  # bounds how long a device that missed a revocation trusts a revoked key


def next_sequence() -> int:
    """A patch sequence number: microseconds since the epoch. Increasing across server workers
    and restarts without shared state (docs/patch-format.md, "Sequence numbers")."""
    return time.time_ns() // 1000


def build_patch(
    artifact: Path | WeightMap,
    params: Mapping[str, np.ndarray],
    signer: Signer | Ed25519PrivateKey | None = None,
    *,
    device_id: str | None = None,
    sequence: int | None = None,
    ttl_s: float = DEFAULT_TTL_S,
    now: float | None = None,
) -> bytes:
    """A v2 patch carrying `params` for `artifact` (its path, or its already-loaded weight map,
    which is what a server building many patches passes), for one device (`device_id`, or any
    device), numbered `sequence` (default `next_sequence()`), expiring `ttl_s` after `now`.
    `signer` is a `Signer` (online key + the key list certifying it) or a bare private key
    (devices must then trust that key directly)."""
    weight_map = artifact if isinstance(artifact, WeightMap) else wmap.load(Path(artifact))
    issued = int(time.time() if now is None else now)
    if ttl_s < 1:
        raise ParamsError(f"a patch must live at least a second (ttl {ttl_s} s)")
    freshness = Freshness(
        sequence=next_sequence() if sequence is None else sequence,
        issued_at=issued,
        expires_at=issued + int(ttl_s),
        device=ANY_DEVICE if device_id is None else device_hash(device_id),
    )
    if isinstance(signer, Ed25519PrivateKey):
        signer = signer_for(signer)
    return pack_patch(weight_map, stored_tensors(weight_map, params), freshness, signer)


def build_staged_patches(
    staged_dir: Path | StagedArtifact,
    params: Mapping[str, np.ndarray],
    signer: Signer | Ed25519PrivateKey | None = None,
    *,
    device_id: str | None = None,
    sequence: int | None = None,
    ttl_s: float = DEFAULT_TTL_S,
    now: float | None = None,
    partial: bool = False,
) -> dict[int, bytes]:
    """One v2 patch per stage of a staged (early-exit) artifact (its `.stages` directory, or the
    loaded `device_runtime.staged.StagedArtifact`): `params` (every adaptive tensor, by the
    model's parameter names) split by stage and built with `build_patch` against each stage's
    weight map; all share one sequence number. `partial`: stages none of whose tensors are given
    get no patch. Apply them with `device_runtime.staged.apply_staged_patches`."""
    from device_runtime.staged import StagedArtifact, load_staged, split_params

    staged = staged_dir if isinstance(staged_dir, StagedArtifact) else load_staged(Path(staged_dir))
    if isinstance(signer, Ed25519PrivateKey):
        signer = signer_for(signer)
    sequence = next_sequence() if sequence is None else sequence
    return {
        k: build_patch(
            staged.weight_maps[k], values, signer, device_id=device_id, sequence=sequence, ttl_s=ttl_s, now=now
        )
        for k, values in split_params(staged, params, partial=partial).items()
    }


def signer_for(key: Ed25519PrivateKey, keylist: bytes | None = None) -> Signer:
    """A `Signer` for `key`, carrying `keylist` (a root-signed key list that must list it)."""
    public = raw_public_key(key)
    if keylist is not None:
        listed = parse_keylist(keylist)
        if not any(k.public == public and not k.revoked for k in listed.keys):
            raise SigningKeyError("the key list does not certify this signing key (absent or revoked)")
    return Signer(sign=key.sign, public=public, keylist=keylist)


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def certify_keys(
    root: Ed25519PrivateKey,
    online: list[bytes],
    *,
    serial: int,
    revoked: list[bytes] = (),
    ttl_s: float = DEFAULT_KEYLIST_TTL_S,
    key_ttl_s: float | None = None,
    now: float | None = None,
) -> bytes:
    """A key list signed by `root`: `online` raw public keys may sign patches (each until
    `key_ttl_s`, default the list's own life), `revoked` ones are listed as revoked. `serial` must
    exceed every earlier list's: devices refuse a list older than one they have seen."""
    issued = int(time.time() if now is None else now)
    expires = issued + int(ttl_s)
    key_expires = issued + int(key_ttl_s if key_ttl_s is not None else ttl_s)
    keys = [OnlineKey(k, key_expires) for k in online] + [OnlineKey(k, expires, revoked=True) for k in revoked]
    try:
        message = pack_keylist_message(serial, issued, expires, raw_public_key(root), keys)
    except KeyListError as err:
        raise SigningKeyError(str(err)) from None
    return message + root.sign(message)


def load_params(path: Path) -> dict[str, np.ndarray]:
    """Parameters from an .npz whose keys are the PyTorch parameter names."""
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise ParamsError(f"parameter file {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise ParamsError(f"{path} is not a readable .npz: {err}") from None


def load_recent(path: Path) -> np.ndarray:
    """A device's upload from a file: recent item ids, most recent last (JSON `{"items": [...]}` or
    an .npz with key `items`), or images, most recent last (JSON `{"images": [K images of rows of
    pixels]}` or an .npz with key `images`: the image task's (K, 28, 28) integer pixels 0..255).
    Only the file format is checked here; the checkpoint's task checks the values."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"samples file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                key = "images" if "images" in npz.files else "items"
                samples = npz[key]
        else:
            doc = json.loads(path.read_text())
            key = "images" if isinstance(doc, dict) and "images" in doc else "items"
            samples = doc[key]
    except (KeyError, TypeError):
        raise ParamsError(f"{path} has no 'items' list of item ids (nor 'images')") from None
    except (OSError, ValueError) as err:
        raise ParamsError(f"{path} is not readable JSON or .npz: {err}") from None
    if key == "items" and (not isinstance(samples, (list, np.ndarray)) or np.ndim(samples) != 1):
        raise ParamsError(f"{path}: 'items' must be a flat list of item ids")
    if key == "images":
        try:
            samples = np.asarray(samples)
        except ValueError:
            samples = np.asarray(samples, dtype=object)
        if samples.dtype == object or samples.ndim != 3:
            raise ParamsError(f"{path}: 'images' must be a list of images, each a list of rows of pixels")
    return np.asarray(samples)


def generate_patch(
    checkpoint: Path | Generator,
    artifact: Path | WeightMap,
    recent: np.ndarray,
    signer: Signer | Ed25519PrivateKey | None = None,
    **freshness,
) -> bytes:
    """A patch carrying the parameters the generator of `checkpoint` (its directory, or a loaded
    `mntool.generate.Generator`) produces for a device whose recent items are `recent` (ids in
    the checkpoint's item space, most recent last)."""
    from mntool.generate import generate  # torch loads only when a patch is generated

    return build_patch(artifact, generate(checkpoint, recent), signer, **freshness)


def generate_staged_patches(
    checkpoint: Path | Generator, staged_dir: Path, recent: np.ndarray, signer=None, **freshness
) -> dict[int, bytes]:
    """`generate_patch` for a staged (early-exit) artifact: one patch per stage, one sequence."""
    from mntool.generate import generate

    return build_staged_patches(staged_dir, generate(checkpoint, recent), signer, **freshness)


# ---- keys -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPair:
    private: Path  # KEYBASE.key: PKCS#8 PEM, unencrypted, mode 0600
    public: Path  # KEYBASE.pub: SubjectPublicKeyInfo PEM


def keygen(keybase: Path) -> KeyPair:
    """Make an Ed25519 key pair at KEYBASE.key / KEYBASE.pub; refuses to overwrite either."""
    pair = KeyPair(Path(f"{keybase}.key"), Path(f"{keybase}.pub"))
    for path in (pair.private, pair.public):
        if path.exists():
            raise SigningKeyError(f"{path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        pair.private.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(pair.private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        pair.public.write_bytes(public_pem)
    except OSError as err:
        raise SigningKeyError(f"cannot write key pair {keybase}: {err.strerror}") from None
    return pair


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in `path` (PKCS#8 PEM as `keygen` writes, or a raw 32-byte seed)."""
    return load_private_key(path)


def load_keylist(path: Path) -> bytes:
    """A key list file (`mntool certify` writes it), checked to parse."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SigningKeyError(f"cannot read key list {path}: {err.strerror}") from None
    try:
        parse_keylist(data)
    except KeyListError as err:
        raise SigningKeyError(f"{path}: {err}") from None
    return data


def load_signer(key_path: Path, keylist_path: Path | None = None) -> Signer:
    """The online signing key in `key_path` with the key list in `keylist_path` that certifies it."""
    return signer_for(load_signing_key(key_path), load_keylist(keylist_path) if keylist_path else None)
