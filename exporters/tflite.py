"""TFLite target: litert-torch conversion, then the adaptive buffers moved to a tail region.

Adaptive Linear layers are fenced with litert-torch's optimization barrier so the converter
cannot fold a following BatchNorm or constant into them. After conversion every adaptive buffer
is emptied and pointed (`Buffer.offset/size`, the schema's external-buffer fields) into one
contiguous, 64-aligned region at the end of the file, so a patch is one contiguous write; the
weight map JSON follows the region as the model's "mntool.weightmap" metadata.

precision "float16" / "int8": ai-edge-quantizer quantises the converted model's frozen weights
(float16: weight-only float casting, dequantised to float32 at run time; int8: dynamic range,
channelwise int8 weights, activations quantised on the fly); the ops reading an adaptive tensor are
excluded by scope in the recipe, so those tensors stay float32 and those ops run in float32.
"""

from __future__ import annotations

import numpy as np

from device_runtime.layout import ALIGNMENT, align
from device_runtime.weight_map import IOSpec, TensorEntry
from exporters import quantize as quantization
from exporters.errors import ConversionFailed, first_line
from exporters.job import ExportJob, Pass, embedded_weight_map, lay_out_adaptive_inputs
from exporters.locate import Constant, locate
from exporters.quiet import quiet
from exporters.target import Target

METADATA_NAME = "mntool.weightmap"
PLACEHOLDER = 1  # a non-default offset/size so packing reserves the fields, rewritten afterwards


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _dtypes() -> dict[int, str]:
    t = _schema().TensorType
    return {t.FLOAT32: "float32", t.FLOAT16: "float16", t.INT32: "int32", t.INT64: "int64", t.BOOL: "bool"}


def _read_model(data: bytes):
    from ai_edge_litert.tools import flatbuffer_utils

    # Not read_model_from_bytearray: it compacts and renumbers buffers.
    return flatbuffer_utils.convert_bytearray_to_object(bytearray(data))


# ---- passes ---------------------------------------------------------------------------------
def convert(job: ExportJob) -> None:
    """litert-torch -> .tflite; inputs are fed by keyword so the signature uses forward() names."""
    with quiet():  # litert-torch's import and conversion log from Python and C++
        import litert_torch

        litert_torch.config.show_progress = False
        module, kwargs = job.conversion_inputs()
        if job.mode == "buffers":
            module = _fenced(module, job.adaptive)
        try:
            edge_model = litert_torch.convert(module, sample_kwargs=kwargs)
        except Exception as err:  # the converter raises anything from torch.export to MLIR
            raise ConversionFailed(f"litert-torch cannot convert the model: {first_line(err)}") from None
        edge_model.export(str(job.artifact))
    job.files = [job.artifact_name]
    _read_signature(job, _read_model(job.artifact.read_bytes()))


def _fenced(model, adaptive: list[str]):
    """Put an optimization barrier on the inputs and outputs of every module owning an adaptive
    parameter: the converter then cannot fold neighbouring ops into the adaptive tensors."""
    import torch
    from litert_torch.backend.optimization_barrier import optimization_barrier

    from exporters import prepare

    def fence(x):
        return optimization_barrier(x, x)[0] if isinstance(x, torch.Tensor) else x

    for module in prepare.owner_modules(model, adaptive):
        module.register_forward_pre_hook(lambda _, args: tuple(fence(a) for a in args))
        module.register_forward_hook(lambda _, args, out: torch.utils._pytree.tree_map(fence, out))
    return model


def _read_signature(job: ExportJob, model) -> None:
    """Inputs/outputs from the default signature. The runtime name is the tensor name (what
    `Interpreter.get_input_details()` reports); the signature's own names are kept in `extra`."""
    from exporters import prepare

    dtypes = _dtypes()
    signature = model.signatureDefs[0]
    tensors = model.subgraphs[signature.subgraphIndex].tensors
    signature_names = {}

    def spec(name: str, tensor_map) -> IOSpec:
        t = tensors[tensor_map.tensorIndex]
        signature_names[name] = tensor_map.name.decode()
        return IOSpec(name, t.name.decode(), dtypes[t.type], tuple(int(d) for d in t.shape))

    by_name = {m.name.decode(): m for m in signature.inputs}
    job.inputs = [spec(n, by_name[n]) for n in job.input_names]
    if job.mode == "inputs":
        job.inputs += [spec(n, by_name[prepare.input_name_of(n)]) for n in job.adaptive]
    outputs = _outputs_in_subgraph_order(model, signature)
    job.outputs = [spec(n, m) for n, m in zip(job.output_names, outputs)]
    job.extra["tflite"] = {"signature": signature.signatureKey.decode(), "signature_names": signature_names}


