"""Installing a verified patch into an artifact on disk: A/B slots, an exclusive lock, the
device's freshness state, and complete independent copies. Torch-free.

In place, the file that holds the adaptive tensors becomes two slots beside it
(`.<name>.mnslot-<a|b>-<fingerprint prefix>-<sequence>-<keys serial>`) and `<name>` a symlink to
the active one. An apply writes only the patch's bytes into the inactive slot, fdatasyncs it,
then renames a new
symlink over `<name>`: one atomic step that switches the model and records the new state (the
slot's name carries the sequence and key-list serial), so a crash leaves the old model with the
old state or the new model with the new state. O(patch), not O(artifact); the first apply makes
the second slot by copying once. Design and crash story: docs/patch-format.md, "Installing".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from device_runtime import weight_map as wmap
from device_runtime.patch import (
    DeviceState,
    Patch,
    PatchError,
    TrustPolicy,
    check_artifact_fingerprint,
    frozen_bytes,
    verify_patch,
)
from device_runtime.weight_map import TensorEntry, WeightMap

SLOT = re.compile(
    r"\.(?P<name>.+)\.mnslot-(?P<slot>[ab])-(?P<fingerprint>[0-9a-f]{12})-(?P<sequence>[0-9]{1,20})-(?P<serial>[0-9]{1,20})"
)
OPEN_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _slot_name(name: str, slot: str, fingerprint: str, state: DeviceState) -> str:
    """A slot's file name: whose artifact it is (the fingerprint's first 12 hex digits) and the
    state that came with its bytes."""
    return f".{name}.mnslot-{slot}-{fingerprint[:12]}-{state.sequence}-{state.keys_serial}"


def _temp_name(name: str) -> str:
    return f".{name}.mntmp-{secrets.token_hex(8)}"


# ---- the entry point ------------------------------------------------------------------------
def apply_patch_file(
    artifact: Path,
    patch: Path | bytes,
    *,
    out: Path | None = None,
    policy: TrustPolicy = TrustPolicy(),
    check_artifact: bool = True,
    weight_map: WeightMap | None = None,
) -> Patch:
    """Verify `patch` and write it into the artifact on disk; returns the verified patch.

    out=None patches in place through A/B slots (module docstring), under an exclusive lock, and
    checks the patch's sequence against the artifact's state. `out` writes a complete patched
    artifact of the same kind there (plus its weight-map sidecar), independent of every other
    file, and leaves the original untouched: a new artifact, with no state yet (the sequence is
    not checked; expiry, device and signature are). The bytes verified are the bytes written:
    the patch is read once, the artifact's bytes are checked where they are written. On any
    error no artifact byte has changed. `weight_map`: the artifact's, if the caller holds it
    already (a device keeps it loaded), else read from its sidecar.
    """
    artifact = Path(artifact)
    wm = weight_map if weight_map is not None else wmap.load(artifact, check_fingerprint=False)
    data = frozen_bytes(_read_patch(patch))
    if out is None:
        return _apply_in_place(artifact, wm, data, policy, check_artifact)
    return _apply_to_copy(artifact, wm, data, policy, check_artifact, Path(out))


def read_state(artifact: Path) -> DeviceState:
    """The freshness state recorded for `artifact` by in-place applies (fresh: sequence 0)."""
    artifact = Path(artifact)
    wm = wmap.load(artifact, check_fingerprint=False)
    path = wmap.artifact_root(artifact) / _adaptive_file(wm)
    return _active(path, wm.fingerprint).state


def _read_patch(patch: Path | bytes) -> bytes:
    if isinstance(patch, (bytes, bytearray, memoryview)):
        return patch
    try:
        return Path(patch).read_bytes()
    except FileNotFoundError:
        raise PatchError(f"patch file {patch} does not exist") from None
    except OSError as err:
        raise PatchError(f"cannot read patch {patch}: {err.strerror}") from None


def _adaptive_file(wm: WeightMap) -> str:
    files = {t.file for t in wm.tensors}
    if len(files) > 1:
        # Several switches cannot be made atomic together; a crash between them would silently mix
        # two parameter sets (the fingerprint ignores adaptive bytes). The exporters never do this.
        raise PatchError(f"adaptive tensors span {len(files)} files; in-place apply needs one (write a copy with -o)")
    return files.pop()


# ---- in place: A/B slots --------------------------------------------------------------------
@dataclass(frozen=True)
class _Active:
    path: Path  # the user-facing name of the adaptive file
    slot: str | None  # "a"/"b", or None while the file is still a plain file
    file: str  # the name of the file holding the active bytes (a slot, or `path.name`)
    state: DeviceState


def _active(path: Path, fingerprint: str) -> _Active:
    """The active slot of `path` and its state. The state belongs to one artifact: a slot named
    for another fingerprint (the artifact was replaced under the slots) starts afresh."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise PatchError(f"artifact file {path} does not exist") from None
    if stat.S_ISREG(st.st_mode):
        return _Active(path, None, path.name, DeviceState())
    if not stat.S_ISLNK(st.st_mode):
        raise PatchError(f"artifact file {path} is not a regular file")
    target = os.readlink(path)
    match = SLOT.fullmatch(target)
    if match is None or match["name"] != path.name or not stat.S_ISREG(os.lstat(path.parent / target).st_mode):
        raise PatchError(
            f"artifact file {path} is a symlink mntool did not make (to {target!r}); refusing to write through it"
        )
    state = DeviceState(int(match["sequence"]), int(match["serial"]))
    return _Active(path, match["slot"], target, state if match["fingerprint"] == fingerprint[:12] else DeviceState())


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the artifact's directory: concurrent appliers take turns."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _apply_in_place(
    artifact: Path, wm: WeightMap, data: bytes | memoryview, policy: TrustPolicy, check_artifact: bool
) -> Patch:
    root = wmap.artifact_root(artifact)
    adaptive_file = _adaptive_file(wm)
    path = root / adaptive_file
    directory, name = path.parent, path.name
    try:
        with _locked(directory):
            active = _active(path, wm.fingerprint)
            mode = os.stat(path).st_mode
            sizes = {f: (root / f).stat().st_size for f in wm.files}
            p = verify_patch(data, wm, sizes, policy, active.state)
            if not mode & 0o222 or not os.access(path, os.W_OK):
                raise PatchError(f"artifact file {path} is read-only")
            inactive = "b" if active.slot in (None, "a") else "a"
            fd, current = _open_inactive(directory, name, active, inactive, wm.fingerprint)
            if fd >= 0 and check_artifact and not _matches(wm, root, adaptive_file, _read_fd(fd)):
                os.close(fd)
                fd = -1
            if fd < 0:
                fd, current = _build_inactive(directory, name, path, wm, root, adaptive_file, check_artifact)
            try:
                for t in p.tensors:
                    os.pwrite(fd, p.tensor_bytes(t), t.offset)
                if stat.S_IMODE(os.fstat(fd).st_mode) != stat.S_IMODE(mode):
                    os.fchmod(fd, stat.S_IMODE(mode))
                # the slot's data must be on disk before the switch can be: its blocks (fdatasync;
                # the file's times need not be), then the rename, which the journal orders after them
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if active.slot is None:
                # keep the plain file's bytes as slot "a" (a hard link: no copy), the next apply's inactive slot
                os.link(path, directory / _slot_name(name, "a", wm.fingerprint, active.state), follow_symlinks=False)
            new_name = _slot_name(name, inactive, wm.fingerprint, active.state.after(p))
            os.replace(directory / current, directory / new_name)
            link = directory / _temp_name(name)
            os.symlink(new_name, link)
            os.replace(link, path)  # the switch: model and state change together
    except OSError as err:
        raise PatchError(f"cannot write {path}: {err.strerror or err}") from None
    return p


