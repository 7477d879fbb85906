"""The state one export's passes share (`ExportJob`), the `Pass` type, and what every target's
passes build on: the weight map copy embedded in the artifact and the "weights as inputs" layout.

Target modules build their passes from this and the proof reads a job; `pipeline` runs the
passes. A job knows its target only through the target's declaration (`job.target`, a `Target`).
Importing this is cheap: `prepare` (torch) loads inside the functions that use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_runtime import weight_map as weight_maps
from device_runtime.layout import ALIGNMENT, align
from device_runtime.weight_map import IOSpec, TensorEntry, WeightMap
from exporters.locate import Placement
from exporters.options import ExportOptions
from exporters.target import Target

if TYPE_CHECKING:
    import torch.nn as nn


@dataclass
class ExportJob:
    """The state the passes of one export share; each pass reads some fields and fills others."""

    target: Target  # the target module's declaration
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
        return self.target.artifact_name(self.options.name)

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
        return self.target.adaptive_file_of(self.artifact_name)

    def conversion_inputs(self) -> tuple[nn.Module, dict]:
        """What a converter sees: the model holding fingerprint values (buffers mode), or wrapped
        so its adaptive tensors are inputs (inputs mode); and keyword example inputs."""
        import torch

        from exporters import prepare

        kwargs = dict(zip(self.input_names, self.example_inputs))
        if self.mode == "buffers":
            return prepare.with_values(self.model, self.fingerprints), kwargs
        kwargs.update({prepare.input_name_of(n): torch.from_numpy(v) for n, v in self.base.items()})
        return prepare.AdaptiveAsInputs(self.model, self.input_names, self.adaptive).eval(), kwargs

    def draft_weight_map(self) -> WeightMap:
        """The weight map as far as the passes so far know it (fingerprint not yet computed)."""
        return WeightMap(
            target=self.target.name,
            artifact=self.artifact_name,
            files=tuple(self.files),
            fingerprint="",
            inputs=tuple(self.inputs),
            outputs=tuple(self.outputs),
            tensors=tuple(self.tensors),
            extra=self.extra,
            mode=self.mode,
            form=dict(self.options.form or {}),
        )


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[ExportJob], None]


def embedded_weight_map(job: ExportJob) -> str:
    """The weight map copy stored inside the artifact: everything but the fingerprint, which is
    computed over the final files (this copy included)."""
    wm = job.draft_weight_map()
    wm.validate()
    d = wm.to_dict()
    del d["fingerprint"]
    return json.dumps(d, separators=(",", ":"))


def lay_out_adaptive_inputs(job: ExportJob) -> None:
    """ "Weights as inputs" (every target): the adaptive values live in a flat file of aligned
    float32 tensors that the app reads (through the weight map) and feeds as inputs; patches
    write into it."""
    offset = 0
    for name in job.adaptive:
        shape = tuple(job.base[name].shape)
        offset = align(offset)
        nbytes = job.base[name].size * 4
        job.tensors.append(
            TensorEntry(name, shape, job.adaptive_file, offset, nbytes, "float32", "identity", shape, ALIGNMENT)
        )
        offset += nbytes
    path = job.root / job.adaptive_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(offset))
    job.files.append(job.adaptive_file)
