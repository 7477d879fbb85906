"""The export-time proof cannot pass vacuously: a weight map that misplaces one tensor's bytes
fails it with `ProofMismatch` naming the tensor; an adaptive tensor that does not reach the output
is refused by name; every proven tensor moved the compiled output; and a Core ML read-back says
it is a read-back, not a proof.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from device_runtime import weight_map as weight_maps
from exporters import export, onnx, pipeline, tflite
from exporters.errors import AdaptiveTensorNoEffect, ExportError, ProofMismatch
from exporters.job import Pass
from exporters.options import PROOF_ATOL
from exporters.proof import RANDOM_INPUT_SETS, input_sets
from exporters.report import summarize


class TwoBranches(nn.Module):
    """Two same-shaped Linear branches: their weights are the same size, so one can be mapped onto the other."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.relu(self.a(x)) + torch.tanh(self.b(x)))


ADAPTIVE = ["a.weight", "a.bias", "b.weight", "b.bias"]


def swap_a_and_b_weights(tensors: list) -> tuple[list, str]:
    """a.weight's entry points at b.weight's bytes and the other way round (no overlap: valid)."""
    by_name = {t.name: t for t in tensors}
    a, b = by_name["a.weight"], by_name["b.weight"]
    swapped = {"a.weight": dataclasses.replace(a, offset=b.offset), "b.weight": dataclasses.replace(b, offset=a.offset)}
    return [swapped.get(t.name, t) for t in tensors], "a.weight"


def shift_a_bias(tensors: list) -> tuple[list, str]:
    """a.bias (32 bytes) moved 32 bytes on, into the alignment padding before the next tensor."""
    return [
        dataclasses.replace(t, offset=t.offset + 32, alignment=32) if t.name == "a.bias" else t for t in tensors
    ], "a.bias"


@pytest.mark.parametrize("corrupt", [swap_a_and_b_weights, shift_a_bias])
@pytest.mark.parametrize("target", ["tflite", "onnx"])
def test_weight_map_with_a_corrupted_offset_fails_the_proof(target, corrupt, tmp_path, monkeypatch):
    module = {"tflite": tflite, "onnx": onnx}[target]
    declared = module.TARGET
    culprit = []

    def corrupt_offsets(job) -> None:
        job.tensors, name = corrupt(job.tensors)
        culprit.append(name)

    def passes(options) -> list:
        return declared.passes(options) + [Pass("corrupt offsets", corrupt_offsets)]

    monkeypatch.setattr(module, "TARGET", dataclasses.replace(declared, passes=passes))
    torch.manual_seed(0)
    with pytest.raises(ProofMismatch) as err:
        export(TwoBranches().eval(), (torch.randn(2, 8),), ADAPTIVE, target, tmp_path)
    assert culprit and culprit[0] in str(err.value) and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir()), "a failed proof leaves nothing behind"


@pytest.mark.parametrize("target", ["tflite", "onnx"])
def test_offset_corrupted_after_the_base_values_are_written_fails_per_tensor(target, tmp_path, monkeypatch):
    """The artifact holds the right static values (the base check passes); only patching a.bias
    through the corrupted weight map shows that its bytes are not the ones the model reads."""

    def corrupt_and_reseal(job) -> None:
        job.tensors, _ = shift_a_bias(job.tensors)
        pipeline.seal(job)

    passes = list(pipeline.COMMON_PASSES)
    at = [p.name for p in passes].index("write base values") + 1
    monkeypatch.setattr(
        pipeline, "COMMON_PASSES", passes[:at] + [Pass("corrupt offsets", corrupt_and_reseal)] + passes[at:]
    )
    torch.manual_seed(0)
    with pytest.raises(ProofMismatch, match=r"with only a\.bias patched differs from PyTorch .* reads for a\.bias$"):
        export(TwoBranches().eval(), (torch.randn(2, 8),), ADAPTIVE, target, tmp_path)


class DeadBranch(nn.Module):
    """`dead` is computed but its contribution is relu(-|.|) = 0: its parameters cannot change the
    output. (Computed from the input, so no converter can fold it away, as it folds `0 * dead(x)`.)"""

    def __init__(self):
        super().__init__()
        self.live = nn.Linear(8, 4)
        self.dead = nn.Linear(8, 4)

    def forward(self, x):
        return self.live(x) + torch.relu(-self.dead(x).abs())