def _open_inactive(directory: Path, name: str, active: _Active, slot: str, fingerprint: str) -> tuple[int, str | None]:
    """(fd, file name) of the inactive slot opened for writing, or (-1, None) if there is none.
    On the way, removes what interrupted applies or a replaced artifact left: temporary files,
    and slots that are neither the active one nor the one inactive slot of this artifact (stale
    slots beside a plain file, slots of another fingerprint, a duplicate from a crash between
    renames)."""
    found = None
    for entry in sorted(os.listdir(directory)):
        match = SLOT.fullmatch(entry)
        if match and match["name"] == name and entry != active.file:
            ours = match["slot"] == slot and match["fingerprint"] == fingerprint[:12]
            if active.slot is not None and ours and found is None:
                found = entry
            else:
                os.unlink(directory / entry)
        elif entry.startswith(f".{name}.mntmp-"):
            os.unlink(directory / entry)
    if found is None:
        return -1, None
    fd = os.open(directory / found, os.O_RDWR | OPEN_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PatchError(f"slot {directory / found} is not a regular file")
    return fd, found


def _build_inactive(
    directory: Path,
    name: str,
    path: Path,
    wm: WeightMap,
    root: Path,
    adaptive_file: str,
    check: bool,
) -> tuple[int, str]:
    """A new inactive slot, as a temporary file, from the active file: read once, check those
    bytes, write exactly them. Returns (fd open for writing, its name)."""
    active_bytes = path.read_bytes()
    if check and not _matches(wm, root, adaptive_file, active_bytes):
        raise PatchError(f"{wm.artifact} does not match its weight map: it was changed outside its adaptive tensors")
    tmp = _temp_name(name)
    fd = os.open(directory / tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_NOFOLLOW, 0o600)
    try:
        _write_all(fd, active_bytes)
    except OSError:
        os.close(fd)
        raise
    return fd, tmp


def _write_all(fd: int, data: bytes | memoryview, offset: int = 0) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _matches(wm: WeightMap, root: Path, adaptive_file: str, adaptive_bytes: bytes) -> bool:
    """Whether the artifact, with `adaptive_bytes` as its adaptive file, matches its fingerprint."""
    files = {f: adaptive_bytes if f == adaptive_file else (root / f).read_bytes() for f in wm.files}
    try:
        check_artifact_fingerprint(files, wm)
    except PatchError:
        return False
    return True


# ---- to a copy -------------------------------------------------------------------------------
def _apply_to_copy(
    artifact: Path,
    wm: WeightMap,
    data: bytes | memoryview,
    policy: TrustPolicy,
    check_artifact: bool,
    out: Path,
) -> Patch:
    """Write a complete patched artifact at `out`, from one read of the original's files (the
    bytes checked are the bytes copied). Every file but the main one keeps its name (an .onnx
    refers to its weight files by name), so those must not exist yet: an earlier copy's weight
    file is never overwritten. Each file is published exclusively after its data is on disk; the
    file that makes the artifact visible (the main file, or the .mlpackage rename) comes last."""
    if out.resolve() == artifact.resolve():
        raise PatchError(f"-o {out} is the artifact itself; use --in-place")
    src_root = wmap.artifact_root(artifact)
    files = wmap.read_artifact_files(artifact, wm.files)
    p = verify_patch(data, wm, {f: len(b) for f, b in files.items()}, policy)
    if check_artifact:
        check_artifact_fingerprint(files, wm)
    patched = {f: bytearray(b) for f, b in files.items() if any(t.file == f for t in p.tensors)}
    for t in p.tensors:
        memoryview(patched[t.file])[t.offset : t.offset + t.nbytes] = p.tensor_bytes(t)
    contents = {f: patched.get(f, files[f]) for f in wm.files}
    if artifact.is_dir():
        if out.exists() or out.is_symlink():
            raise PatchError(f"{out} already exists; remove it or choose another -o")
        _write_package(out, contents, wm)
    else:
        main = artifact.name
        taken = [f for f in wm.files if f != main and ((out.parent / f).exists() or (out.parent / f).is_symlink())]
        if taken:
            shared = [f for f in taken if (out.parent / f).resolve() == (src_root / f).resolve()]
            if shared:
                raise PatchError(f"{out} would share {shared} with {artifact}; write it to another directory")
            raise PatchError(
                f"{out.parent / taken[0]} already exists (another artifact's weights?); write {out.name} to an empty directory"
            )
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            for f in wm.files:
                if f != main:
                    _publish(out.parent / f, contents[f], exclusive=True)
            wmap.save(_renamed(wm, {main: out.name}, out.name), out)
            _publish(out, contents[main], exclusive=False)
        except OSError as err:
            raise PatchError(f"cannot write {out}: {err.strerror or err}") from None
    return p


def _write_package(out: Path, contents: dict[str, bytes | bytearray], wm: WeightMap) -> None:
    """Build a directory artifact under a unique temporary name beside `out`, then rename it."""
    tmp = out.parent / _temp_name(out.name)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        for f, data in contents.items():
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            _publish(tmp / f, data, exclusive=True)
        wmap.save(_renamed(wm, {}, out.name), out)
        os.rename(tmp, out)  # fails if `out` appeared meanwhile (a non-empty directory)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PatchError(f"cannot write {out}: {err.strerror or err}") from None


def _renamed(wm: WeightMap, rename: dict[str, str], artifact_name: str) -> WeightMap:
    """The weight map of a copy whose main file was renamed per `rename`. The fingerprint stays:
    the main file enters it under a fixed label, and adaptive bytes not at all."""
    files = tuple(rename.get(f, f) for f in wm.files)
    tensors = tuple(TensorEntry(**{**t.__dict__, "file": rename.get(t.file, t.file)}) for t in wm.tensors)
    return WeightMap(**{**wm.__dict__, "artifact": artifact_name, "files": files, "tensors": tensors})


def _publish(path: Path, data: bytes | bytearray | memoryview, *, exclusive: bool, mode: int = 0o644) -> None:
    """Write `data` to a new temporary file beside `path` (created exclusively, never through a
    symlink), fsync it, then make it `path`: with `exclusive`, only if `path` does not exist
    (a hard link, which fails on an existing name), else replacing it atomically."""
    tmp = path.with_name(_temp_name(path.name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_NOFOLLOW, mode)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path, follow_symlinks=False)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one (a patch the
    cloud built, or one the device received); a symlink at a temporary name cannot redirect it."""
    path = Path(path)
    try:
        _publish(path, data, exclusive=False)
    except OSError as err:
        raise PatchError(f"cannot write {path}: {err.strerror or err}") from None
