"""ExecuTorch target: `<name>.pte` (the program, XNNPACK for the backbone) + `<name>.ptd` (the
adaptive tensors, and only they, under their PyTorch names).

ExecuTorch already separates program and weights, but the XNNPACK delegate keys the weights it
owns by content hash (a re-export breaks the pairing, equal tensors share a key) and nothing
verifies a `.ptd`. So the partitions that read an adaptive tensor stay out of XNNPACK (they run
on ExecuTorch's portable kernels, with their linear ops decomposed), which keeps the adaptive
tensors program constants; `external_constants` then writes exactly those to `<name>.ptd`, keyed
by their fully qualified names. The `.ptd` is ExecuTorch's flat_tensor file: a header, a
flatbuffer naming each tensor's segment, then the segments; `locate` reads it with ExecuTorch's
own deserializer and matches the fingerprint values, so every adaptive tensor is one byte range
the weight map records and a patch overwrites. Needs the `executorch` package (the `peers`
extra); without it the target is declared but `runs_here()` is false and the export says why.
"""

from __future__ import annotations

import importlib.util

from device_runtime.layout import ALIGNMENT
from device_runtime.weight_map import IOSpec, TensorEntry
from exporters.errors import ConversionFailed, first_line
from exporters.job import ExportJob, Pass
from exporters.locate import Constant, locate
from exporters.quiet import quiet
from exporters.target import Target

DATA_SUFFIX = ".ptd"
TORCH_DTYPES = {"torch.float32": "float32", "torch.int64": "int64", "torch.int32": "int32", "torch.bool": "bool"}


def available() -> bool:
    return importlib.util.find_spec("executorch") is not None


def _data_file(job: ExportJob) -> str:
    return job.options.name + DATA_SUFFIX


def _partitioner(adaptive: set[str]):
    """XNNPACK for everything but the partitions that read an adaptive tensor."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.backend.partitioner import PartitionResult

    class BackboneOnly(XnnpackPartitioner):
        def ops_to_not_decompose(self, exported_program):
            return ([], None)  # undelegated linears must decompose into portable ops

        def partition(self, exported_program):
            result = super().partition(exported_program)
            params = exported_program.graph_signature.inputs_to_parameters
            reading = {n for n, fqn in params.items() if fqn in adaptive}
            dropped = {
                node.meta["delegation_tag"]
                for node in exported_program.graph.nodes
                if "delegation_tag" in node.meta
                and (node.name in reading or any(a.name in reading for a in node.all_input_nodes))
            }
            for node in exported_program.graph.nodes:
                if node.meta.get("delegation_tag") in dropped:
                    del node.meta["delegation_tag"]
            tags = {t: spec for t, spec in result.partition_tags.items() if t not in dropped}
            return PartitionResult(tagged_exported_program=result.tagged_exported_program, partition_tags=tags)

    return BackboneOnly()


# ---- passes ---------------------------------------------------------------------------------
def convert(job: ExportJob) -> None:
    if not available():
        raise ConversionFailed("the executorch target needs the executorch package: pip install 'mntool[peers]'")
    import torch
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    module, kwargs = job.conversion_inputs()
    adaptive = set(job.adaptive)
    stem = job.options.name
    with quiet():
        try:
            exported = torch.export.export(module, (), kwargs=kwargs)
            edge = to_edge_transform_and_lower(exported, partitioner=[_partitioner(adaptive)])
            params = edge.exported_program().graph_signature.inputs_to_parameters

            def external(node):  # only the adaptive constants leave the program, into <stem>.ptd
                return stem if params.get(node.name) in adaptive else None

            # view_copy stays a copy: ExecuTorch's emitter cannot emit a memory view of an external
            # constant (it asserts on the missing constant tag), which a CNN's per-channel affine
            # (`weight.view(1, C, 1, 1)`) needs; the copy is of a few dozen floats
            program = edge.to_executorch(ExecutorchBackendConfig(external_constants=external, remove_view_copy=False))
        except Exception as err:  # torch.export and the ExecuTorch lowering raise many types
            raise ConversionFailed(f"ExecuTorch cannot export the model: {first_line(err)}") from None
    job.artifact.write_bytes(program.buffer)
    program.write_tensor_data_to_file(str(job.root))  # <stem>.ptd, the one external data file
    written = sorted(p.name for p in job.root.glob(f"*{DATA_SUFFIX}"))
    if written != [_data_file(job)]:
        raise ConversionFailed(f"ExecuTorch wrote external data {written}, expected only {_data_file(job)}")
    job.files = [job.artifact_name, _data_file(job)]
    with torch.no_grad():
        outputs = module(**kwargs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)

    def spec(name: str, value) -> IOSpec:
        return IOSpec(name, name, TORCH_DTYPES[str(value.dtype)], tuple(value.shape))

    job.inputs = [spec(n, kwargs[n]) for n in job.input_names]
    job.outputs = [spec(n, v) for n, v in zip(job.output_names, outputs)]


def _segments(data: bytes) -> dict[str, tuple[int, int, tuple[int, ...], str]]:
    """Each tensor of a .ptd: key -> (file offset, bytes, shape, dtype), from ExecuTorch's own reader."""
    from executorch.extension.flat_tensor.serialize.serialize import (
        _deserialize_to_flat_tensor,
        _get_extended_header,
    )

    header = _get_extended_header(data)
    if header is None:
        raise ConversionFailed("the .ptd ExecuTorch wrote has no flat_tensor header")
    flat = _deserialize_to_flat_tensor(data)
    out = {}
    for named in flat.named_data:
        segment = flat.segments[named.segment_index]
        layout = named.tensor_layout
        dtype = {6: "float32", 5: "float16"}.get(int(layout.scalar_type), str(layout.scalar_type))
        out[named.key] = (header.segment_base_offset + segment.offset, segment.size, tuple(layout.sizes), dtype)
    return out


def find(job: ExportJob) -> None:
    import numpy as np

    data = (job.root / _data_file(job)).read_bytes()
    segments = _segments(data)
    constants = [
        Constant(key, np.frombuffer(data, np.dtype(dtype).newbyteorder("<"), size // 4, offset), shape, 1)
        for key, (offset, size, shape, dtype) in segments.items()
        if dtype == "float32"
    ]
    job.placements = locate(job.fingerprints, constants)
    for p in job.placements:
        offset, size, _, _ = segments[p.key]
        if offset % ALIGNMENT:
            raise ConversionFailed(f"{p.name}: ExecuTorch placed it at {offset}, not {ALIGNMENT}-aligned")
        job.tensors.append(
            TensorEntry(
                p.name,
                tuple(job.base[p.name].shape),
                _data_file(job),
                offset,
                size,
                p.dtype,
                p.layout,
                p.stored_shape,
                ALIGNMENT,
            )
        )
    job.extra["executorch"] = {"data_file": _data_file(job), "keys": {p.name: p.key for p in job.placements}}


def passes(options) -> list[Pass]:
    if options.adaptive_as_inputs:
        raise ConversionFailed("the executorch target has no --adaptive-as-inputs mode (its .ptd is already swappable)")
    return [Pass("convert", convert), Pass("locate in the .ptd", find)]


TARGET = Target(
    name="executorch",
    suffix=".pte",
    directory=False,
    precisions=("float32",),
    passes=passes,
    runs_here=available,
    converter_available=available,
    inputs_mode=False,
)
