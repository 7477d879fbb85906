"""The patch format (contract half 2): pack v2, parse v1 and v2, verify, apply in memory; torch-free.

A patch carries the adaptive tensors of one artifact, already in the artifact's dtype and layout,
plus the fingerprint of the base artifact it applies to and hashes over everything. Version 2
adds what makes an update trustworthy on a device that an attacker can reach: an expiry, a
sequence number (the device refuses one not newer than the last it applied), the device it is
for, and the online key that signed it with the root-signed key list that certifies that key.
Applying is verify-then-memcpy; writing to files (A/B slots, lock, state) is `device_runtime.install`.
Byte layout: docs/patch-format.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import blake3
import numpy as np

from device_runtime import weight_map as wmap
from device_runtime.errors import MntoolError
from device_runtime.keys import KeyList, KeyListError, parse_keylist
from device_runtime.layout import NUMPY_DTYPES
from device_runtime.weight_map import TensorEntry, WeightMap

MAGIC = b"MNPATCH\0"
VERSION = 2  # what pack_patch writes; parse_patch also reads 1
SUFFIX = ".mnpatch"
HEADER_V1 = struct.Struct("<8sHHIIIIIQQQ32s32s8s")  # docs/patch-format.md, "Version 1"
HEADER = struct.Struct("<8sHHIIIIIQQQ32s32sQQQ32s32sII40s")  # docs/patch-format.md, "Header"
ENTRY = struct.Struct("<IIIIIIII QQQ 8Q Q")  # docs/patch-format.md, "Tensor table"
SIGNATURE_SIZE = 64
HASH_SIZE = 32
SEAL_SIZE = SIGNATURE_SIZE + HASH_SIZE  # signature, then the hash of everything before it + itself
PAYLOAD_ALIGN = 64
MAX_DIMS = 8
MAX_TENSORS = 4096
MAX_STRINGS = 1 << 20
MAX_KEYLIST = 8192
FLAG_SIGNED = 1
ANY_DEVICE = bytes(HASH_SIZE)
DEVICE_DOMAIN = b"mntool-device-id\0"

TARGET_CODES = {"tflite": 1, "onnx": 2, "coreml": 3, "executorch": 4}
DTYPE_CODES = {"float32": 1, "float16": 2}
LAYOUT_CODES = {"identity": 0, "transpose": 1}
# v1 hashes with SHA-256; v2 with BLAKE3 (one pass near memory bandwidth: the floor of a verified apply)
HASHES: dict[int, Callable[[bytes | memoryview], bytes]] = {
    1: lambda data: hashlib.sha256(data).digest(),
    2: lambda data: blake3.blake3(data).digest(),
}
assert HEADER_V1.size == 128 and HEADER.size == 256 and ENTRY.size == 128


class PatchError(MntoolError):
    """A patch is malformed, corrupt, stale, for another device, unsigned/badly signed, or does
    not fit the artifact."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _decode(codes: dict[str, int], code: int, what: str) -> str:
    for name, c in codes.items():
        if c == code:
            return name
    raise PatchError(f"patch has unknown {what} code {code}")


def device_hash(device_id: str) -> bytes:
    """How a patch names the device it is for: BLAKE3 of a domain tag and the id (never the id)."""
    return blake3.blake3(DEVICE_DOMAIN + device_id.encode()).digest()


@dataclass(frozen=True)
class PatchTensor:
    """One table entry: a tensor's bytes in the payload and where they go in the artifact."""

    name: str
    file: str
    dtype: str
    layout: str
    stored_shape: tuple[int, ...]
    offset: int  # destination byte offset in `file`
    nbytes: int
    payload_offset: int  # relative to the start of the payload

    def matches(self, entry: TensorEntry, artifact: str) -> bool:
        """Same destination as the weight map's `entry` (whose main file is named `artifact`)."""
        return (self.name, self.file, self.dtype, self.layout, self.stored_shape, self.offset, self.nbytes) == (
            entry.name,
            destination_name(entry.file, artifact),
            entry.dtype,
            entry.layout,
            tuple(entry.stored_shape),
            entry.offset,
            entry.nbytes,
        )


