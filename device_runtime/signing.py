"""Ed25519 signature checks for patches, on the device side (via `cryptography`).

Signatures are optional: a device that never passes a verify key never imports this module.
Public keys are read from PEM (`mntool keygen` writes KEYBASE.pub) or as the raw 32 bytes a
C/Swift app would embed; in memory they are always the raw 32 bytes.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_runtime.errors import MntoolError

RAW_KEY_SIZE = 32


class SignatureError(MntoolError):
    """A key file is unreadable or a patch's signature does not verify."""


class SigningKeyError(MntoolError):
    """A signing key cannot be made, read or written."""


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in `path`: PKCS#8 PEM (as `mntool keygen` writes), or a raw 32-byte
    seed (as a device's own key is kept). The cloud's signing keys and a device's key read alike."""
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


def load_public_key(path: Path) -> bytes:
    """The raw 32-byte Ed25519 public key in `path` (PEM SubjectPublicKeyInfo or raw bytes)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SignatureError(f"cannot read public key {path}: {err.strerror}") from None
    if len(data) == RAW_KEY_SIZE:
        return data
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SignatureError(f"{path} is neither a PEM public key nor {RAW_KEY_SIZE} raw bytes") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify_signature(public_key: bytes, message: bytes | memoryview, signature: bytes) -> None:
    """Raise SignatureError unless `signature` is `public_key`'s Ed25519 signature of `message`."""
    if len(public_key) != RAW_KEY_SIZE:
        raise SignatureError(f"an Ed25519 public key has {RAW_KEY_SIZE} bytes, got {len(public_key)}")
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(signature, bytes(message))
    except InvalidSignature:
        raise SignatureError("patch signature does not verify with the given key") from None
