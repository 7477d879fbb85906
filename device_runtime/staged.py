"""Staged (early-exit) artifacts on the device: load and validate, run with early exit, patch,
benchmark. Torch-free (numpy and the runtimes).

A staged artifact is a directory `<name>.<target>.stages/` holding one ordinary exported artifact per stage
(`stage0.tflite` + `stage0.tflite.weightmap.json`, ...) and a manifest `stages.json`
(docs/weight-map.md, "Staged (early-exit) artifacts"). Stage 0 reads the images; stage k > 0 reads
the previous stage's `features`; every stage ends in an exit (its `embedding` and `logits`), so an
app that is confident after stage k never runs the stages after it. Each stage has its own weight
map, fingerprint and patches: `build_staged_patches` (cloud, `mntool.patches`) makes one patch per
stage, `apply_staged_patches` verifies every one of them before writing any.
"""

from __future__ import annotations

import gc
import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from device_runtime import weight_map as weight_maps
from device_runtime.bench import (
    BenchConfig,
    LatencyStats,
    _host,
    _runtime_version,
    empty_call,
    run_worker,
    time_interleaved,
    worker_main,
)
from device_runtime.errors import MntoolError
from device_runtime.exit_policy import confidence
from device_runtime.install import apply_patch_file, read_state
from device_runtime.patch import Patch, PatchError, TrustPolicy, frozen_bytes, verify_patch
from device_runtime.profiles import DeviceProfile
from device_runtime.runners import RUNTIME_OF_TARGET, Runner, RunnerConfig, load_inputs, open_runner
from device_runtime.weight_map import IOSpec, WeightMap, WeightMapError

FORMAT_NAME = "mntool-staged"
FORMAT_VERSION = 1
MANIFEST = "stages.json"
SUFFIX = ".stages"  # the directory's name: `<name>.<target>.stages`
FEATURES, EMBEDDING, LOGITS = "features", "embedding", "logits"  # what the stages output
HEX64 = re.compile(r"[0-9a-f]{64}")
DEFAULT_STREAM = 100  # random images a benchmark streams through the early-exit path without --inputs

Progress = Callable[[int], None]


class StagedError(MntoolError):
    """A staged artifact is missing, malformed, of an unknown version, or disagrees with its stages."""


# ---- the manifest ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StageEntry:
    artifact: str  # the stage's artifact, a plain name inside the .stages directory
    fingerprint: str  # its weight map's fingerprint
    input: str  # its one non-adaptive input (what stage 0 takes the images as, or the previous features)
    outputs: tuple[str, ...]  # (features, embedding, logits), the last stage (embedding, logits)
    adaptive: tuple[str, ...]  # the adaptive tensors it holds, in its weight map's order


@dataclass(frozen=True)
class ExitEntry:
    stage: int  # the stage whose `logits` are this exit's
    weight: str  # the exit's linear layer: weight name ...
    bias: str  # ... and bias name (adaptive tensors of that stage)


