"""One export as a list of named passes over an `ExportJob`, run in a staging directory.

Each target contributes its passes (convert, locate, relocate, embed); the passes every target
shares follow (seal, write base values, prove, write the weight map). The artifact is built in a
hidden staging directory inside `out_dir` and moved into place only after the last pass, so a
failed export leaves nothing behind and an earlier artifact of the same name untouched.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch.nn as nn
from tqdm import tqdm

from device_runtime import weight_map as weight_maps
from device_runtime.weight_map import IOSpec, TensorEntry, WeightMap
from exporters import prepare, proof
from exporters.errors import ExportError, UnknownTarget
from exporters.locate import Placement
from exporters.options import TARGETS, ExportOptions

ALIGNMENT = 64  # every adaptive tensor starts on a 64-byte boundary (cache line, SIMD loads)


@dataclass
class ExportJob:
    """The state the passes of one export share; each pass reads some fields and fills others."""

    target: str
    model: nn.Module  # the caller's model (static values); never modified
    example_inputs: tuple
    adaptive: list[str]
    options: ExportOptions
    stage: Path  # staging directory; the artifact is built here
    input_names: list[str]
    output_names: list[str]
    base: dict[str, np.ndarray]  # static values of the adaptive tensors (the artifact's first patch)
    fingerprints: dict[str, np.ndarray]  # unique values the converter sees instead (buffers mode)
    inputs: list[IOSpec] = field(default_factory=list)  # runtime names filled in by `convert`
    outputs: list[IOSpec] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)  # filled by `locate`
    tensors: list[TensorEntry] = field(default_factory=list)  # filled by `relocate`
    files: list[str] = field(default_factory=list)  # artifact files, relative to the artifact root
    extra: dict = field(default_factory=dict)
    weight_map: WeightMap | None = None  # filled by `seal`

    @property
    def mode(self) -> str:
        return "inputs" if self.options.adaptive_as_inputs else "buffers"

    @property
    def artifact_name(self) -> str:
        return self.options.name + {"tflite": ".tflite", "onnx": ".onnx", "coreml": ".mlpackage"}[self.target]

    @property
    def artifact(self) -> Path:
        return self.stage / self.artifact_name

    @property
    def root(self) -> Path:
        return weight_maps.artifact_root(self.artifact)

    @property
    def adaptive_file(self) -> str:
        """Name of the flat file holding adaptive values outside the model file (ONNX external
        data, and every target's "weights as inputs" values), relative to the artifact root."""
        if self.target == "coreml":
            return "Data/mntool/adaptive.bin"
        return f"{self.artifact_name}.adaptive.bin"

    def conversion_inputs(self) -> tuple[nn.Module, dict]:
        """What a converter sees: the model holding fingerprint values (buffers mode), or wrapped
        so its adaptive tensors are inputs (inputs mode); and keyword example inputs."""
        import torch

        kwargs = dict(zip(self.input_names, self.example_inputs))
        if self.mode == "buffers":
            return prepare.with_values(self.model, self.fingerprints), kwargs
        kwargs.update({prepare.input_name_of(n): torch.from_numpy(v) for n, v in self.base.items()})
        return prepare.AdaptiveAsInputs(self.model, self.input_names, self.adaptive).eval(), kwargs

    def draft_weight_map(self) -> WeightMap:
        """The weight map as far as the passes so far know it (fingerprint not yet computed)."""
        return WeightMap(
            target=self.target, artifact=self.artifact_name, files=tuple(self.files), fingerprint="",
            inputs=tuple(self.inputs), outputs=tuple(self.outputs), tensors=tuple(self.tensors),
            extra=self.extra, mode=self.mode,
        )


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[ExportJob], None]