def destination_name(file: str, artifact: str) -> str:
    """A destination file as a patch names it: the main artifact file (a .tflite or .onnx, whose
    name a device may change) is `<artifact>`; files inside the artifact keep their names."""
    return wmap.ARTIFACT_LABEL if file == artifact else file


@dataclass(frozen=True)
class Freshness:
    """The v2 fields that make a patch fresh and ordered (all covered by the signature)."""

    sequence: int  # per (artifact fingerprint, device); a device applies only increasing ones
    issued_at: int  # unix seconds
    expires_at: int  # unix seconds; refused at or after it
    device: bytes = ANY_DEVICE  # `device_hash(id)`, or zeros: any device


@dataclass(frozen=True)
class Patch:
    """A parsed patch whose header and table passed their checksum; `payload` is a zero-copy view."""

    version: int
    target: str
    fingerprint: str  # hex, the base artifact's `weight_map.compute_fingerprint`
    signed: bool
    tensors: tuple[PatchTensor, ...]
    payload_hash: str  # hex; SHA-256 (v1) or BLAKE3 (v2)
    total_size: int
    freshness: Freshness | None  # None for v1
    signing_key: bytes | None  # v2: the raw public key that signed it
    keylist: KeyList | None  # v2: the root-signed list certifying `signing_key`, if carried
    signature: bytes = field(repr=False)
    signed_message: memoryview = field(repr=False, compare=False)
    payload: memoryview = field(repr=False, compare=False)

    def tensor_bytes(self, t: PatchTensor) -> memoryview:
        return self.payload[t.payload_offset : t.payload_offset + t.nbytes]

    def array(self, t: PatchTensor) -> np.ndarray:
        """The tensor as stored (artifact dtype and layout), a read-only view of the payload."""
        return np.frombuffer(self.tensor_bytes(t), NUMPY_DTYPES[t.dtype]).reshape(t.stored_shape)

    def to_dict(self) -> dict:
        info = {
            "format": "mntool-patch",
            "version": self.version,
            "target": self.target,
            "fingerprint": self.fingerprint,
            "signed": self.signed,
            "payload_hash": {1: "sha256", 2: "blake3"}[self.version] + ":" + self.payload_hash,
            "payload_bytes": len(self.payload),
            "total_bytes": self.total_size,
        }
        if self.freshness is not None:
            f = self.freshness
            info.update(
                sequence=f.sequence,
                issued_at=f.issued_at,
                expires_at=f.expires_at,
                device=None if f.device == ANY_DEVICE else f.device.hex(),
            )
            info["signing_key"] = self.signing_key.hex() if self.signing_key else None
            info["keylist"] = self.keylist.to_dict() if self.keylist else None
        info["tensors"] = [
            {
                "name": t.name,
                "file": t.file,
                "dtype": t.dtype,
                "layout": t.layout,
                "stored_shape": list(t.stored_shape),
                "offset": t.offset,
                "nbytes": t.nbytes,
                "payload_offset": t.payload_offset,
            }
            for t in self.tensors
        ]
        return info


# ---- writing (used by the cloud; lives here so the byte layout is defined once) -------------
@dataclass(frozen=True)
class Signer:
    """How the cloud signs: `sign(message) -> 64-byte Ed25519 signature` by the key whose raw
    public half is `public`, and the key list (bytes) certifying it, if devices trust a root."""

    sign: Callable[[bytes], bytes]
    public: bytes
    keylist: bytes | None = None


