"""A writer of the retired patch format v1, for tests only: devices must still read v1 patches
(and refuse them unless told otherwise), but mntool no longer writes them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import numpy as np

from device_runtime.patch import (
    DTYPE_CODES,
    ENTRY,
    FLAG_SIGNED,
    LAYOUT_CODES,
    MAGIC,
    MAX_DIMS,
    NUMPY_DTYPES,
    PAYLOAD_ALIGN,
    SEAL_SIZE,
    SIGNATURE_SIZE,
    TARGET_CODES,
    PatchError,
    _align,
    destination_name,
)
from device_runtime.patch import HEADER_V1 as HEADER
from device_runtime.weight_map import WeightMap

VERSION = 1


def pack_patch_v1(
    weight_map: WeightMap,
    stored: Mapping[str, np.ndarray],
    signer: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """Serialise `stored` (name -> array already in the artifact's dtype and stored shape) as a
    v1 patch for the artifact described by `weight_map`; `signer(message) -> 64-byte Ed25519
    signature` signs it. Tensors appear in weight-map order."""
    if set(stored) != set(weight_map.adaptive_names):
        raise PatchError(f"patch tensors {sorted(stored)} differ from the weight map's {weight_map.adaptive_names}")
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
        chunks.append((start, np.ascontiguousarray(arr).tobytes()))
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
    payload = bytearray(payload_size)
    for start, raw in chunks:
        payload[start : start + len(raw)] = raw

    table_end = HEADER.size + ENTRY.size * len(entries) + len(strings)
    seal = _align(table_end, 8)
    payload_offset = _align(seal + SEAL_SIZE, PAYLOAD_ALIGN)
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
        hashlib.sha256(payload).digest(),
        bytes(8),
    )
    out = bytearray(payload_offset + payload_size)
    meta = header + b"".join(entries) + bytes(strings)
    out[: len(meta)] = meta
    if signer is not None:
        signature = signer(bytes(out[:seal]))
        if len(signature) != SIGNATURE_SIZE:
            raise PatchError(f"signer returned {len(signature)} bytes, an Ed25519 signature has {SIGNATURE_SIZE}")
        out[seal : seal + SIGNATURE_SIZE] = signature
    out[seal + SIGNATURE_SIZE : seal + SEAL_SIZE] = hashlib.sha256(out[: seal + SIGNATURE_SIZE]).digest()
    out[payload_offset:] = payload
    return bytes(out)
