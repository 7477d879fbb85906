"""Runners: one small interface over LiteRT, ONNX Runtime and Core ML.

A runner loads a compiled artifact from its path or from bytes in memory (the way a patched
model arrives), describes its inputs and outputs by PyTorch forward() names when the weight map
is known, casts inputs to the artifact's dtypes when that is lossless, runs, and closes.
"""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_runtime import weight_map as weight_maps
from device_runtime.errors import MntoolError
from device_runtime.weight_map import IOSpec, WeightMap, WeightMapError

RUNTIMES = ("litert", "onnxruntime", "coreml", "executorch")
RUNTIME_OF_TARGET = {"tflite": "litert", "onnx": "onnxruntime", "coreml": "coreml", "executorch": "executorch"}
RUNTIME_OF_SUFFIX = {
    ".tflite": "litert",
    ".onnx": "onnxruntime",
    ".mlpackage": "coreml",
    ".mlmodel": "coreml",
    ".pte": "executorch",
}
ORT_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
PACKAGE_OF_RUNTIME = {  # the distribution whose version a report names
    "litert": "ai-edge-litert",
    "onnxruntime": "onnxruntime",
    "coreml": "coremltools",
    "executorch": "executorch",
}


class RunnerError(MntoolError):
    """An artifact cannot be loaded or run, or the inputs given do not fit it."""


@dataclass(frozen=True)
class RunnerConfig:
    threads: int = 1  # intra-op threads; 1 is what a phone app usually gets for a small model
    xnnpack: bool = True  # LiteRT: apply the default XNNPACK delegate (off = builtin kernels)
    graph_optimization: str = "all"  # ONNX Runtime: one of ORT_OPTIMIZATION_LEVELS

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise RunnerError(f"threads must be >= 1, got {self.threads}")
        if self.graph_optimization not in ORT_OPTIMIZATION_LEVELS:
            raise RunnerError(f"graph optimisation {self.graph_optimization!r} is not one of {ORT_OPTIMIZATION_LEVELS}")


def runtime_for(artifact: Path, weight_map: WeightMap | None = None) -> str:
    """The runtime that runs `artifact`: from its weight map's target, else from its suffix."""
    if weight_map is not None:
        return RUNTIME_OF_TARGET[weight_map.target]
    runtime = RUNTIME_OF_SUFFIX.get(Path(artifact).suffix.lower())
    if runtime is None:
        raise RunnerError(f"cannot tell the runtime of {artifact} from its suffix (known: {sorted(RUNTIME_OF_SUFFIX)})")
    return runtime


def cast_lossless(name: str, value: np.ndarray, dtype: str) -> np.ndarray:
    """`value` as `dtype` when every element survives the round trip; a RunnerError otherwise."""
    value = np.asarray(value)
    target = np.dtype(dtype)
    if value.dtype == target:
        return value
    cast = value.astype(target)
    back = cast.astype(value.dtype)
    exact = np.array_equal(back, value, equal_nan=value.dtype.kind in "fc")
    if not exact:
        bad = np.flatnonzero(back.reshape(-1) != value.reshape(-1))
        example = value.reshape(-1)[bad[0]] if bad.size else "NaN"
        raise RunnerError(f"input {name!r}: casting {value.dtype} to {target} would change values (e.g. {example})")
    return cast