def pack_patch(
    weight_map: WeightMap,
    stored: Mapping[str, np.ndarray],
    freshness: Freshness,
    signer: Signer | None = None,
) -> bytes:
    """Serialise `stored` (name -> array already in the artifact's dtype and stored shape) as a
    v2 patch for the artifact described by `weight_map`. Tensors appear in weight-map order."""
    if set(stored) != set(weight_map.adaptive_names):
        raise PatchError(f"patch tensors {sorted(stored)} differ from the weight map's {weight_map.adaptive_names}")
    if not 0 <= freshness.issued_at < freshness.expires_at or freshness.sequence < 0:
        raise PatchError("a patch must expire after it is issued and have a non-negative sequence")
    strings = bytearray()
    string_refs: dict[str, tuple[int, int]] = {}

    def ref(s: str) -> tuple[int, int]:
        if s not in string_refs:
            raw = s.encode()
            string_refs[s] = (len(strings), len(raw))
            strings.extend(raw + b"\0")
        return string_refs[s]

    entries, chunks, payload_size = [], [], 0
    for t in weight_map.tensors:
        arr = np.asarray(stored[t.name])
        if arr.dtype != NUMPY_DTYPES[t.dtype] or arr.shape != tuple(t.stored_shape):
            raise PatchError(
                f"{t.name}: got {arr.dtype} {arr.shape}, the artifact stores {t.dtype} {tuple(t.stored_shape)}"
            )
        start = _align(payload_size, PAYLOAD_ALIGN)
        chunks.append((start, np.ascontiguousarray(arr)))
        payload_size = start + t.nbytes
        shape = list(t.stored_shape) + [0] * (MAX_DIMS - len(t.stored_shape))
        entries.append(
            ENTRY.pack(
                *ref(t.name),
                *ref(destination_name(t.file, weight_map.artifact)),
                DTYPE_CODES[t.dtype],
                LAYOUT_CODES[t.layout],
                len(t.stored_shape),
                0,
                t.offset,
                t.nbytes,
                start,
                *shape,
                0,
            )
        )
    keylist = signer.keylist if signer is not None and signer.keylist is not None else b""
    if keylist:
        parse_keylist(keylist)  # a malformed list would make every device refuse the patch
    table_end = HEADER.size + ENTRY.size * len(entries) + len(strings) + len(keylist)
    seal = _align(table_end, 8)
    payload_offset = _align(seal + SEAL_SIZE, PAYLOAD_ALIGN)
    out = bytearray(payload_offset + payload_size)
    payload = memoryview(out)[payload_offset:]
    for start, arr in chunks:
        payload[start : start + arr.nbytes] = arr.reshape(-1).view(np.uint8)
    header = HEADER.pack(
        MAGIC,
        VERSION,
        HEADER.size,
        FLAG_SIGNED if signer else 0,
        TARGET_CODES[weight_map.target],
        len(entries),
        ENTRY.size,
        len(strings),
        payload_offset,
        payload_size,
        payload_offset + payload_size,
        bytes.fromhex(weight_map.fingerprint),
        HASHES[VERSION](payload),
        freshness.sequence,
        freshness.issued_at,
        freshness.expires_at,
        freshness.device,
        signer.public if signer else bytes(32),
        len(keylist),
        0,
        bytes(40),
    )
    meta = header + b"".join(entries) + bytes(strings) + keylist
    out[: len(meta)] = meta
    if signer is not None:
        signature = signer.sign(bytes(out[:seal]))
        if len(signature) != SIGNATURE_SIZE:
            raise PatchError(f"signer returned {len(signature)} bytes, an Ed25519 signature has {SIGNATURE_SIZE}")
        out[seal : seal + SIGNATURE_SIZE] = signature
    out[seal + SIGNATURE_SIZE : seal + SEAL_SIZE] = HASHES[VERSION](memoryview(out)[: seal + SIGNATURE_SIZE])
    return bytes(out)


