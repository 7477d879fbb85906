"""Everything done on the PyTorch side before a converter runs: check the arguments, name the
inputs and outputs, fill the adaptive parameters with fingerprint values, and (for the
"weights as inputs" mode) wrap the model so the adaptive tensors are inputs.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn

from device_runtime.weight_map import IOSpec
from exporters.errors import ExportError, UnknownAdaptiveParameter, first_line

TORCH_DTYPES = {torch.float32: "float32", torch.int64: "int64", torch.int32: "int32", torch.float16: "float16"}


def check_arguments(model: nn.Module, example_inputs: tuple, adaptive: list[str]) -> None:
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ExportError("model is in training mode (dropout, batch statistics): call model.eval() before exporting")
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise ExportError("example_inputs must be a non-empty tuple of tensors (the forward() arguments)")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor) or x.dtype not in TORCH_DTYPES:
            kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ExportError(f"example input {i} is {kind}; inputs must be tensors of {sorted(TORCH_DTYPES.values())}")
    if isinstance(adaptive, str) or not adaptive:
        raise ExportError("adaptive must be a non-empty list of parameter names")
    params = dict(model.named_parameters())
    unknown = [n for n in adaptive if n not in params]
    if unknown:
        raise UnknownAdaptiveParameter(
            f"adaptive name(s) {unknown} are not parameters of {type(model).__name__} "
            f"(it has {len(params)}, e.g. {list(params)[:4]})"
        )
    if len(set(adaptive)) != len(adaptive):
        raise ExportError(f"adaptive lists a parameter twice: {adaptive}")
    for n in adaptive:
        if params[n].dtype != torch.float32:
            raise ExportError(f"adaptive parameter {n} is {params[n].dtype}; only float32 parameters can be adaptive")


def input_names(model: nn.Module, n_inputs: int) -> list[str]:
    """The forward() parameter names that the example inputs bind to, in order."""
    params = list(inspect.signature(model.forward).parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(named) < n_inputs:
        raise ExportError(
            f"{type(model).__name__}.forward() names {len(named)} positional arguments but {n_inputs} example "
            "inputs were given (forward(*args) cannot be exported: inputs are addressed by name)"
        )
    unbound = [p.name for p in named[n_inputs:] if p.default is p.empty]
    if unbound:
        raise ExportError(f"example inputs leave forward() argument(s) {unbound} without a value")
    return [p.name for p in named[:n_inputs]]


def input_name_of(param: str) -> str:
    """The input name an adaptive parameter gets in "weights as inputs" mode (an identifier)."""
    return param.replace(".", "_")


def io_specs(names: list[str], tensors: list[torch.Tensor]) -> list[IOSpec]:
    """PyTorch-side specs (runtime names are filled in by each target)."""
    return [IOSpec(n, n, TORCH_DTYPES[t.dtype], tuple(t.shape)) for n, t in zip(names, tensors)]


def run_model(
    model: nn.Module, example_inputs: tuple, params: dict[str, np.ndarray] | None = None
) -> list[torch.Tensor]:
    """The model's outputs as a flat list, optionally with some parameters replaced."""
    try:
        with torch.no_grad():
            if params is None:
                out = model(*example_inputs)
            else:
                out = torch.func.functional_call(
                    model, {n: torch.from_numpy(v) for n, v in params.items()}, example_inputs
                )
    except Exception as err:  # the user's forward() on the user's inputs
        raise ExportError(f"{type(model).__name__}.forward() fails on the example inputs: {first_line(err)}") from None
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    for i, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) or o.dtype not in TORCH_DTYPES:
            raise ExportError(
                f"forward() output {i} is {type(o).__name__}; outputs must be tensors (or a tuple of them)"
            )
    return outs


def output_names(n_outputs: int, given: tuple[str, ...] | None) -> list[str]:
    if given is not None:
        if len(given) != n_outputs or len(set(given)) != len(given):
            raise ExportError(f"output_names {list(given)} do not name the model's {n_outputs} output(s) uniquely")
        return list(given)
    return ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]


def fingerprint_values(model: nn.Module, adaptive: list[str], seed: int) -> dict[str, np.ndarray]:
    """Distinct, non-zero random values for every adaptive element, so that each adaptive tensor
    can be found in a converted artifact by value alone: no two tensors (and no two elements)
    are equal, so no converter can merge them, and no zero bias can be eliminated."""
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in adaptive]
    rng = np.random.default_rng(seed)
    values = np.empty(0, np.float32)
    while values.size < sum(sizes):
        fresh = rng.uniform(0.25, 1.0, sum(sizes)).astype(np.float32) * rng.choice([-1, 1], sum(sizes)).astype(
            np.float32
        )
        values = np.unique(np.concatenate([values, fresh]))
    values = rng.permutation(values)[: sum(sizes)]
    out, start = {}, 0
    for n, size in zip(adaptive, sizes):
        out[n] = values[start : start + size].reshape(tuple(params[n].shape))
        start += size
    return out


def with_values(model: nn.Module, values: dict[str, np.ndarray]) -> nn.Module:
    """A deep copy of `model` whose named parameters hold `values`."""
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(torch.from_numpy(v))
    return clone


def static_values(model: nn.Module, adaptive: list[str]) -> dict[str, np.ndarray]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().numpy().astype(np.float32).copy() for n in adaptive}


def owner_modules(model: nn.Module, adaptive: list[str]) -> list[nn.Module]:
    """The modules that directly own the adaptive parameters (a Linear for its weight and bias)."""
    owners: dict[str, nn.Module] = {}
    for n in adaptive:
        path = n.rpartition(".")[0]
        owners[path] = model.get_submodule(path) if path else model
    return list(owners.values())


@contextlib.contextmanager
def parameters_replaced(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """`model` with some parameters replaced by plain tensors inside the block. Unlike
    `torch.func.functional_call` this also works under `torch.jit.trace` (Core ML's GRU path)."""
    saved = {}
    for name, value in values.items():
        path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(path) if path else model
        saved.setdefault(id(owner), (owner, dict(owner._parameters)))
        del owner._parameters[leaf]
        object.__setattr__(owner, leaf, value)
    try:
        yield
    finally:
        for owner, parameters in saved.values():
            for leaf in parameters:
                owner.__dict__.pop(leaf, None)
            owner._parameters.clear()
            owner._parameters.update(parameters)


class AdaptiveAsInputs(nn.Module):
    """`model` with its adaptive parameters taken from extra inputs (named by `input_name_of`).

    Inputs bind by name (the keyword form TFLite and ONNX tracing use) or by position, model
    inputs first, then adaptive tensors (the form `torch.jit.trace` needs for Core ML)."""

    def __init__(self, model: nn.Module, inputs: list[str], adaptive: list[str]):
        super().__init__()
        self.model = model
        self.input_order = list(inputs)
        self.adaptive = list(adaptive)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        names = self.input_order + [input_name_of(n) for n in self.adaptive]
        bound = {**dict(zip(names, args)), **kwargs}
        with parameters_replaced(self.model, {n: bound[input_name_of(n)] for n in self.adaptive}):
            return self.model(*(bound[n] for n in self.input_order))
