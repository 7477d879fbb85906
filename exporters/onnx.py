"""ONNX target: `torch.onnx.export(dynamo=True, optimize=False)`, adaptive initializers external.

With `optimize=False` every parameter stays a raw initializer (no folding, no dedup, transposes
kept as nodes). The adaptive initializers, and only they, move to `<name>.onnx.adaptive.bin`
(64-aligned), so the swappable buffer is literally a file; everything else, small int64 shape
tensors included, stays inline. The model file is never ORT-optimised (that output is
hardware-specific and renames/transposes initializers).

precision "int8": ONNX Runtime's own tools, `quant_pre_process` (shape inference and ORT's basic,
execution-provider-independent graph optimisation, which folds the frozen weights' Transpose nodes
so their MatMuls read constants) then `quantize_dynamic` (int8 weights, activations quantised per
call: MatMulInteger, quantised Gather). "float16": `onnxruntime.transformers.float16` (every float
initializer and op to fp16, inputs and outputs kept float32). Either way the nodes reading an
adaptive initializer are excluded by name, so it stays a float32 initializer read by float32 ops.
"""

from __future__ import annotations

from device_runtime.layout import ALIGNMENT, align
from device_runtime.weight_map import IOSpec, TensorEntry
from exporters import quantize as quantization
from exporters.errors import ConversionFailed, first_line
from exporters.job import ExportJob, Pass, embedded_weight_map, lay_out_adaptive_inputs
from exporters.locate import Constant, locate
from exporters.quiet import quiet
from exporters.target import Target

METADATA_KEY = "mntool.weightmap"


def _dtypes() -> dict[int, str]:
    from onnx import TensorProto

    return {
        TensorProto.FLOAT: "float32",
        TensorProto.FLOAT16: "float16",
        TensorProto.INT64: "int64",
        TensorProto.INT32: "int32",
        TensorProto.BOOL: "bool",
    }


def _load(job: ExportJob):
    import onnx

    return onnx.load(str(job.artifact), load_external_data=False)


def _save(job: ExportJob, proto) -> None:
    # Serialised directly: onnx.save_model would also (re)write external data files.
    job.artifact.write_bytes(proto.SerializeToString())


# ---- passes ---------------------------------------------------------------------------------
def convert(job: ExportJob) -> None:
    import torch

    from exporters import prepare

    module, kwargs = job.conversion_inputs()
    with quiet():
        try:
            program = torch.onnx.export(
                module, (), kwargs=kwargs, dynamo=True, optimize=False, output_names=job.output_names, verbose=False
            )
        except Exception as err:  # torch.export and the ONNX translator raise many types
            raise ConversionFailed(f"torch.onnx cannot export the model: {first_line(err)}") from None
    proto = program.model_proto
    _save(job, proto)
    job.files = [job.artifact_name]
    dtypes = _dtypes()

    def spec(name: str, value) -> IOSpec:
        t = value.type.tensor_type
        return IOSpec(name, value.name, dtypes[t.elem_type], tuple(int(d.dim_value) for d in t.shape.dim))

    for value in [*proto.graph.input, *proto.graph.output]:
        if any(not d.HasField("dim_value") for d in value.type.tensor_type.shape.dim):
            raise ConversionFailed(
                f"ONNX {value.name!r} has a data-dependent shape; mntool artifacts have static shapes"
            )
    graph_inputs = {v.name: v for v in proto.graph.input}
    job.inputs = [spec(n, graph_inputs[n]) for n in job.input_names]
    if job.mode == "inputs":
        job.inputs += [spec(n, graph_inputs[prepare.input_name_of(n)]) for n in job.adaptive]
    job.outputs = [spec(n, v) for n, v in zip(job.output_names, proto.graph.output)]