def _outputs_in_subgraph_order(model, signature) -> list:
    """The signature's outputs in the order the subgraph returns them, which is PyTorch's order
    (signature names like `output_10` sort wrongly as strings and are not a contract)."""
    position = {int(t): i for i, t in enumerate(model.subgraphs[signature.subgraphIndex].outputs)}
    missing = [m.name.decode(errors="replace") for m in signature.outputs if m.tensorIndex not in position]
    if missing:
        raise ConversionFailed(f"the TFLite signature names outputs {missing} that its subgraph does not return")
    return sorted(signature.outputs, key=lambda m: position[m.tensorIndex])


def quantize(job: ExportJob) -> None:
    """ai-edge-quantizer on the converted model; the ops reading adaptive tensors are excluded by
    their scope (ai-edge-quantizer's name for an op: its output tensor names) with NO_QUANTIZE."""
    import re

    with quiet():
        from ai_edge_quantizer import qtyping, quantizer
        from ai_edge_quantizer.algorithm_manager import AlgorithmName
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    data = job.artifact.read_bytes()
    model = _read_model(data)
    before = quantization.excluded(job, _constants(model))
    adaptive = {p.key for p in before}
    scopes = sorted(
        {
            tfl_flatbuffer_utils.get_op_scope(op, subgraph.tensors)
            for subgraph in model.subgraphs
            for op in subgraph.operators
            if any(i >= 0 and subgraph.tensors[i].buffer in adaptive for i in op.inputs)
        }
    )
    tool = quantizer.Quantizer(bytearray(data))
    every = qtyping.TFLOperationName.ALL_SUPPORTED
    if job.options.precision == "int8":
        tool.add_dynamic_config(regex=".*", operation_name=every, num_bits=8)
        scheme = "dynamic range: int8 channelwise symmetric weights, float32 activations quantised per call"
    else:
        tool.update_quantization_recipe(
            regex=".*",
            operation_name=every,
            op_config=qtyping.OpQuantizationConfig(
                weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
                compute_precision=qtyping.ComputePrecision.FLOAT,
                explicit_dequantize=True,
            ),
            algorithm_key=AlgorithmName.FLOAT_CASTING,
        )
        scheme = "weight-only float16 (float casting), DEQUANTIZE to float32 before each op"
    if scopes:  # the later recipe entry wins for the ops it matches
        exact = "^(" + "|".join(re.escape(s) for s in scopes) + ")$"
        tool.update_quantization_recipe(regex=exact, operation_name=every, algorithm_key=AlgorithmName.NO_QUANTIZE)
    try:
        with quiet():
            quantized = bytes(tool.quantize(enable_progress_report=False).quantized_model)
    except Exception as err:  # the quantizer raises anything from its validators to flatbuffer errors
        raise ConversionFailed(f"ai-edge-quantizer cannot quantise the model: {first_line(err)}") from None
    job.artifact.write_bytes(quantized)
    model = _read_model(quantized)
    quantization.check_untouched(job, before, _constants(model), "ai-edge-quantizer")
    dtype = _schema().TensorType.INT8 if job.options.precision == "int8" else _schema().TensorType.FLOAT16
    count = sum(
        1
        for subgraph in model.subgraphs
        for tensor in subgraph.tensors
        if tensor.type == dtype and model.buffers[tensor.buffer].data is not None
    )
    quantization.require_quantized(
        job, count, "ai-edge-quantizer", "no FULLY_CONNECTED, convolution or embedding weight"
    )
    quantization.record(
        job,
        tool="ai-edge-quantizer",
        distribution="ai-edge-quantizer",
        scheme=scheme,
        excluded_ops=[s.rstrip(";") for s in scopes],
        quantized=count,
    )


def find(job: ExportJob) -> None:
    model = _read_model(job.artifact.read_bytes())
    job.placements = locate(job.fingerprints, _constants(model))