@dataclass(frozen=True)
class StagedManifest:
    target: str
    stages: tuple[StageEntry, ...]
    exits: tuple[ExitEntry, ...]
    n_classes: int
    extra: dict = field(default_factory=dict)  # informative; readers ignore unknown keys
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d) -> StagedManifest:
        """Parse and validate a manifest's JSON object; a StagedError naming the first problem."""
        if not isinstance(d, dict):
            raise StagedError("manifest is not a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise StagedError(f"not a staged-artifact manifest (format={d.get('format')!r})")
        version = d.get("version")
        if not _is_int(version) or version != FORMAT_VERSION:
            raise StagedError(
                f"staged manifest version {version!r} is not supported (this mntool reads {FORMAT_VERSION})"
            )
        target = d.get("target")
        if target not in weight_maps.TARGETS:
            raise StagedError(f"unknown target {target!r} (known: {', '.join(weight_maps.TARGETS)})")
        n_classes = d.get("n_classes")
        if not _is_int(n_classes) or n_classes < 1:
            raise StagedError(f"n_classes {n_classes!r} is not a positive integer")
        raw_stages, raw_exits = d.get("stages"), d.get("exits")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise StagedError("manifest has no list of stages")
        stages = tuple(_stage_entry(i, s, i == len(raw_stages) - 1) for i, s in enumerate(raw_stages))
        names = [s.artifact for s in stages]
        if len(set(names)) != len(names):
            raise StagedError(f"stage artifacts are not distinct: {names}")
        owner: dict[str, int] = {}
        for i, s in enumerate(stages):
            for name in s.adaptive:
                if name in owner:
                    raise StagedError(f"adaptive tensor {name!r} is listed by stages {owner[name]} and {i}")
                owner[name] = i
        if not isinstance(raw_exits, list) or len(raw_exits) != len(stages):
            raise StagedError(f"manifest must list one exit per stage ({len(stages)})")
        exits = tuple(_exit_entry(i, e, stages[i]) for i, e in enumerate(raw_exits))
        extra = d.get("extra", {})
        if not isinstance(extra, dict):
            raise StagedError("extra is not a JSON object")
        return cls(target, stages, exits, n_classes, extra, version)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_list(value, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise StagedError(f"{what} is not a list of names")
    return tuple(value)


def check_stage_name(name) -> None:
    """A stage artifact is a plain name inside the .stages directory: no path, no `..`, no hidden file."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".") or ":" in name:
        raise StagedError(f"stage artifact {name!r} is not a plain file name inside the staged artifact")


def _stage_entry(i: int, s, last: bool) -> StageEntry:
    if not isinstance(s, dict):
        raise StagedError(f"stage {i} is not a JSON object")
    try:
        artifact, fingerprint, input_name = s["artifact"], s["fingerprint"], s["input"]
        outputs, adaptive = s["outputs"], s["adaptive"]
    except KeyError as err:
        raise StagedError(f"stage {i} lacks field {err.args[0]!r}") from None
    check_stage_name(artifact)
    if not isinstance(fingerprint, str) or not HEX64.fullmatch(fingerprint):
        raise StagedError(f"stage {i}: fingerprint {fingerprint!r} is not 64 hex digits")
    if not isinstance(input_name, str) or not input_name:
        raise StagedError(f"stage {i}: input {input_name!r} is not a name")
    outputs = _str_list(outputs, f"stage {i} outputs")
    needed = (EMBEDDING, LOGITS) if last else (FEATURES, EMBEDDING, LOGITS)
    missing = [n for n in needed if n not in outputs]
    if missing:
        raise StagedError(f"stage {i} outputs {list(outputs)} lack {missing}")
    return StageEntry(artifact, fingerprint, input_name, outputs, _str_list(adaptive, f"stage {i} adaptive"))


def _exit_entry(i: int, e, stage: StageEntry) -> ExitEntry:
    if not isinstance(e, dict):
        raise StagedError(f"exit {i} is not a JSON object")
    if e.get("stage") != i or not _is_int(e.get("stage")):
        raise StagedError(f"exit {i} is at stage {e.get('stage')!r}; version 1 has exit k at stage k")
    weight, bias = e.get("weight"), e.get("bias")
    for name in (weight, bias):
        if name not in stage.adaptive:
            raise StagedError(f"exit {i}: {name!r} is not an adaptive tensor of stage {i}")
    return ExitEntry(i, weight, bias)


# ---- loading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagedArtifact:
    """A loaded, validated staged artifact: its manifest and every stage's weight map."""

    path: Path  # the .stages directory
    manifest: StagedManifest
    weight_maps: tuple[WeightMap, ...]

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def stages(self) -> tuple[StageEntry, ...]:
        return self.manifest.stages

    @property
    def exits(self) -> tuple[ExitEntry, ...]:
        return self.manifest.exits

    @property
    def n_exits(self) -> int:
        return len(self.manifest.exits)

    @property
    def n_classes(self) -> int:
        return self.manifest.n_classes

    @property
    def adaptive_names(self) -> list[str]:
        return [n for s in self.stages for n in s.adaptive]

    def artifact(self, k: int) -> Path:
        return self.path / self.stages[k].artifact

    def input_spec(self, k: int = 0) -> IOSpec:
        """Stage k's (non-adaptive) input as its weight map declares it."""
        name = self.stages[k].input
        return next(s for s in self.weight_maps[k].inputs if s.name == name)

    @property
    def batch(self) -> int:
        """The static batch the stages were exported with."""
        return self.input_spec(0).shape[0]


def is_staged(path: Path | str) -> bool:
    """Whether `path` names a staged artifact (a `.stages` directory, or any directory with a manifest)."""
    path = Path(path)
    return path.is_dir() and (path.suffix == SUFFIX or (path / MANIFEST).is_file())


def load_staged(path: Path | str, *, check_fingerprint: bool = True) -> StagedArtifact:
    """Load and validate `path` (the .stages directory, or its stages.json): the manifest, every
    stage's weight map (files present, fingerprint over the files unless `check_fingerprint` is
    False) and that each agrees with the manifest, and that the stages chain (stage k's features
    are stage k+1's input). StagedError, one line, naming the first problem."""
    path = Path(path)
    if path.name == MANIFEST and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise StagedError(f"staged artifact {path} is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise StagedError(f"{path} has no {MANIFEST}; is it a staged artifact exported by mntool?")
    try:
        raw = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StagedError(f"{manifest_path} is not valid JSON: {err}") from None
    try:
        manifest = StagedManifest.from_dict(raw)
    except StagedError as err:
        raise StagedError(f"{manifest_path}: {err}") from None
    maps = []
    for k, entry in enumerate(manifest.stages):
        artifact = path / entry.artifact
        where = f"{path}: stage {k} ({entry.artifact})"
        if not artifact.exists():
            raise StagedError(f"{where} does not exist")
        try:
            wm = weight_maps.load(artifact, check_fingerprint=check_fingerprint)
        except WeightMapError as err:
            raise StagedError(f"{where}: {err}") from None
        _check_stage(where, manifest, k, wm)
        maps.append(wm)
    for k in range(len(maps) - 1):
        features = next(o for o in maps[k].outputs if o.name == FEATURES)
        following = next(i for i in maps[k + 1].inputs if i.name == manifest.stages[k + 1].input)
        if (features.shape, features.dtype) != (following.shape, following.dtype):
            raise StagedError(
                f"{path}: stage {k} features {features.dtype} {features.shape} do not fit stage {k + 1}'s input "
                f"{following.dtype} {following.shape}"
            )
    return StagedArtifact(path, manifest, tuple(maps))


def _check_stage(where: str, manifest: StagedManifest, k: int, wm: WeightMap) -> None:
    entry = manifest.stages[k]
    if wm.fingerprint != entry.fingerprint:
        raise StagedError(
            f"{where}: weight map fingerprint {wm.fingerprint[:12]} != the manifest's {entry.fingerprint[:12]} "
            "(the stage was replaced or re-exported without its manifest)"
        )
    if wm.target != manifest.target:
        raise StagedError(f"{where}: a {wm.target} artifact in a {manifest.target} staged artifact")
    if tuple(wm.adaptive_names) != entry.adaptive:
        raise StagedError(f"{where}: weight map's adaptive tensors {wm.adaptive_names} != the manifest's")
    free = [s for s in wm.inputs if s.name not in wm.adaptive_names]
    if [s.name for s in free] != [entry.input]:
        raise StagedError(f"{where}: inputs {[s.name for s in free]} != the manifest's [{entry.input!r}]")
    if tuple(o.name for o in wm.outputs) != entry.outputs:
        raise StagedError(f"{where}: outputs {[o.name for o in wm.outputs]} != the manifest's {list(entry.outputs)}")
    logits = next(o for o in wm.outputs if o.name == LOGITS)
    if not logits.shape or logits.shape[-1] != manifest.n_classes:
        raise StagedError(f"{where}: logits of shape {logits.shape} do not have {manifest.n_classes} classes")


# ---- running ---------------------------------------------------------------------------------
@dataclass
class _Stage:
    runner: Runner
    arrays: list[np.ndarray]  # what `invoke` takes; `slot` is the stage's own input, the rest bound
    slot: int
    features: int | None  # output positions
    embedding: int
    logits: int


class StagedRunner:
    """One runner per stage, opened once, with every input and output position resolved up front,
    so a call costs the runtimes' invocations and little else (what a latency measurement wants).

    `files`: per stage index, that stage's files in memory (as `open_runner` takes them: a patched
    copy), for stages not read from disk."""

    def __init__(
        self,
        staged: StagedArtifact | Path | str,
        threads: int = 1,
        *,
        config: RunnerConfig | None = None,
        runtime: str | None = None,
        files: Mapping[int, Mapping[str, bytes | bytearray]] | None = None,
    ) -> None:
        self.staged = staged if isinstance(staged, StagedArtifact) else load_staged(staged)
        self.config = config or RunnerConfig(threads=threads)
        self.runtime = runtime or RUNTIME_OF_TARGET[self.staged.target]
        self.input = self.staged.input_spec(0)
        self._stages: list[_Stage] = []
        try:
            for k, (entry, wm) in enumerate(zip(self.staged.stages, self.staged.weight_maps)):
                runner = open_runner(
                    self.staged.artifact(k),
                    runtime=self.runtime,
                    files=(files or {}).get(k),
                    weight_map=wm,
                    config=self.config,
                )
                self._stages.append(self._resolve(runner, entry))
        except BaseException:
            self.close()
            raise
        self.last = len(self._stages) - 1

    @staticmethod
    def _resolve(runner: Runner, entry: StageEntry) -> _Stage:
        names = [s.name for s in runner.inputs]
        slot = names.index(entry.input)
        own = runner.inputs[slot]
        arrays = runner.prepare({entry.input: np.zeros(own.shape, own.dtype)})  # bound inputs checked and cast once
        outputs = [s.name for s in runner.outputs]
        features = outputs.index(FEATURES) if FEATURES in outputs else None
        return _Stage(runner, arrays, slot, features, outputs.index(EMBEDDING), outputs.index(LOGITS))

    @property
    def n_exits(self) -> int:
        return len(self._stages)

    @property
    def batch(self) -> int:
        return self.input.shape[0]

    # ---- inputs
    def prepare(self, images) -> tuple[list[np.ndarray], int, bool]:
        """`images` as stage 0's input: a list of float32 arrays of the artifact's static batch (the
        last one zero-padded), the number of images, and whether a single unbatched image was given.
        A single image is the input's shape without the batch axis (or without the channel axis
        too, for one channel); a batch adds a leading axis. Values are floats (pixels in [0, 1])."""
        x = np.asarray(images)
        if x.dtype.kind != "f":
            raise StagedError(f"images must be floats (pixels in [0, 1]), got {x.dtype}")
        item = tuple(self.input.shape[1:])
        short = item[1:] if item and item[0] == 1 else None
        if x.shape == item or (short is not None and x.shape == short):
            single, x = True, x.reshape((1, *item))
        elif x.shape[1:] == item or (short is not None and x.ndim == len(item) and x.shape[1:] == short):
            single, x = False, x.reshape((x.shape[0], *item))
        else:
            raise StagedError(f"images of shape {x.shape} do not fit the artifact's input {self.input.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, b = x.shape[0], self.batch
        if n == 0:
            raise StagedError("no images given")
        chunks = []
        for i in range(0, n, b):
            chunk = x[i : i + b]
            if chunk.shape[0] < b:
                chunk = np.concatenate([chunk, np.zeros((b - chunk.shape[0], *item), np.float32)])
            chunks.append(chunk)
        return chunks, n, single

    # ---- calls
    def invoke(self, k: int, x: np.ndarray) -> list[np.ndarray]:
        """Stage k alone on its prepared input `x`: its outputs in the weight map's order."""
        stage = self._stages[k]
        stage.arrays[stage.slot] = x
        return stage.runner.invoke(stage.arrays)

    def run_path(self, x: np.ndarray, k: int) -> list[np.ndarray]:
        """Stages 0..k on a prepared stage-0 input: stage k's outputs (the work of answering at exit k)."""
        for j in range(k):
            x = self.invoke(j, x)[self._stages[j].features]
        return self.invoke(k, x)

    def run_all(self, images) -> list[dict[str, np.ndarray]]:
        """Every stage in order on `images` (a batch, or one image): per exit {"embedding", "logits"},
        each with a leading batch axis (of 1 for a single image)."""
        chunks, n, _ = self.prepare(images)
        parts: list[dict[str, list[np.ndarray]]] = [{EMBEDDING: [], LOGITS: []} for _ in self._stages]
        for x in chunks:
            for k, stage in enumerate(self._stages):
                out = self.invoke(k, x)
                parts[k][EMBEDDING].append(out[stage.embedding])
                parts[k][LOGITS].append(out[stage.logits])
                if stage.features is not None:
                    x = out[stage.features]
        return [{name: np.concatenate(v)[:n] for name, v in p.items()} for p in parts]

    def thresholds(self, thresholds: float | Sequence[float]) -> tuple[float, ...]:
        """`thresholds` as one float per early exit (a single float, or a sequence of one, applies to all)."""
        if isinstance(thresholds, (int, float, np.floating, np.integer)):
            thresholds = (thresholds,)
        values = tuple(float(t) for t in thresholds)
        if len(values) == 1:
            values *= self.last
        elif len(values) != self.last:
            raise StagedError(f"give one threshold or {self.last} (one per early exit), got {len(values)}")
        if any(math.isnan(t) for t in values):
            raise StagedError("a threshold is NaN")
        return values

    def classify_prepared(self, x: np.ndarray, thresholds: tuple[float, ...]) -> tuple[np.ndarray, int]:
        """`classify` on a prepared stage-0 input (`prepare(image)[0][0]`) and normalised thresholds:
        the early-exit path itself, nothing else. Looks at the batch's first row."""
        for k in range(self.last):
            stage = self._stages[k]
            out = self.invoke(k, x)
            logits = out[stage.logits][0]
            if confidence(logits) >= thresholds[k]:
                return logits, k
            x = out[stage.features]
        return self.invoke(self.last, x)[self._stages[self.last].logits][0], self.last

    def classify(self, image, thresholds: float | Sequence[float]) -> tuple[np.ndarray, int]:
        """Run the stages in order on one image and stop at the first exit k (before the last) whose
        largest softmax probability is >= thresholds[k]; the last exit answers otherwise. Returns
        (that exit's logits, k). An artifact exported with a batch > 1 runs the image zero-padded."""
        chunks, n, _ = self.prepare(image)
        if n != 1:
            raise StagedError(f"classify takes one image, got {n} (run_all takes a batch)")
        return self.classify_prepared(chunks[0], self.thresholds(thresholds))

    def close(self) -> None:
        for stage in self._stages:
            stage.runner.close()
        self._stages = []

    def __enter__(self) -> StagedRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_images(path: Path, input_name: str = "images") -> np.ndarray:
    """Images from an .npz / .json inputs file (`runners.load_inputs`): the array named
    `input_name`, else `images`, else the file's only array. Integer pixels (0..255) are scaled
    to [0, 1] floats, as the image task does."""
    inputs = load_inputs(Path(path))
    for key in (input_name, "images"):
        if key in inputs:
            images = inputs[key]
            break
    else:
        if len(inputs) != 1:
            raise StagedError(f"{path} holds {sorted(inputs)}; name the images {input_name!r} or 'images'")
        images = next(iter(inputs.values()))
    images = np.asarray(images)
    if images.dtype.kind in "iu":
        if images.size and (images.min() < 0 or images.max() > 255):
            raise StagedError(f"{path}: integer pixels must lie in 0..255")
        return images.astype(np.float32) / 255.0
    if images.dtype.kind != "f":
        raise StagedError(f"{path}: images of dtype {images.dtype} are neither pixels nor floats")
    return images


# ---- patching --------------------------------------------------------------------------------
def split_params(
    staged: StagedArtifact, params: Mapping[str, np.ndarray], *, partial: bool = False
) -> dict[int, dict[str, np.ndarray]]:
    """`params` (every adaptive tensor of the staged artifact, by name) split per stage: {stage: {name:
    value}}. With `partial`, stages none of whose tensors are given are left out (a stage is still
    all or nothing)."""
    owner = {name: k for k, s in enumerate(staged.stages) for name in s.adaptive}
    unknown = sorted(set(params) - set(owner))
    if unknown:
        raise StagedError(f"parameters {unknown} are not adaptive tensors of {staged.path}")
    out: dict[int, dict[str, np.ndarray]] = {}
    for k, s in enumerate(staged.stages):
        given = {n: params[n] for n in s.adaptive if n in params}
        if not given and partial:
            continue
        missing = [n for n in s.adaptive if n not in given]
        if missing:
            raise StagedError(f"stage {k} needs all its adaptive tensors; missing {missing}")
        out[k] = given
    return out


def _patch_bytes(patch: Path | bytes | bytearray | memoryview) -> bytes | memoryview:
    if isinstance(patch, (bytes, bytearray, memoryview)):
        return frozen_bytes(patch)
    try:
        return Path(patch).read_bytes()
    except OSError as err:
        raise PatchError(f"cannot read patch {patch}: {err.strerror or err}") from None


def apply_staged_patches(
    staged: StagedArtifact | Path | str,
    patches: Mapping[int, Path | bytes],
    *,
    policy: TrustPolicy = TrustPolicy(),
    check_artifact: bool = True,
) -> dict[int, Patch]:
    """Install one patch per stage (`{stage index: patch bytes or file}`; stages left out keep
    their values) in place, each through `device_runtime.install.apply_patch_file` (A/B slots,
    lock, sequence state per stage). Every patch is first verified against its stage (integrity,
    signature, freshness against that stage's state, fingerprint, destinations, finite values):
    one bad patch refuses them all and no stage is written. Returns the verified patches.

    Each stage switches atomically; the set does not: a crash (or a disk error) between two
    stages' switches leaves the earlier ones patched (then the error says which). Re-sending the
    same set with a newer sequence repairs it."""
    staged = staged if isinstance(staged, StagedArtifact) else load_staged(staged, check_fingerprint=check_artifact)
    unknown = sorted(k for k in patches if not (_is_int(k) and 0 <= k < len(staged.stages)))
    if unknown:
        raise PatchError(f"no stage {unknown} in {staged.path} (it has stages 0..{len(staged.stages) - 1})")
    data = {k: _patch_bytes(patches[k]) for k in sorted(patches)}
    for k, blob in data.items():  # verify all before writing any
        artifact, wm = staged.artifact(k), staged.weight_maps[k]
        root = weight_maps.artifact_root(artifact)
        try:
            sizes = {f: (root / f).stat().st_size for f in wm.files}
            verify_patch(blob, wm, sizes, policy, read_state(artifact))
        except (PatchError, WeightMapError) as err:
            raise PatchError(f"stage {k} ({staged.stages[k].artifact}): {err}; no stage was changed") from None
        except OSError as err:
            raise PatchError(
                f"stage {k}: cannot read {artifact}: {err.strerror or err}; no stage was changed"
            ) from None
    applied: dict[int, Patch] = {}
    for k, blob in data.items():
        try:
            applied[k] = apply_patch_file(
                staged.artifact(k), blob, policy=policy, check_artifact=check_artifact, weight_map=staged.weight_maps[k]
            )
        except PatchError as err:
            done = f"stages {sorted(applied)} were already written" if applied else "no stage was changed"
            raise PatchError(f"stage {k} ({staged.stages[k].artifact}): {err}; {done}") from None
    return applied


# ---- benchmarking ----------------------------------------------------------------------------
@dataclass
class StreamReport:
    """The early-exit path over a stream of inputs, against running every stage on the same ones."""

    thresholds: list[float]
    inputs: int  # images in the stream
    source: str  # where they came from
    passes: int  # times the stream was run (each image: early-exit path and all stages, alternating)
    mean_ms: float  # per input, the early-exit path
    all_stages_mean_ms: float  # per input, every stage
    ratio: float  # mean_ms / all_stages_mean_ms
    exit_counts: list[int]  # per exit, of one pass over the stream
    exit_rates: list[float]


@dataclass
class StagedBenchReport:
    artifact: str
    target: str
    runtime: str
    runtime_version: str
    config: dict
    batch: int
    stage_artifacts: list[str]
    stages: list[LatencyStats]  # each stage alone, on its real input
    paths: list[LatencyStats]  # per exit k: stages 0..k chained
    timer_overhead_us: float
    stream: StreamReport | None = None
    profile: dict | None = None
    host: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StagedBenchReport:
        return cls(
            **{
                **d,
                "stages": [LatencyStats(**s) for s in d["stages"]],
                "paths": [LatencyStats(**s) for s in d["paths"]],
                "stream": StreamReport(**d["stream"]) if d["stream"] else None,
            }
        )


def bench_staged(
    path: Path | str,
    config: BenchConfig = BenchConfig(),
    *,
    thresholds: float | Sequence[float] | None = None,
    inputs: Path | None = None,
    stream: int = DEFAULT_STREAM,
    progress: Progress | None = None,
) -> StagedBenchReport:
    """Latency of a staged artifact in this process: each stage alone and each exit path (stages
    0..k), timed interleaved with `device_runtime.bench.time_interleaved` (warm-up first, the
    timer's own overhead beside them); with `thresholds`, the early-exit path over a stream of
    images (`inputs`, else `stream` random ones) against every stage on the same images."""
    tick = progress or (lambda n: None)
    staged = load_staged(path)
    runner = StagedRunner(staged, config=config.runner, runtime=config.runtime)
    try:
        rng = np.random.default_rng(config.seed)
        if inputs is not None:
            images, source = load_images(inputs, runner.input.name), str(inputs)
        else:
            images, source = (
                rng.random((stream, *runner.input.shape[1:]), dtype=np.float32),
                "generated (uniform [0, 1))",
            )
        chunks, n, single = runner.prepare(images)
        if single:
            images, n = images[None], 1
        # each stage's real input: the chain on the first batch
        first, stage_inputs = chunks[0], [chunks[0]]
        for k in range(runner.last):
            stage_inputs.append(runner.invoke(k, stage_inputs[-1])[runner._stages[k].features])
        calls = {f"stage {k}": partial(runner.invoke, k, x) for k, x in enumerate(stage_inputs)}
        calls |= {f"exit {k}": partial(runner.run_path, first, k) for k in range(runner.n_exits)}
        for call in calls.values():
            for _ in range(config.warmup):
                call()
        tick(config.warmup * len(calls))
        samples = time_interleaved({**calls, "timer overhead": empty_call}, config.runs, config.rounds, tick)
        report = StagedBenchReport(
            artifact=str(staged.path),
            target=staged.target,
            runtime=runner.runtime,
            runtime_version=_runtime_version(runner.runtime),
            config=config.to_dict(),
            batch=runner.batch,
            stage_artifacts=[s.artifact for s in staged.stages],
            stages=[LatencyStats.of(np.asarray(samples[f"stage {k}"])) for k in range(runner.n_exits)],
            paths=[LatencyStats.of(np.asarray(samples[f"exit {k}"])) for k in range(runner.n_exits)],
            timer_overhead_us=float(np.median(samples["timer overhead"])) * 1e3,
            host=_host(),
        )
        if thresholds is not None:
            report.stream = _bench_stream(runner, images, n, source, runner.thresholds(thresholds), config, tick)
    finally:
        runner.close()
    return report


def _bench_stream(
    runner: StagedRunner, images, n: int, source: str, th: tuple[float, ...], config: BenchConfig, tick: Progress
) -> StreamReport:
    """Each image of the stream through the early-exit path and through every stage, alternating
    which goes first, `passes` times over the stream (about `config.runs` inputs each)."""
    prepared = [runner.prepare(images[i : i + 1])[0][0] for i in range(n)]
    counts = [0] * runner.n_exits
    for x in prepared:
        counts[runner.classify_prepared(x, th)[1]] += 1
    classify, everything = runner.classify_prepared, partial(runner.run_path, k=runner.last)
    for x in prepared[: config.warmup]:
        classify(x, th)
        everything(x)
    passes = max(1, math.ceil(config.runs / n))
    clock = time.perf_counter_ns
    early, full = [], []
    gc.disable()
    try:
        for p in range(passes):
            for i, x in enumerate(prepared):
                if (i + p) % 2:
                    t0 = clock()
                    classify(x, th)
                    t1 = clock()
                    everything(x)
                    t2 = clock()
                    early.append(t1 - t0)
                    full.append(t2 - t1)
                else:
                    t0 = clock()
                    everything(x)
                    t1 = clock()
                    classify(x, th)
                    t2 = clock()
                    full.append(t1 - t0)
                    early.append(t2 - t1)
            tick(n)
    finally:
        gc.enable()
    mean_ms, full_ms = float(np.mean(early)) / 1e6, float(np.mean(full)) / 1e6
    return StreamReport(
        thresholds=list(th),
        inputs=n,
        source=source,
        passes=passes,
        mean_ms=mean_ms,
        all_stages_mean_ms=full_ms,
        ratio=mean_ms / full_ms,
        exit_counts=counts,
        exit_rates=[c / n for c in counts],
    )


def bench_work_units(config: BenchConfig, n_exits: int, streamed: int | None) -> int:
    """Progress units of `bench_staged` (`streamed`: the stream's length, None without thresholds)."""
    units = 2 * n_exits * config.warmup + (2 * n_exits + 1) * config.runs
    return units + (streamed * max(1, math.ceil(config.runs / streamed)) if streamed else 0)


def bench_staged_isolated(
    path: Path | str,
    config: BenchConfig = BenchConfig(),
    *,
    thresholds: Sequence[float] | None = None,
    inputs: Path | None = None,
    stream: int = DEFAULT_STREAM,
    profile: DeviceProfile | None = None,
    progress: Progress | None = None,
) -> StagedBenchReport:
    """`bench_staged` in a fresh worker process (`python -m device_runtime.staged`), under
    `profile` if given, as `device_runtime.bench.benchmark_isolated` does for one artifact."""
    if profile is not None:
        config = replace(config, runner=replace(config.runner, threads=profile.threads))
    request = {
        "artifact": str(path),
        "config": config.to_dict(),
        "thresholds": list(thresholds) if thresholds is not None else None,
        "inputs": str(inputs) if inputs else None,
        "stream": stream,
    }
    message = run_worker("device_runtime.staged", request, profile, progress)
    if "error" in message:
        raise StagedError(message["error"])
    report = StagedBenchReport.from_dict(message["report"])
    report.profile = message["profile"]
    return report


def _run_request(request: dict, progress: Progress) -> StagedBenchReport:
    return bench_staged(
        Path(request["artifact"]),
        BenchConfig.from_dict(request["config"]),
        thresholds=request["thresholds"],
        inputs=Path(request["inputs"]) if request["inputs"] else None,
        stream=request["stream"],
        progress=progress,
    )


if __name__ == "__main__":
    sys.exit(worker_main(_run_request))
