"""The patch format v1 (contract half 2): pack, parse, verify and apply patches, torch-free.

A patch carries the adaptive tensors of one artifact, already in the artifact's dtype and layout,
plus the fingerprint of the base artifact it applies to and hashes (optionally an Ed25519
signature) over everything. Applying is verify-then-memcpy: into bytes held in memory (hot swap)
or into the artifact's files (crash-safe: copy, patch, fsync, atomic rename). Byte layout and
the crash story: docs/patch-format.md.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import stat
import struct
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from device_runtime import weight_map as wmap
from device_runtime.errors import MntoolError
from device_runtime.weight_map import TensorEntry, WeightMap

MAGIC = b"MNPATCH\0"
VERSION = 1
SUFFIX = ".mnpatch"
HEADER = struct.Struct("<8sHHIIIIIQQQ32s32s8s")  # see docs/patch-format.md, "Header"
ENTRY = struct.Struct("<IIIIIIII QQQ 8Q Q")  # see docs/patch-format.md, "Tensor table"
SIGNATURE_SIZE = 64
SEAL_SIZE = SIGNATURE_SIZE + 32  # signature, then SHA-256 of everything before it + itself
PAYLOAD_ALIGN = 64
MAX_DIMS = 8
MAX_TENSORS = 4096
MAX_STRINGS = 1 << 20
FLAG_SIGNED = 1

TARGET_CODES = {"tflite": 1, "onnx": 2, "coreml": 3}
DTYPE_CODES = {"float32": 1, "float16": 2}
LAYOUT_CODES = {"identity": 0, "transpose": 1}
NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
assert HEADER.size == 128 and ENTRY.size == 128


class PatchError(MntoolError):
    """A patch is malformed, corrupt, unsigned/badly signed, or does not fit the artifact."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _decode(codes: dict[str, int], code: int, what: str) -> str:
    for name, c in codes.items():
        if c == code:
            return name
    raise PatchError(f"patch has unknown {what} code {code}")


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
            entry.name, destination_name(entry.file, artifact), entry.dtype, entry.layout, tuple(entry.stored_shape),
            entry.offset, entry.nbytes,
        )


def destination_name(file: str, artifact: str) -> str:
    """A destination file as a patch names it: the main artifact file (a .tflite or .onnx, whose
    name a device may change) is `<artifact>`; files inside the artifact keep their names."""
    return wmap.ARTIFACT_LABEL if file == artifact else file


@dataclass(frozen=True)
class Patch:
    """A parsed patch whose header and table passed their checksum; `payload` is a zero-copy view."""

    target: str
    fingerprint: str  # hex, the base artifact's `weight_map.compute_fingerprint`
    signed: bool
    tensors: tuple[PatchTensor, ...]
    payload_sha256: str  # hex
    total_size: int
    signature: bytes = field(repr=False)
    signed_message: memoryview = field(repr=False, compare=False)
    payload: memoryview = field(repr=False, compare=False)
    version: int = VERSION

    def tensor_bytes(self, t: PatchTensor) -> memoryview:
        return self.payload[t.payload_offset : t.payload_offset + t.nbytes]

    def array(self, t: PatchTensor) -> np.ndarray:
        """The tensor as stored (artifact dtype and layout), a read-only view of the payload."""
        return np.frombuffer(self.tensor_bytes(t), NUMPY_DTYPES[t.dtype]).reshape(t.stored_shape)

    def to_dict(self) -> dict:
        return {
            "format": "mntool-patch",
            "version": self.version,
            "target": self.target,
            "fingerprint": self.fingerprint,
            "signed": self.signed,
            "payload_sha256": self.payload_sha256,
            "payload_bytes": len(self.payload),
            "total_bytes": self.total_size,
            "tensors": [
                {
                    "name": t.name, "file": t.file, "dtype": t.dtype, "layout": t.layout,
                    "stored_shape": list(t.stored_shape), "offset": t.offset, "nbytes": t.nbytes,
                    "payload_offset": t.payload_offset,
                }
                for t in self.tensors
            ],
        }


