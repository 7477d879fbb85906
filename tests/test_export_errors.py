"""What the exporters refuse, per target, with a named one-line error: adaptive tensors a
converter folds, duplicates, re-orders or splits; unsupported ops; bad arguments. And a failed
export leaves the output directory exactly as it was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_export import with_batch_statistics

from device_runtime import weight_map as weight_maps
from exporters import export
from exporters.errors import (
    AdaptiveTensorDuplicated,
    AdaptiveTensorFolded,
    AdaptiveTensorTransposed,
    ConversionFailed,
    ExportError,
    UnknownAdaptiveParameter,
    UnknownTarget,
)
from exporters.options import PROOF_ATOL


class LinearThenBatchNorm(nn.Module):
    """A Linear followed by BatchNorm: the classic candidate for folding."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


class ScaledWeight(nn.Module):
    """Uses `2 * w`: a converter folds the constant product into a new constant."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(x @ (self.w * 2).T)


class WeightUsedTwice(nn.Module):
    """Uses `w` as-is and transposed: a converter may store two copies."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(F.linear(x, self.w) + x @ self.w)


class ConvFeature(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.out = nn.Linear(4, 1)

    def forward(self, image):
        return self.out(self.conv(image).mean((2, 3)))


class GRUFeature(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.out = nn.Linear(8, 1)

    def forward(self, sequence):
        return self.out(self.gru(sequence)[1][0])


CASES = {
    "linear-then-bn": (
        lambda: with_batch_statistics(LinearThenBatchNorm()),
        (torch.randn(2, 8),),
        ["fc.weight", "fc.bias"],
    ),
    "bn-affine": (lambda: with_batch_statistics(LinearThenBatchNorm()), (torch.randn(2, 8),), ["bn.weight", "bn.bias"]),
    "scaled": (ScaledWeight, (torch.randn(2, 8),), ["w"]),
    "used-twice": (WeightUsedTwice, (torch.randn(2, 8),), ["w"]),
    "conv-weight": (ConvFeature, (torch.randn(1, 3, 6, 6),), ["conv.weight"]),
    "gru-weight": (GRUFeature, (torch.randn(1, 5, 8),), ["gru.weight_hh_l0"]),
}
# None: kept patchable and proven; otherwise the error the export must raise. Measured with
# litert-torch 0.10.0, torch.onnx (optimize=False), coremltools 9.0.
EXPECTED = {
    ("linear-then-bn", "tflite"): None,  # the optimization barrier keeps the Linear raw
    ("linear-then-bn", "onnx"): None,
    ("linear-then-bn", "coreml"): None,
    ("bn-affine", "tflite"): AdaptiveTensorFolded,  # BatchNorm's scale is folded with its statistics
    ("bn-affine", "onnx"): None,  # BatchNormalization keeps its scale/bias initializers
    ("bn-affine", "coreml"): None,  # batch_norm keeps gamma/beta consts
    ("scaled", "tflite"): AdaptiveTensorFolded,
    ("scaled", "onnx"): None,  # Mul stays a node with optimize=False
    ("scaled", "coreml"): AdaptiveTensorFolded,
    ("used-twice", "tflite"): AdaptiveTensorDuplicated,
    ("used-twice", "onnx"): None,
    ("used-twice", "coreml"): AdaptiveTensorDuplicated,
    ("conv-weight", "tflite"): AdaptiveTensorTransposed,  # OIHW -> OHWI
    ("conv-weight", "onnx"): None,
    ("conv-weight", "coreml"): None,
    ("gru-weight", "tflite"): None,
    ("gru-weight", "onnx"): None,
    ("gru-weight", "coreml"): AdaptiveTensorFolded,  # split per gate inside the loop
}


@pytest.mark.parametrize("case,target", sorted(EXPECTED))
def test_adaptive_tensor_is_kept_patchable_or_refused_by_name(case, target, tmp_path):
    make, example, adaptive = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    expected = EXPECTED[(case, target)]
    if expected is None:
        artifact = export(model, example, adaptive, target, tmp_path)
        assert weight_maps.load(artifact).extra["proof"]["max_abs_error"] <= PROOF_ATOL
    else:
        with pytest.raises(expected) as err:
            export(model, example, adaptive, target, tmp_path)
        assert adaptive[0] in str(err.value) and "\n" not in str(err.value)
        assert not tmp_path.exists() or not any(tmp_path.iterdir()), "a refused export leaves nothing behind"


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)[:, torch.nonzero(x[0] > 0)[:, 0]]


class Spectrum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.fft.rfft(self.fc(x)).abs()


@pytest.mark.parametrize("target,model_cls", [("tflite", DataDependent), ("onnx", DataDependent), ("coreml", Spectrum)])
def test_unsupported_ops_fail_as_conversion_failed(target, model_cls, tmp_path):
    model = model_cls().eval()
    x = torch.randn(2, 4 if model_cls is DataDependent else 8)
    with pytest.raises(ConversionFailed) as err:
        export(model, (x,), ["fc.weight"], target, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists(), "the output directory this export would have made is gone"


# ---- bad arguments ----------------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(target="tensorrt"), UnknownTarget, "tensorrt"),
        (dict(adaptive=["fc.weight", "head.weight"]), UnknownAdaptiveParameter, "head.weight"),
        (dict(adaptive="fc.weight"), ExportError, "list"),
        (dict(example_inputs=torch.randn(1, 4)), ExportError, "tuple"),
        (dict(example_inputs=(torch.randn(1, 5),)), ExportError, "fails on the example inputs"),
        (dict(target="executorch", options=dict(precision="int8")), ExportError, "tflite, onnx, coreml only"),
        (dict(options=dict(quantize=True)), ExportError, "quantize"),
        (dict(options=dict(output_names=("a", "b"))), ExportError, "output_names"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, error, words, tmp_path):
    args = dict(model=Small().eval(), example_inputs=(torch.randn(1, 4),), adaptive=["fc.weight"], target="onnx")
    args.update({k: v for k, v in kwargs.items() if k != "options"})
    with pytest.raises(error) as err:
        export(
            args["model"],
            args["example_inputs"],
            args["adaptive"],
            args["target"],
            tmp_path / "out",
            **kwargs.get("options", {}),
        )
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_model_in_training_mode_is_refused(tmp_path):
    with pytest.raises(ExportError, match="training mode"):
        export(Small().train(), (torch.randn(1, 4),), ["fc.weight"], "onnx", tmp_path)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_failed_export_leaves_an_earlier_artifact_byte_identical(tmp_path):
    torch.manual_seed(0)
    export(ScaledWeight().eval(), (torch.randn(2, 8),), ["out.weight"], "tflite", tmp_path)
    before = tree_digest(tmp_path)
    with pytest.raises(AdaptiveTensorFolded):
        export(ScaledWeight().eval(), (torch.randn(2, 8),), ["w"], "tflite", tmp_path)
    assert tree_digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.tflite",
        "model.tflite.weightmap.json",
    ]


def test_tflite_outputs_follow_the_subgraph_not_their_names():
    """litert-torch names signature outputs `output_0, output_1, output_10, ...`; their order is the
    subgraph's (PyTorch's), whatever the names, and a signature naming a tensor the subgraph does
    not return is a ConversionFailed, not a traceback."""
    from types import SimpleNamespace

    from exporters.errors import ConversionFailed
    from exporters.tflite import _outputs_in_subgraph_order

    def output(name: str, index: int):
        return SimpleNamespace(name=name.encode(), tensorIndex=index)

    signature = SimpleNamespace(
        subgraphIndex=0, outputs=[output("logits", 7), output("score", 3), output("output_10", 5)]
    )
    model = SimpleNamespace(subgraphs=[SimpleNamespace(outputs=[3, 5, 7])])
    assert [m.name for m in _outputs_in_subgraph_order(model, signature)] == [b"score", b"output_10", b"logits"]
    signature.outputs.append(output("stray", 9))
    with pytest.raises(ConversionFailed, match="stray"):
        _outputs_in_subgraph_order(model, signature)
