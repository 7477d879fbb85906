"""Core ML target: `torch.jit.trace` + `coremltools.convert` to an ML program (.mlpackage).

Weights live in `weights/weight.bin` as blobs: a 64-byte blob_metadata record (what a const's
`blobFileValue.offset` points at), then the data, 64-aligned. Constant de-duplication is removed
from the pass pipeline; constants under 10 elements, which coremltools writes inline into
model.mlmodel, are moved into weight.bin when adaptive so every adaptive tensor is patchable.
With precision="float16" the adaptive blobs are fp16.

precision="int8": the float16 program (compute precision fp16, as Core ML runs on the Neural
Engine), then `coremltools.optimize.coreml.linear_quantize_weights` (int8 per-channel symmetric,
`constexpr_affine_dequantize`) on every frozen const above coremltools' size threshold; the
adaptive consts are excluded by name (`op_name_configs`), so they stay fp16 blobs.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from device_runtime.layout import ALIGNMENT, stored_values
from device_runtime.weight_map import IOSpec, TensorEntry, WeightMap
from exporters import quantize as quantization
from exporters.errors import ConversionFailed, ExportError, first_line
from exporters.job import ExportJob, Pass, embedded_weight_map, lay_out_adaptive_inputs
from exporters.locate import Constant, locate
from exporters.quiet import quiet
from exporters.target import ReadBack, Target

METADATA_KEY = "mntool.weightmap"
MANIFEST_FILE = "Manifest.json"
SPEC_FILE = "Data/com.apple.CoreML/model.mlmodel"
WEIGHT_FILE = "Data/com.apple.CoreML/weights/weight.bin"
BLOB_FILE_NAME = "@model_path/weights/weight.bin"
BLOB_METADATA = struct.Struct("<IIQQQ")  # sentinel, mil dtype, size in bytes, data offset, padding bits
BLOB_SENTINEL = 0xDEADBEEF
BLOB_DTYPES = {1: "float16", 2: "float32"}  # MILBlob's dtype codes (not the MIL proto's)


def _ct():
    with quiet():  # coremltools warns at import about the macOS-only runtime and versions
        import coremltools

    return coremltools


def _mil_dtypes() -> dict[int, str]:
    from coremltools.proto import MIL_pb2

    d = MIL_pb2.DataType
    return {d.Value("FLOAT32"): "float32", d.Value("FLOAT16"): "float16", d.Value("INT32"): "int32"}


def _feature_dtype(feature) -> str:
    from coremltools.proto import FeatureTypes_pb2

    kinds = FeatureTypes_pb2.ArrayFeatureType
    return {kinds.FLOAT32: "float32", kinds.FLOAT16: "float16", kinds.INT32: "int32", kinds.DOUBLE: "float64"}[
        feature.type.multiArrayType.dataType
    ]


def _operations(spec):
    """Every op of the main function, nested blocks (loop bodies) included."""
    function = spec.mlProgram.functions["main"]

    def walk(block):
        for op in block.operations:
            yield op
            for inner in op.blocks:
                yield from walk(inner)

    yield from walk(function.block_specializations[function.opset])


def _load_spec(root: Path):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((root / SPEC_FILE).read_bytes())
    return spec


def _save_spec(root: Path, spec) -> None:
    (root / SPEC_FILE).write_bytes(spec.SerializeToString())


# ---- passes ---------------------------------------------------------------------------------
def convert(job: ExportJob) -> None:
    """torch.export -> coremltools; models whose ops its torch.export frontend lacks (GRU) are
    traced with torch.jit.trace instead (the frontend choice is recorded in `extra`)."""
    import torch

    from exporters import prepare

    ct = _ct()
    module, kwargs = job.conversion_inputs()
    pipeline = ct.PassPipeline.DEFAULT
    # const_deduplication would merge equal tensors; the conv scale/bias and elementwise-to-BatchNorm
    # fusions would fold an adaptive per-channel affine after a convolution into its weights
    pipeline.remove_passes(
        [
            "common::const_deduplication",
            "common::fuse_conv_scale",
            "common::fuse_conv_bias",
            "common::fuse_elementwise_to_batchnorm",
        ]
    )
    options = dict(
        outputs=[ct.TensorType(name=n) for n in job.output_names],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
        pass_pipeline=pipeline,
        compute_precision=ct.precision.FLOAT32 if job.options.precision == "float32" else ct.precision.FLOAT16,
    )
    with quiet():
        try:
            try:
                program = torch.export.export(module, (), kwargs).run_decompositions({})
                mlmodel, frontend = ct.convert(program, **options), "torch.export"
            except NotImplementedError:  # "Unsupported fx node gru": trace instead
                inputs = [
                    ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.float32 if x.is_floating_point() else np.int32)
                    for n, x in kwargs.items()
                ]
                traced = torch.jit.trace(module, tuple(kwargs.values()))
                mlmodel, frontend = ct.convert(traced, inputs=inputs, **options), "torch.jit.trace"
        except Exception as err:  # torch.export, tracing and the MIL frontends raise many types
            raise ConversionFailed(f"coremltools cannot convert the model: {first_line(err)}") from None
        mlmodel.save(str(job.artifact))
    job.files = sorted(str(p.relative_to(job.root)) for p in job.root.rglob("*") if p.is_file())
    spec = _load_spec(job.root)
    features = {f.name: f for f in spec.description.input}
    outputs = {f.name: f for f in spec.description.output}

    def io(name: str, feature) -> IOSpec:
        return IOSpec(
            name, feature.name, _feature_dtype(feature), tuple(int(d) for d in feature.type.multiArrayType.shape)
        )

    job.inputs = [io(n, features[n]) for n in job.input_names]
    job.inputs += [io(n, features[prepare.input_name_of(n)]) for n in job.adaptive if job.mode == "inputs"]
    job.outputs = [io(n, outputs[n]) for n in job.output_names]
    job.extra["coreml"] = {
        "precision": job.options.precision,
        "minimum_deployment_target": "iOS16",
        "frontend": frontend,
    }


def quantize(job: ExportJob) -> None:
    """int8 weights with coremltools.optimize.coreml; the adaptive consts are excluded by name."""
    ct = _ct()
    with quiet():
        from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    before = quantization.excluded(job, _constants(job.root))
    weights = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    config = OptimizationConfig(global_config=weights, op_name_configs={p.key: None for p in before})
    try:
        with quiet():
            model = ct.models.MLModel(str(job.artifact), skip_model_load=True)
            compressed = linear_quantize_weights(model, config)
            shutil.rmtree(job.artifact)
            compressed.save(str(job.artifact))
    except Exception as err:  # the MIL passes raise many types
        raise ConversionFailed(f"coremltools cannot quantise the model: {first_line(err)}") from None
    job.files = sorted(str(p.relative_to(job.root)) for p in job.root.rglob("*") if p.is_file())
    quantization.check_untouched(job, before, _constants(job.root), "coremltools.optimize")
    count = sum(1 for op in _operations(_load_spec(job.root)) if op.type == "constexpr_affine_dequantize")
    quantization.require_quantized(
        job, count, "coremltools.optimize", f"no frozen const over {weights.weight_threshold} elements"
    )
    quantization.record(
        job,
        tool="coremltools.optimize.coreml.linear_quantize_weights",
        distribution="coremltools",
        scheme=f"int8 per-channel symmetric weights (consts over {weights.weight_threshold} elements), float16 compute",
        excluded_ops=[p.key for p in before],
        quantized=count,
    )


def find(job: ExportJob) -> None:
    job.placements = locate(job.fingerprints, _constants(job.root))


def _constants(root: Path) -> list[Constant]:
    """Every float const op (in weight.bin or inline), keyed by its output name."""
    ct = _ct()
    spec = _load_spec(root)
    reader = ct.libmilstoragepython._BlobStorageReader(str(root / WEIGHT_FILE))
    dtypes = _mil_dtypes()
    uses: dict[str, int] = {}
    for op in _operations(spec):
        for argument in op.inputs.values():
            for binding in argument.arguments:
                uses[binding.name] = uses.get(binding.name, 0) + 1
        for block in op.blocks:
            for name in block.outputs:
                uses[name] = uses.get(name, 0) + 1
    constants = []
    for op in _operations(spec):
        if op.type != "const":
            continue
        value = op.attributes["val"]
        dtype = dtypes.get(value.type.tensorType.dataType)
        if dtype not in ("float32", "float16"):
            continue
        if value.HasField("blobFileValue"):
            offset = value.blobFileValue.offset
            data = (
                reader.read_float_data(offset) if dtype == "float32" else reader.read_fp16_data(offset).view(np.float16)
            )
        elif value.immediateValue.tensor.HasField("floats"):
            data = np.asarray(value.immediateValue.tensor.floats.values, np.float32)
        else:
            data = np.frombuffer(value.immediateValue.tensor.bytes.values, np.float16)
        name = op.outputs[0].name
        shape = tuple(int(d.constant.size) for d in value.type.tensorType.dimensions)
        constants.append(Constant(name, np.asarray(data).ravel(), shape, uses.get(name, 0)))
    return constants


def move_to_blobs(job: ExportJob) -> None:
    """Give every adaptive const a blob in weight.bin (moving inline ones there) and map its data."""
    ct = _ct()
    spec = _load_spec(job.root)
    ops = {op.outputs[0].name: op for op in _operations(spec) if op.type == "const"}
    weight_file = job.root / WEIGHT_FILE
    for p in job.placements:
        value = ops[p.key].attributes["val"]
        if value.HasField("blobFileValue"):
            continue
        if value.immediateValue.tensor.HasField("floats"):
            data = np.asarray(value.immediateValue.tensor.floats.values, np.float32)
        else:
            data = np.frombuffer(value.immediateValue.tensor.bytes.values, np.float16)
        writer = ct.libmilstoragepython._BlobStorageWriter(str(weight_file), truncate_file=False)
        offset = writer.write_float_data(data) if p.dtype == "float32" else writer.write_fp16_data(data.view(np.uint16))
        del writer  # flushes the file
        value.ClearField("immediateValue")
        value.blobFileValue.fileName, value.blobFileValue.offset = BLOB_FILE_NAME, offset
    _save_spec(job.root, spec)
    blobs = weight_file.read_bytes()
    for p in job.placements:
        value = ops[p.key].attributes["val"]
        sentinel, code, nbytes, data_offset, _ = BLOB_METADATA.unpack_from(blobs, value.blobFileValue.offset)
        if sentinel != BLOB_SENTINEL or BLOB_DTYPES.get(code) != p.dtype or data_offset % ALIGNMENT:
            raise ExportError(
                f"{p.name}: weight.bin blob at {value.blobFileValue.offset} is not a {p.dtype} blob (format changed?)"
            )
        job.tensors.append(
            TensorEntry(
                p.name,
                tuple(job.base[p.name].shape),
                WEIGHT_FILE,
                data_offset,
                nbytes,
                p.dtype,
                p.layout,
                p.stored_shape,
                ALIGNMENT,
            )
        )
    job.extra["coreml"]["consts"] = {p.name: p.key for p in job.placements}


def embed(job: ExportJob) -> None:
    """The weight map as the model's user-defined metadata (shown by Xcode, read by coremltools)."""
    spec = _load_spec(job.root)
    spec.description.metadata.userDefined[METADATA_KEY] = embedded_weight_map(job)
    _save_spec(job.root, spec)