# ---- writing (used by the cloud; lives here so the byte layout is defined once) -------------
def pack_patch(
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
            raise PatchError(f"{t.name}: got {arr.dtype} {arr.shape}, the artifact stores {t.dtype} {tuple(t.stored_shape)}")
        start = _align(payload_size, PAYLOAD_ALIGN)
        chunks.append((start, np.ascontiguousarray(arr).tobytes()))
        payload_size = start + t.nbytes
        shape = list(t.stored_shape) + [0] * (MAX_DIMS - len(t.stored_shape))
        entries.append(ENTRY.pack(
            *ref(t.name), *ref(destination_name(t.file, weight_map.artifact)), DTYPE_CODES[t.dtype], LAYOUT_CODES[t.layout], len(t.stored_shape), 0,
            t.offset, t.nbytes, start, *shape, 0,
        ))
    payload = bytearray(payload_size)
    for start, raw in chunks:
        payload[start : start + len(raw)] = raw

    table_end = HEADER.size + ENTRY.size * len(entries) + len(strings)
    seal = _align(table_end, 8)
    payload_offset = _align(seal + SEAL_SIZE, PAYLOAD_ALIGN)
    header = HEADER.pack(
        MAGIC, VERSION, HEADER.size, FLAG_SIGNED if signer else 0, TARGET_CODES[weight_map.target],
        len(entries), ENTRY.size, len(strings), payload_offset, payload_size, payload_offset + payload_size,
        bytes.fromhex(weight_map.fingerprint), hashlib.sha256(payload).digest(), bytes(8),
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


# ---- reading --------------------------------------------------------------------------------
def parse_patch(data: bytes | bytearray | memoryview) -> Patch:
    """Decode a patch, checking magic, version, bounds and the header/table checksum (cheap: no
    pass over the payload). `verify_patch` does the rest."""
    view = memoryview(data).cast("B")
    if len(view) < HEADER.size:
        if bytes(view[: len(MAGIC)]) != MAGIC[: len(view)]:
            raise PatchError("not an mntool patch (bad magic)")
        raise PatchError(f"patch is truncated: {len(view)} bytes, the header alone is {HEADER.size}")
    (magic, version, header_size, flags, target_code, count, entry_size, strings_size,
     payload_offset, payload_size, total_size, fingerprint, payload_sha, reserved) = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise PatchError("not an mntool patch (bad magic)")
    if version != VERSION:
        raise PatchError(f"patch format version {version} is not supported (this reader reads {VERSION})")
    if header_size != HEADER.size or entry_size != ENTRY.size or reserved != bytes(8) or flags & ~FLAG_SIGNED:
        raise PatchError("patch header is corrupt (sizes, flags or reserved bytes)")
    if not 1 <= count <= MAX_TENSORS or strings_size > MAX_STRINGS:
        raise PatchError(f"patch header is corrupt ({count} tensors, {strings_size} string bytes)")
    seal = _align(HEADER.size + ENTRY.size * count + strings_size, 8)
    if payload_offset != _align(seal + SEAL_SIZE, PAYLOAD_ALIGN) or total_size != payload_offset + payload_size:
        raise PatchError("patch header is corrupt (section offsets)")
    if len(view) != total_size:
        raise PatchError(f"patch is {len(view)} bytes but its header says {total_size} (truncated or extended)")
    if hashlib.sha256(view[: seal + SIGNATURE_SIZE]).digest() != bytes(view[seal + SIGNATURE_SIZE : seal + SEAL_SIZE]):
        raise PatchError("patch header or tensor table is corrupt (checksum mismatch)")
    strings_end = HEADER.size + ENTRY.size * count + strings_size
    if not _is_zero(view[seal + SEAL_SIZE : payload_offset]) or not _is_zero(view[strings_end:seal]):
        raise PatchError("patch padding is not zero")
    signature = bytes(view[seal : seal + SIGNATURE_SIZE])
    signed = bool(flags & FLAG_SIGNED)
    if not signed and not _is_zero(signature):
        raise PatchError("patch is marked unsigned but carries a signature")

    strings = view[HEADER.size + ENTRY.size * count : strings_end]
    tensors, expect_payload = [], 0
    for i in range(count):
        (name_off, name_len, file_off, file_len, dtype_code, layout_code, ndim, reserved_u32,
         dest, nbytes, p_off, *rest) = ENTRY.unpack_from(view, HEADER.size + ENTRY.size * i)
        shape, reserved_u64 = rest[:MAX_DIMS], rest[MAX_DIMS]
        dtype = _decode(DTYPE_CODES, dtype_code, "dtype")
        if reserved_u32 or reserved_u64 or not 1 <= ndim <= MAX_DIMS or any(shape[ndim:]):
            raise PatchError(f"tensor table entry {i} is corrupt")
        stored_shape = tuple(shape[:ndim])
        if nbytes != math.prod(stored_shape) * NUMPY_DTYPES[dtype].itemsize:
            raise PatchError(f"tensor table entry {i}: {nbytes} bytes does not hold {dtype} {stored_shape}")
        if p_off != _align(expect_payload, PAYLOAD_ALIGN):
            raise PatchError(f"tensor table entry {i}: payload offset {p_off} is not where v1 puts it")
        expect_payload = p_off + nbytes
        tensors.append(PatchTensor(
            name=_string(strings, name_off, name_len, i), file=_string(strings, file_off, file_len, i),
            dtype=dtype, layout=_decode(LAYOUT_CODES, layout_code, "layout"), stored_shape=stored_shape,
            offset=dest, nbytes=nbytes, payload_offset=p_off,
        ))
    if expect_payload != payload_size:
        raise PatchError(f"patch payload is {payload_size} bytes, its tensors span {expect_payload}")
    return Patch(
        target=_decode(TARGET_CODES, target_code, "target"), fingerprint=fingerprint.hex(), signed=signed,
        tensors=tuple(tensors), payload_sha256=payload_sha.hex(), total_size=total_size, signature=signature,
        signed_message=view[:seal], payload=view[payload_offset:],
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


def verify_patch(
    data: bytes | bytearray | memoryview,
    weight_map: WeightMap,
    file_sizes: Mapping[str, int],
    *,
    verify_key: bytes | None = None,
    require_signature: bool = False,
) -> Patch:
    """Every check that needs no artifact bytes, in order: magic/version, header bounds and
    checksum (`parse_patch`), payload hash, signature, target + fingerprint, destinations (equal to
    the weight map's, inside `file_sizes`), finite values. Raises PatchError; returns the patch."""
    if require_signature and verify_key is None:
        raise PatchError("a signature is required but no verify key was given")
    patch = parse_patch(data)
    if hashlib.sha256(patch.payload).hexdigest() != patch.payload_sha256:
        raise PatchError("patch payload is corrupt (SHA-256 mismatch)")
    if verify_key is not None:
        if not patch.signed:
            if require_signature:
                raise PatchError("patch is not signed and a signature is required")
        else:
            from device_runtime.signing import verify_signature  # cryptography is needed only here

            verify_signature(verify_key, patch.signed_message, patch.signature)
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
    patch = dataclasses.replace(patch, tensors=tuple(
        dataclasses.replace(t, file=entry.file) for t, entry in zip(patch.tensors, weight_map.tensors)
    ))
    for t in patch.tensors:
        size = file_sizes.get(t.file)
        if size is None or t.offset + t.nbytes > size:
            raise PatchError(f"{t.name}: bytes [{t.offset}, {t.offset + t.nbytes}) lie outside {t.file} ({size} B)")
    for t in patch.tensors:
        if not np.isfinite(patch.array(t)).all():
            raise PatchError(f"{t.name}: patch holds NaN or Inf")
    return patch


# ---- applying -------------------------------------------------------------------------------
ArtifactBytes = bytes | bytearray | dict[str, bytes | bytearray]


def apply_patch_bytes(
    artifact: ArtifactBytes,
    patch: bytes | bytearray | memoryview,
    weight_map: WeightMap,
    *,
    verify_key: bytes | None = None,
    require_signature: bool = False,
    check_artifact: bool = True,
) -> ArtifactBytes:
    """Verify `patch` and write it into an artifact held in memory; no disk access.

    `artifact` is the file's bytes (single-file artifacts) or {file name: bytes} (the names of
    `weight_map.files`; with check_artifact=False only the files holding adaptive tensors are
    needed). A bytearray is patched in place; immutable bytes are copied first. Returns the same
    shape it was given. check_artifact also re-computes the artifact's fingerprint (a pass over
    all its bytes) to prove it matches its weight map; a hot-swapping app that checked it at load
    can skip that. On any error nothing has been written.
    """
    single = not isinstance(artifact, dict)
    if single:
        if len(weight_map.files) != 1:
            raise PatchError(f"{weight_map.artifact} has {len(weight_map.files)} files: pass a dict of file name -> bytes")
        files = {weight_map.files[0]: artifact}
    else:
        files = dict(artifact)
    unknown = set(files) - set(weight_map.files)
    if unknown:
        raise PatchError(f"files {sorted(unknown)} are not part of {weight_map.artifact}")
    p = verify_patch(
        patch, weight_map, {name: len(b) for name, b in files.items()},
        verify_key=verify_key, require_signature=require_signature,
    )
    if check_artifact:
        _check_artifact_fingerprint(files, weight_map)
    for name in {t.file for t in p.tensors}:
        if not isinstance(files[name], bytearray):
            files[name] = bytearray(files[name])
    for t in p.tensors:
        memoryview(files[t.file])[t.offset : t.offset + t.nbytes] = p.tensor_bytes(t)
    return files[weight_map.files[0]] if single else files


def _check_artifact_fingerprint(files: Mapping[str, bytes | bytearray], weight_map: WeightMap) -> None:
    missing = set(weight_map.files) - set(files)
    if missing:
        raise PatchError(f"checking the artifact needs all its files; missing {sorted(missing)}")
    if wmap.compute_fingerprint(files, weight_map.tensors, weight_map.artifact) != weight_map.fingerprint:
        raise PatchError(f"{weight_map.artifact} does not match its weight map: it was changed outside its adaptive tensors")


def apply_patch_file(
    artifact: Path,
    patch: Path | bytes,
    *,
    out: Path | None = None,
    verify_key: bytes | None = None,
    require_signature: bool = False,
    check_artifact: bool = True,
) -> Patch:
    """Verify `patch` and write it into the artifact on disk; returns the verified patch.

    out=None patches in place: each file holding adaptive bytes is copied to a temporary file
    beside it, patched, fsync'ed and atomically renamed over the original, so a reader or a crash
    sees the old or the new file, never a mix (docs/patch-format.md, "crash safety"). `out` writes a
    complete patched artifact of the same kind there (plus its weight-map sidecar) and leaves the
    original untouched. On any error no artifact byte has changed.
    """
    artifact = Path(artifact)
    wm = wmap.load(artifact, check_fingerprint=False)
    data = _read_patch(patch)
    root = wmap.artifact_root(artifact)
    sizes = {name: (root / name).stat().st_size for name in wm.files}
    p = verify_patch(data, wm, sizes, verify_key=verify_key, require_signature=require_signature)
    if check_artifact:
        _check_artifact_fingerprint(wmap.read_artifact_files(artifact, wm.files), wm)
    if out is None:
        _apply_in_place(artifact, p)
    else:
        _apply_to_copy(artifact, wm, p, Path(out))
    return p


def _read_patch(patch: Path | bytes) -> bytes:
    if isinstance(patch, (bytes, bytearray, memoryview)):
        return patch
    try:
        return Path(patch).read_bytes()
    except FileNotFoundError:
        raise PatchError(f"patch file {patch} does not exist") from None
    except OSError as err:
        raise PatchError(f"cannot read patch {patch}: {err.strerror}") from None


def _destinations(p: Patch) -> dict[str, list[PatchTensor]]:
    by_file: dict[str, list[PatchTensor]] = {}
    for t in p.tensors:
        by_file.setdefault(t.file, []).append(t)
    return by_file


def _apply_in_place(artifact: Path, p: Patch) -> None:
    by_file = _destinations(p)
    if len(by_file) > 1:
        # Several renames cannot be made atomic together; a crash between them would silently mix
        # two parameter sets (the fingerprint ignores adaptive bytes). The exporters never do this.
        raise PatchError(f"adaptive tensors span {len(by_file)} files; in-place apply needs one (write a copy with -o)")
    root = wmap.artifact_root(artifact)
    for name, tensors in by_file.items():
        path = root / name
        mode = path.stat().st_mode
        if not mode & 0o222 or not os.access(path, os.W_OK):
            raise PatchError(f"artifact file {path} is read-only")
        _write_patched(path, path, p, tensors, stat.S_IMODE(mode))


def _apply_to_copy(artifact: Path, wm: WeightMap, p: Patch, out: Path) -> None:
    """Write the patched artifact at `out`. Every file but the main one keeps its name (an .onnx
    file refers to its weight files by name). The main file (or the whole .mlpackage, built in a
    temporary directory) is renamed into place last, after the sidecar, so an `out` that exists
    is complete."""
    if out.resolve() == artifact.resolve():
        raise PatchError(f"-o {out} is the artifact itself; use --in-place")
    by_file = _destinations(p)
    src_root = wmap.artifact_root(artifact)
    if artifact.is_dir():
        if out.exists():
            raise PatchError(f"{out} already exists; remove it or choose another -o")
        out_root, rename = out.parent / f".{out.name}.mnpatch-tmp", {}
    else:
        out_root, rename = out.parent, {artifact.name: out.name}
        clash = [f for f in wm.files if f != artifact.name and (out_root / f).resolve() == (src_root / f).resolve()]
        if clash:
            raise PatchError(f"{out} would share {clash} with {artifact}; write it to another directory")
    try:
        if artifact.is_dir():
            shutil.rmtree(out_root, ignore_errors=True)  # left over by an interrupted -o
        out_root.mkdir(parents=True, exist_ok=True)
        main = None if artifact.is_dir() else artifact.name
        for name in wm.files:
            if name != main:
                dst = out_root / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                _write_patched(src_root / name, dst, p, by_file.get(name, []), 0o644)
        wmap.save(_renamed(wm, rename, out.name), out)
        if main is not None:
            _write_patched(artifact, out, p, by_file.get(main, []), 0o644)
        else:
            out_root.rename(out)
    except OSError as err:
        raise PatchError(f"cannot write {out}: {err.strerror or err}") from None


def _renamed(wm: WeightMap, rename: dict[str, str], artifact_name: str) -> WeightMap:
    """The weight map of a copy whose main file was renamed per `rename`. The fingerprint stays:
    the main file enters it under a fixed label, and adaptive bytes not at all."""
    files = tuple(rename.get(f, f) for f in wm.files)
    tensors = tuple(TensorEntry(**{**t.__dict__, "file": rename.get(t.file, t.file)}) for t in wm.tensors)
    return WeightMap(**{**wm.__dict__, "artifact": artifact_name, "files": files, "tensors": tensors})


def _write_patched(src: Path, dst: Path, p: Patch, tensors: list[PatchTensor], mode: int) -> None:
    """Copy src to a temporary file beside dst, write `tensors` into it, fsync, rename onto dst."""
    tmp = dst.with_name(f".{dst.name}.mnpatch-tmp")
    try:
        shutil.copyfile(src, tmp)
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for t in tensors:
                os.pwrite(fd, p.tensor_bytes(t), t.offset)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PatchError(f"cannot write {dst}: {err.strerror or err}") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one (a patch the
    cloud built, or one the device received)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.mnpatch-tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PatchError(f"cannot write {path}: {err.strerror or err}") from None