def quantize(job: ExportJob) -> None:
    """ONNX Runtime's quantisation tools on the converted model (all initializers inline at this
    point); the nodes reading adaptive initializers are passed as excluded by name."""
    import onnx

    proto = _load(job)
    if job.options.precision == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        before = quantization.excluded(job, _constants(proto))
        skip = _readers(proto, {p.key for p in before})
        try:
            with quiet():
                proto = convert_float_to_float16(proto, keep_io_types=True, node_block_list=skip)
        except Exception as err:  # the converter raises anything from shape inference to protobuf errors
            raise ConversionFailed(f"onnxruntime float16 conversion failed: {first_line(err)}") from None
        tool, distribution = "onnxruntime.transformers.float16", "onnxruntime"
        scheme = "float16 initializers and ops (ORT inserts casts where its CPU kernels lack fp16), I/O float32"
        quantized = {onnx.TensorProto.FLOAT16}
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        before = quantization.excluded(job, _constants(proto))
        prepared, quantized_path = job.stage / ".quant-pre.onnx", job.stage / ".quant-int8.onnx"
        try:
            try:
                with quiet():
                    quant_pre_process(proto, str(prepared), skip_symbolic_shape=True)
            except Exception as err:  # shape inference and ORT's optimiser raise many types
                raise ConversionFailed(f"onnxruntime quant_pre_process failed: {first_line(err)}") from None
            prepared_proto = onnx.load(str(prepared))
            quantization.check_untouched(job, before, _constants(prepared_proto), "quant_pre_process")
            before = quantization.excluded(job, _constants(prepared_proto))  # a folded Transpose renames one
            skip = _readers(prepared_proto, {p.key for p in before})
            # quantize_dynamic first rewrites each Gemm as `<name>_MatMul` (+ `<name>_Add`) on a
            # transposed copy of its weight: the rewritten nodes are excluded too
            rewritten = [f"{n}_{op}" for n in skip for op in ("MatMul", "Add")]
            try:
                with quiet():
                    quantize_dynamic(
                        str(prepared),
                        str(quantized_path),
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=sorted({*skip, *rewritten}),
                    )
            except Exception as err:  # the quantiser raises many types
                raise ConversionFailed(f"onnxruntime quantize_dynamic failed: {first_line(err)}") from None
            proto = onnx.load(str(quantized_path))
        finally:
            prepared.unlink(missing_ok=True)
            quantized_path.unlink(missing_ok=True)
        tool, distribution = "onnxruntime.quantization (quant_pre_process, quantize_dynamic)", "onnxruntime"
        scheme = "dynamic range: int8 per-tensor symmetric weights, uint8 activations quantised per call"
        quantized = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    _save(job, proto)
    quantization.check_untouched(job, before, _constants(proto), tool.split(" ")[0])
    count = sum(1 for init in proto.graph.initializer if init.data_type in quantized and len(init.dims) > 0)
    quantization.require_quantized(job, count, tool, "no MatMul, Conv or Gather reads a constant weight")
    quantization.record(
        job, tool=tool, distribution=distribution, scheme=scheme, excluded_ops=list(skip), quantized=count
    )


def _readers(proto, initializers: set[str]) -> list[str]:
    """The names of the main graph's nodes reading any of `initializers`."""
    return sorted({node.name for node in proto.graph.node if initializers.intersection(node.input)})


def find(job: ExportJob) -> None:
    job.placements = locate(job.fingerprints, _constants(_load(job)))


def _constants(proto) -> list[Constant]:
    """Every float initializer of the main graph, with the number of node inputs reading it."""
    from onnx import numpy_helper

    uses: dict[str, int] = {}

    def count(graph) -> None:
        for node in graph.node:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
            for attribute in node.attribute:
                for sub in [attribute.g, *attribute.graphs]:
                    count(sub)

    count(proto.graph)
    constants = []
    for init in proto.graph.initializer:
        if _dtypes().get(init.data_type) in ("float32", "float16"):
            values = numpy_helper.to_array(init).ravel()
            constants.append(Constant(init.name, values, tuple(init.dims), uses.get(init.name, 0)))
    return constants


def externalise(job: ExportJob) -> None:
    """Move the adaptive initializers (only them) into the 64-aligned adaptive data file."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import set_external_data

    proto = _load(job)
    initializers = {init.name: init for init in proto.graph.initializer}
    data = bytearray()
    for p in job.placements:
        init = initializers[p.key]
        raw = numpy_helper.to_array(init).astype("<f4").tobytes()
        offset = align(len(data))
        data.extend(bytes(offset - len(data)) + raw)
        init.raw_data = raw  # set_external_data needs raw_data present
        set_external_data(init, location=job.adaptive_file, offset=offset, length=len(raw))
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        job.tensors.append(
            TensorEntry(
                p.name,
                tuple(job.base[p.name].shape),
                job.adaptive_file,
                offset,
                len(raw),
                p.dtype,
                p.layout,
                p.stored_shape,
                ALIGNMENT,
            )
        )
    (job.root / job.adaptive_file).write_bytes(bytes(data))
    job.files.append(job.adaptive_file)
    job.extra["onnx"] = {"initializers": {p.name: p.key for p in job.placements}}
    _save(job, proto)


def embed(job: ExportJob) -> None:
    proto = _load(job)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, embedded_weight_map(job)
    _save(job, proto)


def embedded(artifact_bytes: bytes) -> str | None:
    """The weight map JSON embedded in an .onnx file's metadata_props, if any."""
    import onnx

    proto = onnx.load_from_string(artifact_bytes)
    return next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)


def passes(options) -> list[Pass]:
    quantized = [Pass(f"quantize ({options.precision})", quantize)] if options.precision != "float32" else []
    if options.adaptive_as_inputs:
        return [
            Pass("convert", convert),
            *quantized,
            Pass("lay out adaptive inputs", lay_out_adaptive_inputs),
            Pass("embed weight map", embed),
        ]
    return [
        Pass("convert", convert),
        *quantized,
        Pass("locate", find),
        Pass("externalise adaptive initializers", externalise),
        Pass("embed weight map", embed),
    ]


TARGET = Target(name="onnx", suffix=".onnx", directory=False, precisions=("float32", "float16", "int8"), passes=passes)