# ---- reading --------------------------------------------------------------------------------
def parse_patch(data: bytes | bytearray | memoryview) -> Patch:
    """Decode a v1 or v2 patch, checking magic, version, bounds and the header/table checksum
    (cheap: no pass over the payload). `verify_patch` does the rest."""
    view = memoryview(data).cast("B")
    if len(view) < 10 or bytes(view[:8]) != MAGIC:
        if bytes(view[: len(MAGIC)]) != MAGIC[: len(view)]:
            raise PatchError("not an mntool patch (bad magic)")
        raise PatchError(f"patch is truncated: {len(view)} bytes")
    version = int.from_bytes(view[8:10], "little")
    if version not in HASHES:
        raise PatchError(f"patch format version {version} is not supported (this reader reads 1 and 2)")
    header_struct = HEADER if version == 2 else HEADER_V1
    if len(view) < header_struct.size:
        raise PatchError(f"patch is truncated: {len(view)} bytes, the v{version} header alone is {header_struct.size}")
    fields = header_struct.unpack_from(view)
    (
        _,
        _,
        header_size,
        flags,
        target_code,
        count,
        entry_size,
        strings_size,
        payload_offset,
        payload_size,
        total_size,
        fingerprint,
        payload_hash,
    ) = fields[:13]
    if version == 2:
        sequence, issued_at, expires_at, device, signing_key, keylist_size, reserved_u32, reserved = fields[13:]
        reserved_ok = reserved == bytes(40) and reserved_u32 == 0
    else:
        keylist_size, reserved_ok = 0, fields[13] == bytes(8)
    if header_size != header_struct.size or entry_size != ENTRY.size or not reserved_ok or flags & ~FLAG_SIGNED:
        raise PatchError("patch header is corrupt (sizes, flags or reserved bytes)")
    if not 1 <= count <= MAX_TENSORS or strings_size > MAX_STRINGS or keylist_size > MAX_KEYLIST:
        raise PatchError(
            f"patch header is corrupt ({count} tensors, {strings_size} string bytes, {keylist_size} key-list bytes)"
        )
    strings_start = header_size + ENTRY.size * count
    keylist_start = strings_start + strings_size
    seal = _align(keylist_start + keylist_size, 8)
    if payload_offset != _align(seal + SEAL_SIZE, PAYLOAD_ALIGN) or total_size != payload_offset + payload_size:
        raise PatchError("patch header is corrupt (section offsets)")
    if len(view) != total_size:
        raise PatchError(f"patch is {len(view)} bytes but its header says {total_size} (truncated or extended)")
    if HASHES[version](view[: seal + SIGNATURE_SIZE]) != bytes(view[seal + SIGNATURE_SIZE : seal + SEAL_SIZE]):
        raise PatchError("patch header or tensor table is corrupt (checksum mismatch)")
    if not _is_zero(view[seal + SEAL_SIZE : payload_offset]) or not _is_zero(view[keylist_start + keylist_size : seal]):
        raise PatchError("patch padding is not zero")
    signature = bytes(view[seal : seal + SIGNATURE_SIZE])
    signed = bool(flags & FLAG_SIGNED)
    if not signed and not _is_zero(signature):
        raise PatchError("patch is marked unsigned but carries a signature")

    freshness = key = keylist = None
    if version == 2:
        if not issued_at < expires_at:
            raise PatchError("patch header is corrupt (it expires before it is issued)")
        freshness = Freshness(sequence, issued_at, expires_at, device)
        if signed != (signing_key != bytes(32)) or (keylist_size and not signed):
            raise PatchError("patch header is corrupt (signing key and signed flag disagree)")
        key = signing_key if signed else None
        if keylist_size:
            try:
                keylist = parse_keylist(view[keylist_start : keylist_start + keylist_size])
            except KeyListError as err:
                raise PatchError(f"patch key list is corrupt: {err}") from None

    strings = view[strings_start:keylist_start]
    tensors, expect_payload = [], 0
    for i in range(count):
        (
            name_off,
            name_len,
            file_off,
            file_len,
            dtype_code,
            layout_code,
            ndim,
            reserved_u32,
            dest,
            nbytes,
            p_off,
            *rest,
        ) = ENTRY.unpack_from(view, header_size + ENTRY.size * i)
        shape, reserved_u64 = rest[:MAX_DIMS], rest[MAX_DIMS]
        dtype = _decode(DTYPE_CODES, dtype_code, "dtype")
        if reserved_u32 or reserved_u64 or not 1 <= ndim <= MAX_DIMS or any(shape[ndim:]):
            raise PatchError(f"tensor table entry {i} is corrupt")
        stored_shape = tuple(shape[:ndim])
        if nbytes != math.prod(stored_shape) * NUMPY_DTYPES[dtype].itemsize:
            raise PatchError(f"tensor table entry {i}: {nbytes} bytes does not hold {dtype} {stored_shape}")
        if p_off != _align(expect_payload, PAYLOAD_ALIGN):
            raise PatchError(f"tensor table entry {i}: payload offset {p_off} is not where the format puts it")
        expect_payload = p_off + nbytes
        tensors.append(
            PatchTensor(
                name=_string(strings, name_off, name_len, i),
                file=_string(strings, file_off, file_len, i),
                dtype=dtype,
                layout=_decode(LAYOUT_CODES, layout_code, "layout"),
                stored_shape=stored_shape,
                offset=dest,
                nbytes=nbytes,
                payload_offset=p_off,
            )
        )
    if expect_payload != payload_size:
        raise PatchError(f"patch payload is {payload_size} bytes, its tensors span {expect_payload}")
    return Patch(
        version=version,
        target=_decode(TARGET_CODES, target_code, "target"),
        fingerprint=fingerprint.hex(),
        signed=signed,
        tensors=tuple(tensors),
        payload_hash=payload_hash.hex(),
        total_size=total_size,
        freshness=freshness,
        signing_key=key,
        keylist=keylist,
        signature=signature,
        signed_message=view[:seal],
        payload=view[payload_offset:],
    )


