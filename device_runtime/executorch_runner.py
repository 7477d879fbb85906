"""The ExecuTorch runner: a `.pte` program with its `.ptd` data file, through ExecuTorch's Python
runtime (`executorch.runtime`).

The one module of device_runtime that needs torch: ExecuTorch's Python bindings import torch
and take inputs only as torch tensors (on a phone the C++ runtime needs neither). It is
imported only when a runner for the `executorch` runtime is opened (`runners.open_runner`), never
by importing device_runtime or any other runner, and the layering test allows it by name and
checks that nothing else imports it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch  # ExecuTorch's Python runtime takes torch tensors (see the module docstring)

from device_runtime.runners import Runner, RunnerConfig, RunnerError, _named_specs
from device_runtime.weight_map import IOSpec, WeightMap

DTYPES = {4: "int64", 6: "float32", 3: "int32", 11: "bool"}  # ExecuTorch ScalarType codes


class ExecuTorchRunner(Runner):
    runtime = "executorch"

    def __init__(
        self,
        model: Path | bytes,
        config: RunnerConfig,
        weight_map: WeightMap | None,
        files: Mapping[str, bytes | bytearray],
        root: Path | None,
    ) -> None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        self._scratch = None
        data_path = self._data_path(weight_map, files, root)
        _unsafe_reset_threadpool(config.threads)  # XNNPACK's pool defaults to every core
        try:
            source = model if isinstance(model, bytes) else str(model)
            program = Runtime.get().load_program(source, data_path=data_path)
            self._method = program.load_method("forward")
        except (RuntimeError, ValueError) as err:
            raise RunnerError(f"ExecuTorch cannot load the program: {str(err).splitlines()[0]}") from None
        meta = self._method.metadata
        ins = [self._spec(f"input_{i}", meta.input_tensor_meta(i)) for i in range(meta.num_inputs())]
        outs = [self._spec(f"output_{i}", meta.output_tensor_meta(i)) for i in range(meta.num_outputs())]
        # the program's tensors are positional: the weight map's names apply in order
        self.inputs = _named_specs(
            "input", _positional(ins, weight_map and weight_map.inputs), weight_map and weight_map.inputs
        )
        self.outputs = _named_specs(
            "output", _positional(outs, weight_map and weight_map.outputs), weight_map and weight_map.outputs
        )

    def _data_path(
        self, weight_map: WeightMap | None, files: Mapping[str, bytes | bytearray], root: Path | None
    ) -> str | None:
        """The .ptd as a file: ExecuTorch reads data only from a path, so one held in memory is
        written to a private temporary file for the life of this runner."""
        names = [f for f in (weight_map.files if weight_map else ()) if f.endswith(".ptd")]
        if not names:
            return None
        name = names[0]
        if name in files:
            fd, path = tempfile.mkstemp(suffix=".ptd")
            with os.fdopen(fd, "wb") as f:
                f.write(files[name])
            self._scratch = path
            return path
        if root is None:
            raise RunnerError(f"an ExecuTorch program loaded from bytes needs its {name} in `files`")
        return str(root / name)

    @staticmethod
    def _spec(name: str, info) -> IOSpec:
        return IOSpec(name, name, DTYPES.get(int(info.dtype()), str(info.dtype())), tuple(int(d) for d in info.sizes()))

    def invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        try:
            outputs = self._method.execute([torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        except RuntimeError as err:
            raise RunnerError(f"ExecuTorch failed to run: {str(err).splitlines()[0]}") from None
        return [o.numpy() for o in outputs]

    def close(self) -> None:
        self._method = None
        if self._scratch is not None:
            os.unlink(self._scratch)
            self._scratch = None


def _positional(specs: list[IOSpec], declared: tuple[IOSpec, ...] | None) -> list[IOSpec]:
    """Runtime specs renamed to the declared runtime names by position (ExecuTorch names none)."""
    if not declared or len(declared) != len(specs):
        return specs
    return [IOSpec(d.runtime_name, d.runtime_name, s.dtype, s.shape) for s, d in zip(specs, declared)]