def _constants(model) -> list[Constant]:
    """One Constant per buffer with data, keyed by buffer index, typed by the tensors using it."""
    dtypes = _dtypes()
    uses: dict[int, int] = {}
    first_tensor: dict[int, object] = {}
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            first_tensor.setdefault(tensor.buffer, tensor)
        for op in subgraph.operators:
            for i in op.inputs if op.inputs is not None else []:
                if i >= 0:
                    b = subgraph.tensors[i].buffer
                    uses[b] = uses.get(b, 0) + 1
    constants = []
    for index, tensor in first_tensor.items():
        data = model.buffers[index].data
        dtype = dtypes.get(tensor.type)
        if index == 0 or data is None or len(data) == 0 or dtype not in ("float32", "float16"):
            continue
        values = np.frombuffer(bytes(data), np.dtype(dtype).newbyteorder("<"))
        constants.append(Constant(index, values, tuple(int(d) for d in tensor.shape), uses.get(index, 0)))
    return constants


def lay_out_tail(job: ExportJob) -> None:
    """Move the adaptive buffers into a 64-aligned tail region and reserve the metadata buffer."""
    from ai_edge_litert.tools import flatbuffer_utils

    schema = _schema()
    model = _read_model(job.artifact.read_bytes())
    payloads = {}
    for p in job.placements:
        buffer = model.buffers[p.key]
        payloads[p.key] = bytes(buffer.data)
        buffer.data, buffer.offset, buffer.size = None, PLACEHOLDER, len(payloads[p.key])
    metadata_buffer = len(model.buffers)
    model.buffers.append(schema.BufferT())
    model.buffers[-1].offset, model.buffers[-1].size = PLACEHOLDER, PLACEHOLDER
    model.metadata = (model.metadata or []) + [schema.MetadataT()]
    model.metadata[-1].name, model.metadata[-1].buffer = METADATA_NAME, metadata_buffer

    data = bytearray(flatbuffer_utils.convert_object_to_bytearray(model))
    start = align(len(data))
    data.extend(bytes(start - len(data)))
    packed = schema.Model.GetRootAs(data, 0)
    for p in job.placements:
        offset = align(len(data))
        data.extend(bytes(offset - len(data)) + payloads[p.key])
        flatbuffer_utils.update_packed_buffer(packed.Buffers(p.key), offset, len(payloads[p.key]))
        job.tensors.append(
            TensorEntry(
                p.name,
                tuple(job.base[p.name].shape),
                job.artifact_name,
                offset,
                len(payloads[p.key]),
                p.dtype,
                p.layout,
                p.stored_shape,
                ALIGNMENT,
            )
        )
    if job.placements:
        job.extra["tflite"]["adaptive_region"] = [start, len(data)]
    job.artifact.write_bytes(bytes(data))


def embed(job: ExportJob) -> None:
    """Append the weight map JSON and point the reserved metadata buffer at it."""
    from ai_edge_litert.tools import flatbuffer_utils

    data = bytearray(job.artifact.read_bytes())
    packed = _schema().Model.GetRootAs(data, 0)
    index = next(
        packed.Metadata(i).Buffer()
        for i in range(packed.MetadataLength())
        if packed.Metadata(i).Name().decode() == METADATA_NAME
    )
    text = embedded_weight_map(job).encode()
    flatbuffer_utils.update_packed_buffer(packed.Buffers(index), len(data), len(text))
    job.artifact.write_bytes(bytes(data + text))


def embedded(artifact_bytes: bytes) -> str | None:
    """The weight map JSON embedded in a .tflite file, if any."""
    packed = _schema().Model.GetRootAs(bytearray(artifact_bytes), 0)
    for i in range(packed.MetadataLength()):
        if packed.Metadata(i).Name().decode() == METADATA_NAME:
            buffer = packed.Buffers(packed.Metadata(i).Buffer())
            return artifact_bytes[buffer.Offset() : buffer.Offset() + buffer.Size()].decode()
    return None


def passes(options) -> list[Pass]:
    quantized = [Pass(f"quantize ({options.precision})", quantize)] if options.precision != "float32" else []
    if options.adaptive_as_inputs:
        return [
            Pass("convert", convert),
            *quantized,
            Pass("lay out adaptive inputs", lay_out_adaptive_inputs),
            Pass("lay out tail", lay_out_tail),
            Pass("embed weight map", embed),
        ]
    return [
        Pass("convert", convert),
        *quantized,
        Pass("locate", find),
        Pass("lay out tail", lay_out_tail),
        Pass("embed weight map", embed),
    ]


TARGET = Target(
    name="tflite", suffix=".tflite", directory=False, precisions=("float32", "float16", "int8"), passes=passes
)