def _is_zero(b: bytes | memoryview) -> bool:
    return b == bytes(len(b))


def _string(strings: memoryview, offset: int, length: int, entry: int) -> str:
    if offset + length >= len(strings) or strings[offset + length] != 0:
        raise PatchError(f"tensor table entry {entry}: string out of bounds")
    raw = bytes(strings[offset : offset + length])
    if b"\0" in raw:
        raise PatchError(f"tensor table entry {entry}: string contains NUL")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise PatchError(f"tensor table entry {entry}: string is not UTF-8") from None


# ---- what a device accepts --------------------------------------------------------------------
@dataclass(frozen=True)
class TrustPolicy:
    """What a device accepts. A key (`verify_key`: trust that key directly; `root_key`: trust
    online keys that the root's key list certifies) means a signature is required, unless
    `allow_unsigned`. v1 patches (no expiry, sequence or device binding) only with `allow_v1`."""

    verify_key: bytes | None = None
    root_key: bytes | None = None
    device_id: str | None = None  # required to accept a patch bound to a device
    allow_unsigned: bool = False
    allow_v1: bool = False
    now: float | None = None  # unix seconds; None: the clock when verifying

    @property
    def keyed(self) -> bool:
        return self.verify_key is not None or self.root_key is not None


@dataclass(frozen=True)
class DeviceState:
    """What a device remembers per artifact: the last applied sequence and the newest key-list
    serial seen (so neither a patch nor a revocation can be rolled back)."""

    sequence: int = 0
    keys_serial: int = 0

    def after(self, patch: Patch) -> DeviceState:
        if patch.freshness is None:  # a v1 patch (accepted by explicit policy) moves nothing
            return self
        serial = patch.keylist.serial if patch.keylist is not None else 0
        return DeviceState(max(self.sequence, patch.freshness.sequence), max(self.keys_serial, serial))