class Runner(ABC):
    """A loaded artifact. `inputs`/`outputs` are IOSpecs whose `name` is what `run` takes/returns.

    In weights-as-inputs artifacts (weight map mode "inputs") the adaptive tensors are inputs too;
    `bound` holds their values as read from the artifact's own files, used unless a feed overrides
    them, so callers give only `free_inputs`."""

    runtime: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    bound: dict[str, np.ndarray]

    @property
    def free_inputs(self) -> tuple[IOSpec, ...]:
        return tuple(s for s in self.inputs if s.name not in self.bound)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference, inputs and outputs keyed by name."""
        return dict(zip((s.name for s in self.outputs), self.invoke(self.prepare(feeds))))

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Inputs in the artifact's order, cast losslessly to its dtypes and shape-checked."""
        missing = [s.name for s in self.free_inputs if s.name not in feeds]
        unknown = sorted(set(feeds) - {s.name for s in self.inputs})
        if missing or unknown:
            raise RunnerError(
                f"inputs do not match the artifact: missing {missing}, unknown {unknown} "
                f"(expected {[s.name for s in self.free_inputs]})"
            )
        arrays = []
        for spec in self.inputs:
            value = cast_lossless(
                spec.name, feeds[spec.name] if spec.name in feeds else self.bound[spec.name], spec.dtype
            )
            if value.shape != spec.shape:
                raise RunnerError(
                    f"input {spec.name!r}: shape {value.shape} does not match the artifact's {spec.shape}"
                )
            arrays.append(value)
        return arrays

    @abstractmethod
    def invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One inference on inputs from `prepare`, outputs in `self.outputs` order: the bare
        runtime call an app makes, which is what the benchmark times."""

    def close(self) -> None:  # noqa: B027 (a hook: runners holding nothing to release need not override it)
        """Release the interpreter/session; the runner is unusable afterwards."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _named_specs(kind: str, runtime_specs: list[IOSpec], declared: tuple[IOSpec, ...] | None) -> tuple[IOSpec, ...]:
    """Rename the runtime's own tensor specs to forward() names as the weight map declares them.

    `runtime_specs[i].name` holds every name the runtime answers to for tensor i (joined by '|'
    for LiteRT, which has a tensor name and a signature name)."""
    if not declared:
        return tuple(IOSpec(s.name.split("|")[0], s.runtime_name, s.dtype, s.shape) for s in runtime_specs)
    by_alias = {alias: s for s in runtime_specs for alias in s.name.split("|")}
    named = []
    for d in declared:
        spec = by_alias.get(d.runtime_name)
        if spec is None:
            have = sorted(by_alias)
            raise WeightMapError(
                f"weight map {kind} {d.name!r} names runtime tensor {d.runtime_name!r}, which the artifact lacks (has {have})"
            )
        named.append(IOSpec(d.name, spec.runtime_name, spec.dtype, spec.shape))
    if len(named) != len(runtime_specs):
        raise WeightMapError(f"weight map lists {len(named)} {kind}s but the artifact has {len(runtime_specs)}")
    return tuple(named)