@pytest.mark.parametrize("target", ["tflite", "onnx", "coreml"])
def test_adaptive_tensor_that_does_not_reach_the_output_is_refused_by_name(target, tmp_path):
    torch.manual_seed(0)
    with pytest.raises(AdaptiveTensorNoEffect) as err:
        export(DeadBranch().eval(), (torch.randn(2, 8),), ["live.weight", "dead.weight"], target, tmp_path)
    assert str(err.value).startswith("dead.weight: ") and "\n" not in str(err.value)


class NaNOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return torch.sqrt(-(self.fc(x) ** 2) - 1.0)


def test_model_with_non_finite_outputs_is_refused_not_proven_vacuously(tmp_path):
    """NaN compares false with any tolerance: a proof on NaN outputs would pass whatever was patched."""
    with pytest.raises(ExportError, match=r"NaNOutput.forward\(\) returns NaN or Inf on the example inputs"):
        export(NaNOutput().eval(), (torch.randn(2, 8),), ["fc.weight"], "onnx", tmp_path)


def test_proof_runs_random_input_sets_and_records_each_tensors_effect(tmp_path):
    torch.manual_seed(0)
    artifact = export(TwoBranches().eval(), (torch.randn(2, 8),), ADAPTIVE, "onnx", tmp_path)
    proof = weight_maps.load(artifact).extra["proof"]
    assert proof["method"] == "run" and proof["proven"] is True
    assert proof["input_sets"] == 1 + RANDOM_INPUT_SETS
    assert proof["min_effect"] > PROOF_ATOL >= proof["max_abs_error"]
    assert "NOT PROVEN" not in summarize(artifact).line()


def test_random_input_sets_stay_inside_the_examples_range():
    model = nn.EmbeddingBag(10, 3).eval()
    ids = torch.tensor([[2, 5, 7]])
    sets = input_sets(model, (ids,), seed=0)
    assert len(sets) == 1 + RANDOM_INPUT_SETS and sets[0][0] is ids
    drawn = np.stack([s[0].numpy() for s in sets[1:]])
    assert drawn.dtype == np.int64 and drawn.shape == (RANDOM_INPUT_SETS, 1, 3)
    assert drawn.min() >= 2 and drawn.max() <= 7 and not (drawn == ids.numpy()).all()


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the Core ML copy is run, not read back")
@pytest.mark.parametrize("as_inputs", [False, True], ids=["buffers", "inputs"])
def test_coreml_read_back_is_labelled_not_a_proof(as_inputs, tmp_path):
    torch.manual_seed(0)
    artifact = export(
        TwoBranches().eval(), (torch.randn(2, 8),), ADAPTIVE, "coreml", tmp_path, adaptive_as_inputs=as_inputs
    )
    summary = summarize(artifact)
    proof = summary.to_dict()["proof"]
    assert proof["method"] == "read-back" and proof["proven"] is False and "not a proof" in proof["note"]
    assert ("through the weight map itself" in proof["note"]) is as_inputs
    line = summary.line()
    assert "NOT PROVEN" in line and "read-back, not a proof" in line and "proof max abs error" not in line


class LargeOutputs(TwoBranches):
    """TwoBranches with outputs in the thousands: float32 rounding alone exceeds PROOF_ATOL there."""

    def forward(self, x):
        return 4000.0 * super().forward(x)


def test_the_tolerance_grows_with_the_outputs_magnitude_and_still_catches_a_misplaced_tensor(tmp_path, monkeypatch):
    """The proof accepts atol + rtol * max|PyTorch output| (float32 rounding at that magnitude),
    records it, and a weight map that swaps two tensors still fails: a misplaced patch errs by the
    size of the tensor's effect, not by rounding."""
    torch.manual_seed(0)
    model = LargeOutputs().eval()
    x = torch.randn(16, 8)
    artifact = export(model, (x,), ADAPTIVE, "onnx", tmp_path / "ok")
    proof = weight_maps.load(artifact).extra["proof"]
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert proof["atol"] == PROOF_ATOL and proof["rtol"] > 0
    assert proof["tolerance"] >= PROOF_ATOL + proof["rtol"] * scale  # M covers the random input sets too
    assert proof["max_abs_error"] <= proof["tolerance"]
    declared = onnx.TARGET

    def corrupt_offsets(job) -> None:
        job.tensors, _ = swap_a_and_b_weights(job.tensors)

    monkeypatch.setattr(
        onnx,
        "TARGET",
        dataclasses.replace(declared, passes=lambda o: declared.passes(o) + [Pass("swap", corrupt_offsets)]),
    )
    with pytest.raises(ProofMismatch, match=r"a\.weight"):
        export(model, (x,), ADAPTIVE, "onnx", tmp_path / "bad")