def verify_patch(
    data: bytes | memoryview,
    weight_map: WeightMap,
    file_sizes: Mapping[str, int],
    policy: TrustPolicy = TrustPolicy(),
    state: DeviceState | None = None,
) -> Patch:
    """Every check that needs no artifact bytes, in order: magic/version, header bounds and
    checksum (`parse_patch`), payload hash, authenticity, freshness (expiry, device, sequence
    against `state`), target + fingerprint, destinations (equal to the weight map's, inside
    `file_sizes`), finite values. Raises PatchError; returns the patch. `data` must not change
    while this runs and until it has been written (pass bytes, not a buffer someone else owns)."""
    patch = parse_patch(data)
    if HASHES[patch.version](patch.payload).hex() != patch.payload_hash:
        raise PatchError(f"patch payload is corrupt ({'SHA-256' if patch.version == 1 else 'BLAKE3'} mismatch)")
    now = time.time() if policy.now is None else policy.now
    _check_authenticity(patch, policy, state or DeviceState(), now)
    _check_freshness(patch, policy, state, now)
    if patch.target != weight_map.target:
        raise PatchError(f"patch is for a {patch.target} artifact, this one is {weight_map.target}")
    if patch.fingerprint != weight_map.fingerprint:
        raise PatchError(
            f"patch was built for another model (fingerprint {patch.fingerprint[:12]} != {weight_map.fingerprint[:12]})"
        )
    if len(patch.tensors) != len(weight_map.tensors):
        raise PatchError(f"patch has {len(patch.tensors)} tensors, the weight map {len(weight_map.tensors)}")
    for t, entry in zip(patch.tensors, weight_map.tensors):
        if not t.matches(entry, weight_map.artifact):
            raise PatchError(
                f"patch tensor {t.name!r} ({t.dtype} {t.stored_shape} at {t.file}+{t.offset}) does not match "
                f"the weight map's {entry.name!r} ({entry.dtype} {tuple(entry.stored_shape)} at {entry.file}+{entry.offset})"
            )
    # from here on, destinations are this artifact's real file names
    patch = dataclasses.replace(
        patch,
        tensors=tuple(dataclasses.replace(t, file=entry.file) for t, entry in zip(patch.tensors, weight_map.tensors)),
    )
    for t in patch.tensors:
        size = file_sizes.get(t.file)
        if size is None or t.offset + t.nbytes > size:
            raise PatchError(f"{t.name}: bytes [{t.offset}, {t.offset + t.nbytes}) lie outside {t.file} ({size} B)")
    for t in patch.tensors:
        if not _all_finite(patch.array(t)):
            raise PatchError(f"{t.name}: patch holds NaN or Inf")
    return patch


def _all_finite(values: np.ndarray) -> bool:
    """No NaN or Inf in `values`, in one fast pass. float32: the dot product with itself is
    finite when every value is (NaN and Inf propagate); only an overflow of finite values makes
    it Inf, and then the exact elementwise test decides. float16: no exponent field all ones."""
    flat = values.reshape(-1)
    if values.dtype.itemsize == 2:
        return bool(flat.size == 0 or np.bitwise_and(flat.view(np.uint16), 0x7FFF).max() < 0x7C00)
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.dot(flat, flat)) or np.isfinite(flat).all())


def _check_authenticity(patch: Patch, policy: TrustPolicy, state: DeviceState, now: float) -> None:
    from device_runtime.signing import verify_signature  # cryptography is needed only for signed patches

    if patch.version == 1 and not policy.allow_v1:
        raise PatchError("patch format v1 has no expiry, sequence or device binding: refused (--allow-v1 accepts it)")
    if not patch.signed:
        if policy.keyed and not policy.allow_unsigned:
            raise PatchError("patch is not signed, and a key was given (--allow-unsigned accepts unsigned patches)")
        return
    if not policy.keyed:
        return  # signed, not verified: the caller gave no key
    if patch.version == 1 or (policy.verify_key is not None and patch.signing_key == policy.verify_key):
        if policy.verify_key is None:
            raise PatchError("a v1 patch carries no key list: verify it with --verify-key")
        verify_signature(policy.verify_key, patch.signed_message, patch.signature)
        return
    if policy.root_key is None:
        raise PatchError(f"patch is signed by key {patch.signing_key.hex()[:16]}, not by the given verify key")
    if patch.keylist is None:
        raise PatchError("patch carries no key list to certify its signing key against the root key")
    try:
        patch.keylist.certify(patch.signing_key, root=policy.root_key, now=now, seen_serial=state.keys_serial)
    except KeyListError as err:
        raise PatchError(str(err)) from None
    verify_signature(patch.signing_key, patch.signed_message, patch.signature)


