"""The weight map: where each adaptive tensor of a compiled artifact lives, byte for byte.

This is half of the cloud/device contract (the patch format is the other half). The exporter
writes it beside the artifact as `<artifact>.weightmap.json`; the patch builder reads it to lay
parameters out exactly as the artifact stores them; the device checks patches against it. It is
plain JSON + numpy so that the device side can read it without torch. Format: docs/weight-map.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from device_runtime.errors import MntoolError

FORMAT_NAME = "mntool-weight-map"
FORMAT_VERSION = 1
TARGETS = ("tflite", "onnx", "coreml", "executorch")
DTYPES = {"float32": 4, "float16": 2}
LAYOUTS = ("identity", "transpose")
# "buffers": adaptive tensors are constants compiled into the artifact's files (patch = memcpy);
# "inputs": they are extra model inputs, and `tensors` point into a flat file the app feeds them from.
MODES = ("buffers", "inputs")
SUFFIX = ".weightmap.json"


class WeightMapError(MntoolError):
    """A weight map is missing, malformed, of an unknown version, or disagrees with its artifact."""


@dataclass(frozen=True)
class IOSpec:
    """One model input or output: the PyTorch forward() name and the runtime's tensor name."""

    name: str
    runtime_name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    """One adaptive tensor: PyTorch name/shape and its exact bytes in the artifact.

    `file` is relative to the artifact root (see `artifact_root`). `stored_shape` is the shape in
    the artifact after `layout` (for "transpose": the reverse of `shape`, 2-D only; for "identity"
    any shape of as many elements, the same C-order bytes, e.g. (1, C, 1, 1) for (C,)). The bytes are
    little-endian `dtype`, C order, `nbytes` long, starting at `offset`, which is a multiple of
    `alignment`.
    """

    name: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int
    dtype: str
    layout: str
    stored_shape: tuple[int, ...]
    alignment: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class WeightMap:
    target: str
    artifact: str  # the artifact's own name (file or .mlpackage dir), relative to its parent
    files: tuple[str, ...]  # every file of the artifact, relative to the artifact root
    fingerprint: str  # see `compute_fingerprint`
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    tensors: tuple[TensorEntry, ...]
    extra: dict = field(default_factory=dict)  # target-specific facts (e.g. adaptive region)
    mode: str = "buffers"  # one of MODES
    # what the inputs mean to the model's task, as the exporting caller declared it (e.g. a
    # recommender's ranking form: device_runtime.ranking); {} if undeclared. Exporters copy it, never read it
    form: dict = field(default_factory=dict)
    version: int = FORMAT_VERSION

    # ---- lookup -----------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise WeightMapError(f"weight map has no adaptive tensor named {name!r}")

    @property
    def adaptive_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d = {"format": FORMAT_NAME, **d}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> WeightMap:
        try:
            if d.get("format") != FORMAT_NAME:
                raise WeightMapError(f"not a weight map (format={d.get('format')!r})")
            if not _is_int(d.get("version")) or d.get("version") != FORMAT_VERSION:
                raise WeightMapError(
                    f"weight map version {d.get('version')!r} is not supported (this mntool reads {FORMAT_VERSION})"
                )
            wm = cls(
                target=d["target"],
                artifact=d["artifact"],
                files=tuple(d["files"]),
                fingerprint=d["fingerprint"],
                inputs=tuple(IOSpec(i["name"], i["runtime_name"], i["dtype"], tuple(i["shape"])) for i in d["inputs"]),
                outputs=tuple(
                    IOSpec(o["name"], o["runtime_name"], o["dtype"], tuple(o["shape"])) for o in d["outputs"]
                ),
                tensors=tuple(
                    TensorEntry(
                        name=t["name"],
                        shape=tuple(t["shape"]),
                        file=t["file"],
                        offset=_json_int(t, "offset"),
                        nbytes=_json_int(t, "nbytes"),
                        dtype=t["dtype"],
                        layout=t["layout"],
                        stored_shape=tuple(t["stored_shape"]),
                        alignment=_json_int(t, "alignment"),
                    )
                    for t in d["tensors"]
                ),
                extra=dict(d.get("extra", {})),
                mode=d.get("mode", "buffers"),
                form=d.get("form", {}),
                version=d["version"],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise WeightMapError(f"malformed weight map: {type(err).__name__}: {err}") from None
        if not (
            isinstance(wm.fingerprint, str)
            and len(wm.fingerprint) == 64
            and set(wm.fingerprint) <= set("0123456789abcdef")
        ):
            raise WeightMapError(f"weight map fingerprint {wm.fingerprint!r} is not a SHA-256 hex digest")
        wm.validate()
        return wm

    @classmethod
    def from_json(cls, text: str) -> WeightMap:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise WeightMapError(f"weight map is not valid JSON: {err}") from None
        if not isinstance(d, dict):
            raise WeightMapError("weight map is not a JSON object")
        return cls.from_dict(d)

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check internal consistency (no file access)."""
        if self.target not in TARGETS:
            raise WeightMapError(f"weight map target {self.target!r} is not one of {TARGETS}")
        if self.mode not in MODES:
            raise WeightMapError(f"weight map mode {self.mode!r} is not one of {MODES}")
        if not isinstance(self.form, dict):
            raise WeightMapError(f"weight map form must be a JSON object, got {type(self.form).__name__}")
        for f in self.files:
            _check_relative_path(f)
        if len(set(self.files)) != len(self.files):
            raise WeightMapError("weight map lists a file twice")
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            spec_names = [s.name for s in specs]
            if len(set(spec_names)) != len(spec_names):
                raise WeightMapError(f"weight map lists an {kind} name twice")
            for s in specs:
                _check_shape(f"{kind} {s.name!r}", s.shape)
        if not self.tensors:
            raise WeightMapError("weight map lists no adaptive tensors")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise WeightMapError("weight map lists a tensor twice")
        inputs = {s.name: s for s in self.inputs}
        spans: dict[str, list[tuple[int, int, str]]] = {}
        for t in self.tensors:
            _check_shape(t.name, t.shape)
            _check_shape(t.name, t.stored_shape)
            if self.mode == "inputs" and (t.name not in inputs or inputs[t.name].shape != t.shape):
                raise WeightMapError(f"{t.name}: mode 'inputs' needs an input of that name and shape {t.shape}")
            if t.dtype not in DTYPES:
                raise WeightMapError(f"{t.name}: dtype {t.dtype!r} is not one of {sorted(DTYPES)}")
            if t.layout not in LAYOUTS:
                raise WeightMapError(f"{t.name}: layout {t.layout!r} is not one of {LAYOUTS}")
            if t.layout == "transpose" and len(t.shape) != 2:
                raise WeightMapError(f"{t.name}: transpose layout needs a 2-D tensor, got shape {t.shape}")
            # identity: the same elements in the same order, so any reshape (a converter may store a
            # (C,) per-channel scale as (1, C, 1, 1)); transpose: exactly the reversed 2-D shape
            follows = (
                t.stored_shape == tuple(reversed(t.shape))
                if t.layout == "transpose"
                else math.prod(t.stored_shape) == math.prod(t.shape)
            )
            if not follows:
                raise WeightMapError(
                    f"{t.name}: stored_shape {t.stored_shape} does not follow from {t.shape} + {t.layout}"
                )
            if t.nbytes != t.numel * DTYPES[t.dtype]:
                raise WeightMapError(f"{t.name}: {t.nbytes} bytes does not hold {t.numel} x {t.dtype}")
            if t.offset < 0 or t.alignment < 1 or t.offset % t.alignment:
                raise WeightMapError(f"{t.name}: offset {t.offset} is not a multiple of alignment {t.alignment}")
            if t.file not in self.files:
                raise WeightMapError(f"{t.name}: file {t.file!r} is not one of the artifact's files")
            spans.setdefault(t.file, []).append((t.offset, t.offset + t.nbytes, t.name))
        for file, ranges in spans.items():
            ranges.sort()
            for (_, a1, an), (b0, _, bn) in zip(ranges, ranges[1:]):
                if b0 < a1:
                    raise WeightMapError(f"{an} and {bn} overlap in {file}")

    def check_against(self, artifact: Path) -> None:
        """Check that the artifact on disk has every file, and every tensor fits inside it."""
        root = artifact_root(artifact)
        for f in self.files:
            if not (root / f).is_file():
                raise WeightMapError(f"artifact file {root / f} is missing")
        for t in self.tensors:
            size = (root / t.file).stat().st_size
            if t.offset + t.nbytes > size:
                raise WeightMapError(
                    f"{t.name}: bytes [{t.offset}, {t.offset + t.nbytes}) lie outside {t.file} ({size} B)"
                )


def _is_int(value) -> bool:
    """A JSON integer: not a float (64.9, or 64.0) and not a boolean (which Python counts as int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _json_int(entry: dict, key: str) -> int:
    """`entry[key]` when it is an integer; a WeightMapError instead of rounding (`int(64.9)`)."""
    value = entry[key]
    if not _is_int(value):
        raise WeightMapError(f"{entry.get('name')}: {key} {value!r} is not an integer")
    return value


def _check_shape(what: str, shape: tuple) -> None:
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise WeightMapError(f"{what}: shape {shape} is not a list of non-negative integers")


def _check_relative_path(name: str) -> None:
    """Artifact file names stay inside the artifact root: a weight map must not aim writes elsewhere."""
    if not isinstance(name, str) or not name:
        raise WeightMapError(f"artifact file name {name!r} is not a plain relative path inside the artifact")
    parts = name.replace("\\", "/").split("/")
    if parts[0] == "" or ".." in parts or ":" in parts[0]:
        raise WeightMapError(f"artifact file name {name!r} is not a plain relative path inside the artifact")


def read_tensor(entry: TensorEntry, data: bytes | bytearray | memoryview) -> np.ndarray:
    """The value `entry` holds in `data` (the contents of `entry.file`): its stored dtype, in
    PyTorch order (the layout transform undone). A read-only view where no transpose is needed."""
    stored = np.frombuffer(data, np.dtype(entry.dtype).newbyteorder("<"), entry.numel, entry.offset)
    stored = stored.reshape(entry.stored_shape)
    return stored.T if entry.layout == "transpose" else stored.reshape(entry.shape)


# ---- artifact paths and fingerprint ---------------------------------------------------------
def artifact_root(artifact: Path) -> Path:
    """The directory that weight-map file names are relative to: the .mlpackage itself, or the
    directory holding a .tflite / .onnx file."""
    artifact = Path(artifact)
    return artifact if artifact.is_dir() else artifact.parent


def sidecar_path(artifact: Path) -> Path:
    """Where the weight map of `artifact` lives: `<artifact>.weightmap.json` beside it."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + SUFFIX)


ARTIFACT_LABEL = "<artifact>"  # the name the main artifact file is hashed under


def compute_fingerprint(
    files: dict[str, bytes], tensors: tuple[TensorEntry, ...] | list[TensorEntry], artifact: str
) -> str:
    """SHA-256 over the artifact's files in name order with every adaptive byte range zeroed.

    Changing adaptive values (patching) leaves it unchanged, so a patched artifact can be patched
    again; changing anything else (graph, static weights, file set) changes it. Each file
    contributes `name NUL length(8 bytes LE) bytes-with-adaptive-ranges-zeroed`, where the main
    artifact file (`artifact`, for .tflite / .onnx) is named `<artifact>`: a renamed copy (e.g.
    `patch-weights -o patched.tflite`) keeps its fingerprint and takes the same patches.
    """
    by_file: dict[str, list[TensorEntry]] = {}
    for t in tensors:
        by_file.setdefault(t.file, []).append(t)
    h = hashlib.sha256()
    for name in sorted(files, key=lambda f: ARTIFACT_LABEL if f == artifact else f):
        data = files[name]
        label = ARTIFACT_LABEL if name == artifact else name
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little"))
        pos = 0
        for t in sorted(by_file.get(name, []), key=lambda e: e.offset):
            h.update(memoryview(data)[pos : t.offset])
            h.update(bytes(t.nbytes))
            pos = t.offset + t.nbytes
        h.update(memoryview(data)[pos:])
    return h.hexdigest()


def read_artifact_files(artifact: Path, files: tuple[str, ...] | list[str]) -> dict[str, bytes]:
    root = artifact_root(artifact)
    return {f: (root / f).read_bytes() for f in files}


def load(artifact: Path, *, check_fingerprint: bool = True) -> WeightMap:
    """Load and validate the weight map of `artifact` from its sidecar JSON."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise WeightMapError(f"artifact {artifact} does not exist")
    path = sidecar_path(artifact)
    if not path.is_file():
        raise WeightMapError(f"no weight map beside {artifact} (expected {path.name}); was it exported by mntool?")
    wm = WeightMap.from_json(path.read_text())
    wm.check_against(artifact)
    if check_fingerprint:
        fp = compute_fingerprint(read_artifact_files(artifact, wm.files), wm.tensors, wm.artifact)
        if fp != wm.fingerprint:
            raise WeightMapError(
                f"{artifact} does not match its weight map (fingerprint {fp[:12]} != {wm.fingerprint[:12]}): "
                "the artifact was changed outside its adaptive tensors"
            )
    return wm


def save(wm: WeightMap, artifact: Path) -> Path:
    wm.validate()
    path = sidecar_path(artifact)
    path.write_text(wm.to_json())
    return path