def embedded(artifact: Path) -> str | None:
    """The weight map JSON embedded in an .mlpackage, if any."""
    return _load_spec(Path(artifact)).description.metadata.userDefined.get(METADATA_KEY)


# ---- the proof off macOS: read back with coremltools' own readers ----------------------------
def read_back(weight_map: WeightMap, files: Mapping[str, bytes | bytearray], workdir: Path) -> dict[str, np.ndarray]:
    """The adaptive tensors of a Core ML artifact held in `files`, as coremltools reads them, in
    PyTorch order: the package (written to a scratch copy under `workdir`) must load, and each
    adaptive const (buffers mode) or input (inputs mode) must be where the weight map says."""
    from exporters import prepare

    ct = _ct()
    copy = Path(workdir) / ".proof" / weight_map.artifact
    shutil.rmtree(copy.parent, ignore_errors=True)
    for name, data in files.items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    for item in json.loads(files[MANIFEST_FILE])["itemInfoEntries"].values():
        if not (copy / "Data" / item["path"]).exists():  # a directory that held no file: weights/ without blobs
            (copy / "Data" / item["path"]).mkdir(parents=True)
    try:
        with quiet():
            spec = ct.models.MLModel(str(copy), skip_model_load=True).get_spec()
        if weight_map.mode == "inputs":
            shapes = {f.name: tuple(f.type.multiArrayType.shape) for f in spec.description.input}
            for t in weight_map.tensors:
                if shapes.get(prepare.input_name_of(t.name)) != t.shape:
                    raise ExportError(
                        f"{t.name}: the Core ML model has no input {prepare.input_name_of(t.name)} of shape {t.shape}"
                    )
            return stored_values(weight_map, files)
        reader = ct.libmilstoragepython._BlobStorageReader(str(copy / WEIGHT_FILE))
        ops = {op.outputs[0].name: op for op in _operations(spec) if op.type == "const"}
        out = {}
        for t in weight_map.tensors:
            offset = ops[weight_map.extra["coreml"]["consts"][t.name]].attributes["val"].blobFileValue.offset
            data = (
                reader.read_float_data(offset)
                if t.dtype == "float32"
                else reader.read_fp16_data(offset).view(np.float16)
            )
            stored = np.asarray(data).reshape(t.stored_shape)
            out[t.name] = (stored.T if t.layout == "transpose" else stored.reshape(t.shape)).astype(np.float32)
        return out
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


def passes(options) -> list[Pass]:
    quantized = [Pass("quantize (int8)", quantize)] if options.precision == "int8" else []
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
        Pass("move adaptive consts to blobs", move_to_blobs),
        Pass("embed weight map", embed),
    ]


def _runs_here() -> bool:
    return sys.platform == "darwin"  # Core ML predicts on macOS only (`device_runtime.runners.CoreMLRunner`)


TARGET = Target(
    name="coreml",
    suffix=".mlpackage",
    directory=True,
    precisions=("float32", "float16", "int8"),
    passes=passes,
    adaptive_file="Data/mntool/adaptive.bin",  # inside the package, beside Data/com.apple.CoreML
    runs_here=_runs_here,
    read_back=ReadBack(
        read=read_back,
        reader="coremltools",
        why="no Core ML runtime on this OS",
        checked={
            "buffers": "the patched blobs were read with coremltools at the offsets the model spec gives, "
            "independently of the weight map",
            "inputs": "the values file was read back through the weight map itself and the model's inputs "
            "matched by name and shape",
        },
    ),
)