def _check_freshness(patch: Patch, policy: TrustPolicy, state: DeviceState | None, now: float) -> None:
    f = patch.freshness
    if f is None:
        return
    if now >= f.expires_at:
        raise PatchError(f"patch expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(f.expires_at))}")
    if f.device != ANY_DEVICE:
        if policy.device_id is None:
            raise PatchError("patch is bound to one device: give this device's id (--device-id)")
        if device_hash(policy.device_id) != f.device:
            raise PatchError("patch is for another device")
    if state is not None and f.sequence <= state.sequence:
        raise PatchError(
            f"patch sequence {f.sequence} is not newer than the last applied ({state.sequence}): replay or rollback refused"
        )


# ---- applying in memory ---------------------------------------------------------------------
ArtifactBytes = bytes | bytearray | dict[str, bytes | bytearray]


def frozen_bytes(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """`data` as a buffer nobody else can change: read-only buffers as they are, others copied,
    so the bytes that were verified are the bytes that get written."""
    if isinstance(data, bytes):
        return data
    view = memoryview(data)
    return view if view.readonly else bytes(view)


def apply_patch_bytes(
    artifact: ArtifactBytes,
    patch: bytes | bytearray | memoryview,
    weight_map: WeightMap,
    *,
    policy: TrustPolicy = TrustPolicy(),
    state: DeviceState | None = None,
    check_artifact: bool = True,
) -> ArtifactBytes:
    """Verify `patch` and write it into an artifact held in memory; no disk access.

    `artifact` is the file's bytes (single-file artifacts) or {file name: bytes} (the names of
    `weight_map.files`; with check_artifact=False only the files holding adaptive tensors are
    needed). A bytearray is patched in place; immutable bytes are copied first. Returns the same
    shape it was given. check_artifact also re-computes the artifact's fingerprint (a pass over
    all its bytes) to prove it matches its weight map; a hot-swapping app that checked it at load
    can skip that. `state` is this device's record for the artifact (the sequence check); the
    caller keeps `state.after(patch)` once it has swapped. On any error nothing has been written.
    """
    single = not isinstance(artifact, dict)
    if single:
        if len(weight_map.files) != 1:
            raise PatchError(
                f"{weight_map.artifact} has {len(weight_map.files)} files: pass a dict of file name -> bytes"
            )
        files = {weight_map.files[0]: artifact}
    else:
        files = dict(artifact)
    unknown = set(files) - set(weight_map.files)
    if unknown:
        raise PatchError(f"files {sorted(unknown)} are not part of {weight_map.artifact}")
    p = verify_patch(frozen_bytes(patch), weight_map, {name: len(b) for name, b in files.items()}, policy, state)
    if check_artifact:
        check_artifact_fingerprint(files, weight_map)
    for name in {t.file for t in p.tensors}:
        if not isinstance(files[name], bytearray):
            files[name] = bytearray(files[name])
    for t in p.tensors:
        memoryview(files[t.file])[t.offset : t.offset + t.nbytes] = p.tensor_bytes(t)
    return files[weight_map.files[0]] if single else files


def check_artifact_fingerprint(files: Mapping[str, bytes | bytearray | memoryview], weight_map: WeightMap) -> None:
    """Raise PatchError unless `files` (all of the artifact's) match the weight map's fingerprint."""
    missing = set(weight_map.files) - set(files)
    if missing:
        raise PatchError(f"checking the artifact needs all its files; missing {sorted(missing)}")
    if wmap.compute_fingerprint(files, weight_map.tensors, weight_map.artifact) != weight_map.fingerprint:
        raise PatchError(
            f"{weight_map.artifact} does not match its weight map: it was changed outside its adaptive tensors"
        )