def align(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def embedded_weight_map(job: ExportJob) -> str:
    """The weight map copy stored inside the artifact: everything but the fingerprint, which is
    computed over the final files (this copy included)."""
    wm = job.draft_weight_map()
    wm.validate()
    d = wm.to_dict()
    del d["fingerprint"]
    return json.dumps(d, separators=(",", ":"))


# ---- passes every target shares -------------------------------------------------------------
def lay_out_adaptive_inputs(job: ExportJob) -> None:
    """"Weights as inputs": the adaptive values live in a flat file of 64-aligned float32 tensors
    that the app reads (through the weight map) and feeds as inputs; patches write into it."""
    offset = 0
    for name in job.adaptive:
        shape = tuple(job.base[name].shape)
        offset = align(offset)
        nbytes = job.base[name].size * 4
        job.tensors.append(TensorEntry(name, shape, job.adaptive_file, offset, nbytes, "float32", "identity", shape, ALIGNMENT))
        offset += nbytes
    path = job.root / job.adaptive_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(offset))
    job.files.append(job.adaptive_file)


def seal(job: ExportJob) -> None:
    """Fingerprint the final files and fix the weight map."""
    wm = job.draft_weight_map()
    wm.validate()
    fingerprint = weight_maps.compute_fingerprint(weight_maps.read_artifact_files(job.artifact, wm.files), wm.tensors, wm.artifact)
    job.weight_map = WeightMap(**{**wm.__dict__, "fingerprint": fingerprint})


def write_base(job: ExportJob) -> None:
    """Write the static values as the artifact's first patch, through the production patch path."""
    for name, data in proof.patched_files(job.artifact, job.weight_map, job.base).items():
        (job.root / name).write_bytes(data)


def prove(job: ExportJob) -> None:
    job.extra["proof"] = proof.prove(job)
    job.weight_map = WeightMap(**{**job.weight_map.__dict__, "extra": job.extra})


def write_weight_map(job: ExportJob) -> None:
    weight_maps.save(job.weight_map, job.artifact)


COMMON_PASSES = [
    Pass("seal", seal),
    Pass("write base values", write_base),
    Pass("prove", prove),
    Pass("write weight map", write_weight_map),
]


# ---- running an export ----------------------------------------------------------------------
def run_export(model, example_inputs, adaptive, target: str, out_dir: Path, options: ExportOptions) -> Path:
    if target not in TARGETS:
        raise UnknownTarget(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if options.precision != "float32" and target != "coreml":
        raise ExportError(f"precision {options.precision!r} is supported for coreml only ({target} exports float32)")
    adaptive = list(adaptive) if not isinstance(adaptive, str) else adaptive
    prepare.check_arguments(model, example_inputs, adaptive)
    names = prepare.input_names(model, len(example_inputs))
    outputs = prepare.run_model(model, example_inputs)
    target_passes = importlib.import_module(f"exporters.{target}").passes(options)
    passes = target_passes + [p for p in COMMON_PASSES if options.verify or p.name != "prove"]
    with staging(Path(out_dir)) as stage:
        job = ExportJob(
            target=target, model=model, example_inputs=example_inputs, adaptive=adaptive, options=options,
            stage=stage, input_names=names, output_names=prepare.output_names(len(outputs), options.output_names),
            base=prepare.static_values(model, adaptive),
            fingerprints={} if options.adaptive_as_inputs else prepare.fingerprint_values(model, adaptive, options.seed),
        )
        bar = tqdm(passes, desc=f"export {target}", unit="pass", disable=not options.progress, leave=False)
        for p in bar:
            bar.set_postfix_str(p.name)
            p.run(job)
        publish(job, Path(out_dir))
    return Path(out_dir) / job.artifact_name


@contextlib.contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden directory inside `out_dir` (same file system, so moving into place is a rename),
    removed afterwards whatever happens; `out_dir` itself is removed too if this export made it."""
    made = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create output directory {out_dir}: {err.strerror}") from None
    stage = Path(tempfile.mkdtemp(prefix=".mntool-export-", dir=out_dir))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)


def publish(job: ExportJob, out_dir: Path) -> None:
    """Move the artifact, the files beside it, then its weight map from the stage into `out_dir`."""
    sidecar = weight_maps.sidecar_path(job.artifact).name
    top_level = {Path(f).parts[0] for f in job.files} if job.target != "coreml" else {job.artifact_name}
    for name in sorted(top_level) + [sidecar]:
        src, dst = job.stage / name, out_dir / name
        if dst.is_dir() and not dst.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=".mntool-old-", dir=out_dir))
            dst.rename(old / name)
            src.rename(dst)
            shutil.rmtree(old)
        else:
            src.replace(dst)
