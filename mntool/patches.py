"""Cloud side of patches: lay parameters out as the artifact stores them, pack, sign; keys.

Parameters arrive as float arrays in PyTorch shapes, keyed by the names given as `adaptive` at
export (from an .npz, or from the MetaNetwork generator). Everything the device must not do
happens here: transposing, casting to the artifact's dtype, checking the values fit it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime import weight_map as wmap
from device_runtime.errors import MntoolError
from device_runtime.patch import NUMPY_DTYPES, pack_patch
from device_runtime.weight_map import WeightMap

if TYPE_CHECKING:
    from mntool.generate import Generator


class ParamsError(MntoolError):
    """Parameters or recent samples given to build a patch are missing, extra, mis-shaped or not finite."""


class SigningKeyError(MntoolError):
    """A signing key cannot be made, read or written."""


def stored_tensors(weight_map: WeightMap, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`params` (name -> float array in PyTorch shape) as the artifact stores them: transposed
    per the weight map's layout and cast to its dtype. Missing, extra, mis-shaped, non-float or
    non-finite parameters, and values that overflow float16, are errors."""
    names = weight_map.adaptive_names
    missing, extra = [n for n in names if n not in params], sorted(set(params) - set(names))
    if missing or extra:
        raise ParamsError(f"parameters do not match the artifact's adaptive tensors: missing {missing}, extra {extra}")
    stored = {}
    for t in weight_map.tensors:
        value = np.asarray(params[t.name])
        if value.dtype.kind != "f":
            raise ParamsError(f"{t.name}: dtype {value.dtype} is not a float type")
        if value.shape != tuple(t.shape):
            raise ParamsError(f"{t.name}: shape {value.shape}, the artifact expects {tuple(t.shape)}")
        if not np.isfinite(value).all():
            raise ParamsError(f"{t.name}: holds NaN or Inf")
        if t.layout == "transpose":
            value = value.T
        with np.errstate(over="ignore"):
            cast = np.ascontiguousarray(value, dtype=NUMPY_DTYPES[t.dtype])
        if not np.isfinite(cast).all():
            raise ParamsError(f"{t.name}: values overflow the artifact's {t.dtype}")
        stored[t.name] = cast
    return stored


def build_patch(
    artifact: Path | WeightMap,
    params: Mapping[str, np.ndarray],
    signing_key: Ed25519PrivateKey | None = None,
) -> bytes:
    """A v1 patch carrying `params` for `artifact` (its path, or its already-loaded weight map,
    which is what a server building many patches passes), signed when a key is given."""
    weight_map = artifact if isinstance(artifact, WeightMap) else wmap.load(Path(artifact))
    signer = signing_key.sign if signing_key is not None else None
    return pack_patch(weight_map, stored_tensors(weight_map, params), signer)


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
    """A device's recent item ids, most recent last, from JSON `{"items": [...]}` or an .npz with
    key `items`. Only the file format is checked here; the generator checks the ids."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"samples file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                items = npz["items"]
        else:
            items = json.loads(path.read_text())["items"]
    except (KeyError, TypeError):
        raise ParamsError(f"{path} has no 'items' list of item ids") from None
    except (OSError, ValueError) as err:
        raise ParamsError(f"{path} is not readable JSON or .npz: {err}") from None
    if not isinstance(items, (list, np.ndarray)) or np.ndim(items) != 1:
        raise ParamsError(f"{path}: 'items' must be a flat list of item ids")
    return np.asarray(items)


def generate_patch(
    checkpoint: Path | Generator,
    artifact: Path | WeightMap,
    recent: np.ndarray,
    signing_key: Ed25519PrivateKey | None = None,
) -> bytes:
    """A patch carrying the parameters the generator of `checkpoint` (its directory, or a loaded
    `mntool.generate.Generator`) produces for a device whose recent items are `recent` (ids in
    the checkpoint's item space, most recent last)."""
    from mntool.generate import generate  # torch loads only when a patch is generated

    return build_patch(artifact, generate(checkpoint, recent), signing_key)


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
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SigningKeyError(f"cannot read signing key {path}: {err.strerror}") from None
    if len(data) == 32:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key