# ---- LiteRT ---------------------------------------------------------------------------------
def _litert_module():
    """The LiteRT Python interpreter: ai-edge-litert, else tflite_runtime, else TensorFlow."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        try:
            from tflite_runtime import interpreter
        except ImportError:
            try:
                from tensorflow.lite.python import interpreter
            except ImportError:
                raise RunnerError("no LiteRT interpreter: pip install ai-edge-litert") from None
    return interpreter


class LiteRTRunner(Runner):
    runtime = "litert"

    def __init__(self, model: Path | bytes, config: RunnerConfig, weight_map: WeightMap | None) -> None:
        lite = _litert_module()
        resolver = lite.OpResolverType.AUTO if config.xnnpack else lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        try:
            self._interpreter = lite.Interpreter(
                **source, num_threads=config.threads, experimental_op_resolver_type=resolver
            )
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise RunnerError(f"LiteRT cannot load the model: {err}") from None
        signature_names: dict[int, str] = {}  # tensor index -> name in the first signature
        keys = list(self._interpreter.get_signature_list())
        if keys:
            signature = self._interpreter.get_signature_runner(keys[0])
            for name, d in {**signature.get_input_details(), **signature.get_output_details()}.items():
                signature_names[d["index"]] = name
        in_details = self._interpreter.get_input_details()
        out_details = self._interpreter.get_output_details()
        self.inputs = _named_specs("input", self._specs(in_details, signature_names), weight_map and weight_map.inputs)
        self.outputs = _named_specs(
            "output", self._specs(out_details, signature_names), weight_map and weight_map.outputs
        )
        self._in_index = [self._index_of(s.runtime_name, in_details) for s in self.inputs]
        self._out_index = [self._index_of(s.runtime_name, out_details) for s in self.outputs]

    @staticmethod
    def _specs(details: list[dict], signature_names: dict[int, str]) -> list[IOSpec]:
        """Specs named 'tensor_name|signature_name', the two names LiteRT knows a tensor by."""
        specs = []
        for d in details:
            aliases = d["name"] + (f"|{signature_names[d['index']]}" if d["index"] in signature_names else "")
            specs.append(IOSpec(aliases, d["name"], np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape"])))
        return specs

    @staticmethod
    def _index_of(runtime_name: str, details: list[dict]) -> int:
        return next(d["index"] for d in details if d["name"] == runtime_name)

    def invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        interpreter = self._interpreter
        for index, value in zip(self._in_index, arrays):
            interpreter.set_tensor(index, value)
        try:
            interpreter.invoke()
        except RuntimeError as err:  # e.g. an item id outside the embedding table
            raise RunnerError(f"LiteRT failed to run: {str(err).splitlines()[0]}") from None
        return [interpreter.get_tensor(index) for index in self._out_index]

    def close(self) -> None:
        self._interpreter = None


# ---- ONNX Runtime ---------------------------------------------------------------------------
class OnnxRuntimeRunner(Runner):
    runtime = "onnxruntime"

    def __init__(
        self,
        model: Path | bytes,
        config: RunnerConfig,
        weight_map: WeightMap | None,
        external_files: Mapping[str, bytes],
        external_dir: Path | None,
    ) -> None:
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        self._invalid_argument = InvalidArgument
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[config.graph_optimization]
        if external_files:
            names = list(external_files)
            options.add_external_initializers_from_files_in_memory(
                names, [external_files[n] for n in names], [len(external_files[n]) for n in names]
            )
        if isinstance(model, bytes) and external_dir is not None:
            # Model bytes have no directory; external data still on disk is found relative to this.
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_dir))
        source = model if isinstance(model, bytes) else str(model)
        try:
            self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types for every load failure
            raise RunnerError(f"ONNX Runtime cannot load the model: {str(err).splitlines()[0]}") from None
        self.inputs = _named_specs(
            "input", [self._spec(a) for a in self._session.get_inputs()], weight_map and weight_map.inputs
        )
        self.outputs = _named_specs(
            "output", [self._spec(a) for a in self._session.get_outputs()], weight_map and weight_map.outputs
        )
        self._in_names = [s.runtime_name for s in self.inputs]
        self._out_names = [s.runtime_name for s in self.outputs]

    @staticmethod
    def _spec(arg) -> IOSpec:
        dtype = {
            "tensor(float)": "float32",
            "tensor(double)": "float64",
            "tensor(float16)": "float16",
            "tensor(int64)": "int64",
            "tensor(int32)": "int32",
            "tensor(bool)": "bool",
        }.get(arg.type)
        if dtype is None:
            raise RunnerError(f"ONNX tensor {arg.name!r} has unsupported type {arg.type}")
        if not all(isinstance(d, int) for d in arg.shape):
            raise RunnerError(f"ONNX tensor {arg.name!r} has a dynamic shape {arg.shape}; mntool artifacts are static")
        return IOSpec(arg.name, arg.name, dtype, tuple(arg.shape))

    def invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        try:
            return self._session.run(self._out_names, dict(zip(self._in_names, arrays)))
        except self._invalid_argument as err:  # e.g. an item id outside the embedding table
            raise RunnerError(f"ONNX Runtime rejected the inputs: {str(err).splitlines()[0]}") from None

    def close(self) -> None:
        self._session = None


# ---- Core ML --------------------------------------------------------------------------------
class CoreMLRunner(Runner):
    runtime = "coreml"

    def __init__(
        self, model: Path | bytes, config: RunnerConfig, weight_map: WeightMap | None, in_memory: bool
    ) -> None:
        if sys.platform != "darwin":
            raise RunnerError(
                f"Core ML prediction needs macOS; this is {sys.platform} "
                "(inspect the .mlpackage here with `mntool inspect`, run it on a Mac or iPhone)"
            )
        if in_memory or isinstance(model, bytes):
            raise RunnerError("the Core ML runner loads .mlpackage directories from disk, not from memory")
        import coremltools as ct

        self._model = ct.models.MLModel(str(model), compute_units=ct.ComputeUnit.CPU_ONLY)
        spec = self._model.get_spec()
        self.inputs = _named_specs(
            "input", [self._spec(f) for f in spec.description.input], weight_map and weight_map.inputs
        )
        self.outputs = _named_specs(
            "output", [self._spec(f) for f in spec.description.output], weight_map and weight_map.outputs
        )

    @staticmethod
    def _spec(feature) -> IOSpec:
        array = feature.type.multiArrayType
        dtype = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32"}[array.dataType]
        return IOSpec(feature.name, feature.name, dtype, tuple(int(d) for d in array.shape))

    def invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        result = self._model.predict({s.runtime_name: a for s, a in zip(self.inputs, arrays)})
        return [np.asarray(result[s.runtime_name]) for s in self.outputs]

    def close(self) -> None:
        self._model = None


# ---- loading --------------------------------------------------------------------------------
def open_runner(
    artifact: Path | str | bytes,
    *,
    runtime: str | None = None,
    files: Mapping[str, bytes | bytearray] | None = None,
    weight_map: WeightMap | None = None,
    config: RunnerConfig = RunnerConfig(),
) -> Runner:
    """Load an artifact into a runner.

    `artifact` is the artifact's path, or the model file's bytes (then `runtime` is required).
    `files` holds artifact files already in memory, named relative to the artifact root (as in
    the weight map): with a path, a file found in `files` is taken from memory instead of disk,
    the model file included (that is how a patched artifact is loaded without writing it).
    """
    if isinstance(artifact, (bytes, bytearray)):
        if runtime is None:
            raise RunnerError("loading an artifact from bytes needs its runtime")
        model, root = artifact, None
    else:
        path = Path(artifact)
        if not path.exists():
            raise RunnerError(f"artifact {path} does not exist")
        runtime = runtime or runtime_for(path, weight_map)
        root = path if path.is_dir() else path.parent
        model = files[path.name] if files and path.name in files else path
    if isinstance(model, (bytearray, memoryview)):
        model = bytes(model)  # the Python bindings take only bytes for the model itself (a copy)
    if runtime not in RUNTIMES:
        raise RunnerError(f"runtime {runtime!r} is not one of {RUNTIMES}")
    bound = _adaptive_inputs(weight_map, files or {}, root) if weight_map and weight_map.mode == "inputs" else {}
    if runtime == "litert":
        runner = LiteRTRunner(model, config, weight_map)
    elif runtime == "onnxruntime":
        main = None if isinstance(artifact, (bytes, bytearray)) else Path(artifact).name
        external = {name: data for name, data in (files or {}).items() if name != main}
        runner = OnnxRuntimeRunner(model, config, weight_map, external, root)
    elif runtime == "executorch":
        from device_runtime.executorch_runner import ExecuTorchRunner  # imports torch: see its docstring

        runner = ExecuTorchRunner(model, config, weight_map, files or {}, root)
    else:
        runner = CoreMLRunner(model, config, weight_map, in_memory=bool(files))
    runner.bound = bound
    return runner


def _adaptive_inputs(
    weight_map: WeightMap, files: Mapping[str, bytes | bytearray], root: Path | None
) -> dict[str, np.ndarray]:
    """Weights-as-inputs: each adaptive tensor's value from the artifact's flat file (in memory if
    given there, else on disk), in its PyTorch shape, ready to feed."""
    contents: dict[str, bytes | bytearray] = {}
    values = {}
    for t in weight_map.tensors:
        if t.file not in contents:
            if t.file in files:
                contents[t.file] = files[t.file]
            elif root is not None:
                contents[t.file] = (root / t.file).read_bytes()
            else:
                raise RunnerError(f"weights-as-inputs artifact loaded from bytes needs its {t.file} in `files`")
        values[t.name] = np.ascontiguousarray(weight_maps.read_tensor(t, contents[t.file]))
    return values


# ---- one inference, as `mntool run` does it -------------------------------------------------
def find_weight_map(artifact: Path) -> WeightMap | None:
    """The artifact's weight map if it has a sidecar (checked against the artifact), else None."""
    artifact = Path(artifact)
    if not weight_maps.sidecar_path(artifact).is_file():
        return None
    return weight_maps.load(artifact)


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    """Named inputs from an .npz, or a .json object of (nested) lists."""
    path = Path(path)
    if not path.is_file():
        raise RunnerError(f"inputs file {path} does not exist")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (OSError, ValueError) as err:
            raise RunnerError(f"{path} is not a readable .npz: {err}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunnerError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise RunnerError(f"{path} must hold a JSON object of input name -> array")
        try:
            return {name: np.asarray(value) for name, value in data.items()}
        except ValueError as err:
            raise RunnerError(f"{path}: an input is not a rectangular array: {err}") from None
    raise RunnerError(f"inputs file {path} must be .npz or .json")


def run_artifact(
    artifact: Path,
    inputs: Mapping[str, np.ndarray],
    *,
    runtime: str | None = None,
    config: RunnerConfig = RunnerConfig(),
) -> dict[str, np.ndarray]:
    """Load `artifact` (with its weight map, if any) and run one inference on named inputs."""
    with open_runner(artifact, runtime=runtime, weight_map=find_weight_map(artifact), config=config) as runner:
        return runner.run(inputs)
