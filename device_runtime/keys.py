"""Key lists: how a device that ships only a root public key learns which online keys may sign
patches (format v2), so a leaked online key is replaced or revoked without an app update.

A key list is a small binary document signed by the root key: a serial number (a device refuses
a list older than the newest it has seen, so a revocation cannot be rolled back), an expiry, and
the online public keys with their own expiry and a revoked flag. Patches carry the list that
certifies their signing key. Byte layout: docs/patch-format.md, "Key list". Torch-free.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from device_runtime.errors import MntoolError

KEYLIST_MAGIC = b"MNKEYS\0\0"
KEYLIST_VERSION = 1
KEYLIST_HEADER = struct.Struct("<8sHHIQQQ32s")  # magic, version, key_count, reserved, serial, issued, expires, root
KEY_ENTRY = struct.Struct("<32sQII")  # public key, expires_at, flags, reserved
SIGNATURE_SIZE = 64
RAW_KEY_SIZE = 32
MAX_KEYS = 64
FLAG_REVOKED = 1
SUFFIX = ".mnkeys"
assert KEYLIST_HEADER.size == 72 and KEY_ENTRY.size == 48


class KeyListError(MntoolError):
    """A key list is malformed, not signed by the device's root, expired, rolled back, or does not
    certify the key that signed a patch."""


@dataclass(frozen=True)
class OnlineKey:
    """One entry of a key list: a public key allowed to sign patches until `expires_at`."""

    public: bytes  # raw 32-byte Ed25519 public key
    expires_at: int  # unix seconds
    revoked: bool = False


@dataclass(frozen=True)
class KeyList:
    """A parsed key list; `signed_message`/`signature` are what the root key signed."""

    serial: int
    issued_at: int
    expires_at: int
    root: bytes
    keys: tuple[OnlineKey, ...]
    signed_message: bytes
    signature: bytes

    @property
    def size(self) -> int:
        return len(self.signed_message) + SIGNATURE_SIZE

    def to_dict(self) -> dict:
        return {
            "serial": self.serial,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "root": self.root.hex(),
            "keys": [{"public": k.public.hex(), "expires_at": k.expires_at, "revoked": k.revoked} for k in self.keys],
        }

    def certify(self, signing_key: bytes, *, root: bytes, now: float, seen_serial: int = 0) -> None:
        """Raise KeyListError unless this list, signed by `root`, current at `now` and not older
        than `seen_serial`, certifies `signing_key` as an unexpired, unrevoked online key."""
        if self.root != root:
            raise KeyListError("the patch's key list is signed by another root key than this device trusts")
        from device_runtime.signing import SignatureError, verify_signature

        try:
            verify_signature(root, self.signed_message, self.signature)
        except SignatureError:
            raise KeyListError("the patch's key list signature does not verify with the root key") from None
        if now >= self.expires_at:
            raise KeyListError(f"the patch's key list (serial {self.serial}) expired at {self.expires_at}")
        if self.serial < seen_serial:
            raise KeyListError(
                f"key list serial {self.serial} is older than serial {seen_serial} already seen (rollback refused)"
            )
        for key in self.keys:
            if key.public == signing_key:
                if key.revoked:
                    raise KeyListError(f"the patch's signing key {signing_key.hex()[:16]} is revoked")
                if now >= key.expires_at:
                    raise KeyListError(f"the patch's signing key {signing_key.hex()[:16]} expired at {key.expires_at}")
                return
        raise KeyListError(f"the patch's signing key {signing_key.hex()[:16]} is not in its key list")


def pack_keylist_message(serial: int, issued_at: int, expires_at: int, root: bytes, keys: list[OnlineKey]) -> bytes:
    """The bytes the root key signs (a key list without its signature)."""
    if not 1 <= len(keys) <= MAX_KEYS:
        raise KeyListError(f"a key list holds 1 to {MAX_KEYS} keys, got {len(keys)}")
    if len(root) != RAW_KEY_SIZE or any(len(k.public) != RAW_KEY_SIZE for k in keys):
        raise KeyListError(f"keys are raw {RAW_KEY_SIZE}-byte Ed25519 public keys")
    if len({k.public for k in keys}) != len(keys):
        raise KeyListError("a key list names each key once")
    if not 0 <= issued_at < expires_at:
        raise KeyListError("a key list must expire after it is issued")
    head = KEYLIST_HEADER.pack(KEYLIST_MAGIC, KEYLIST_VERSION, len(keys), 0, serial, issued_at, expires_at, root)
    return head + b"".join(KEY_ENTRY.pack(k.public, k.expires_at, FLAG_REVOKED if k.revoked else 0, 0) for k in keys)


def parse_keylist(data: bytes | memoryview) -> KeyList:
    """Decode a key list (bounds and reserved fields; `KeyList.certify` checks the signature)."""
    view = memoryview(data).cast("B")
    if len(view) < KEYLIST_HEADER.size + KEY_ENTRY.size + SIGNATURE_SIZE:
        raise KeyListError(f"key list is truncated ({len(view)} bytes)")
    magic, version, count, reserved, serial, issued, expires, root = KEYLIST_HEADER.unpack_from(view)
    if magic != KEYLIST_MAGIC:
        raise KeyListError("not an mntool key list (bad magic)")
    if version != KEYLIST_VERSION:
        raise KeyListError(f"key list version {version} is not supported (this reader reads {KEYLIST_VERSION})")
    if reserved or not 1 <= count <= MAX_KEYS:
        raise KeyListError("key list header is corrupt")
    end = KEYLIST_HEADER.size + KEY_ENTRY.size * count
    if len(view) != end + SIGNATURE_SIZE:
        raise KeyListError(f"key list is {len(view)} bytes, its header says {end + SIGNATURE_SIZE}")
    keys = []
    for i in range(count):
        public, key_expires, flags, key_reserved = KEY_ENTRY.unpack_from(view, KEYLIST_HEADER.size + KEY_ENTRY.size * i)
        if key_reserved or flags & ~FLAG_REVOKED:
            raise KeyListError(f"key list entry {i} is corrupt")
        keys.append(OnlineKey(public, key_expires, bool(flags & FLAG_REVOKED)))
    return KeyList(serial, issued, expires, root, tuple(keys), bytes(view[:end]), bytes(view[end:]))
