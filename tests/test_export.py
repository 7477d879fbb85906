"""Exporters on real converters and runtimes: every backbone x target exports and passes the proof
on a MovieLens-100k history; each target's layout claims hold (TFLite tail region, ONNX adaptive
external data, Core ML blobs); weights-as-inputs mode; a non-recommendation Conv+BatchNorm model.

Artifacts are exported once per session and shared (`exported`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from device_runtime import weight_map as weight_maps
from device_runtime.layout import ALIGNMENT, stored_values
from exporters import export
from exporters.options import PROOF_ATOL

BACKBONES = ("gru4rec", "sasrec", "din")
TARGETS = ("tflite", "onnx", "coreml")


# ---- shared artifacts -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ml100k_example(ml100k_dataset):
    """(history, target) of one real test-period row of MovieLens-100k, and the item count."""
    row = int(np.flatnonzero((ml100k_dataset.test.history > 0).sum(1) >= 20)[0])
    history = torch.from_numpy(ml100k_dataset.test.history[row : row + 1].astype(np.int64))
    target = torch.from_numpy(ml100k_dataset.test.target[row : row + 1].astype(np.int64))
    return (history, target), ml100k_dataset.n_items


@pytest.fixture(scope="session")
def exported(ml100k_example, tmp_path_factory):
    """exported(backbone, target, **options) -> (artifact, model): exported once per session."""
    from mntool.models import build_model

    (history, target), n_items = ml100k_example
    cache: dict = {}

    def get(backbone: str, target_name: str, **options):
        key = (backbone, target_name, tuple(sorted(options.items())))
        if key not in cache:
            torch.manual_seed(0)
            model = build_model(backbone, n_items).eval()
            out = tmp_path_factory.mktemp(f"{backbone}-{target_name}")
            artifact = export(
                model, (history, target), model.adaptive_names(), target_name, out, output_names=("logits",), **options
            )
            cache[key] = (artifact, model)
        return cache[key]

    return get


def embedded_weight_map(artifact: Path) -> dict:
    from exporters import coreml, onnx, tflite

    if artifact.suffix == ".mlpackage":
        return json.loads(coreml.embedded(artifact))
    module = tflite if artifact.suffix == ".tflite" else onnx
    return json.loads(module.embedded(artifact.read_bytes()))


# ---- every backbone on every target -----------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_exports_and_passes_the_proof(exported, backbone, target):
    artifact, model = exported(backbone, target)
    wm = weight_maps.load(artifact)  # validates, checks every file and the fingerprint
    proof = wm.extra["proof"]
    assert proof["max_abs_error"] <= PROOF_ATOL and proof["base_max_abs_error"] <= PROOF_ATOL
    assert proof["method"] == ("read-back" if target == "coreml" and sys.platform != "darwin" else "run")
    assert proof["proven"] is (proof["method"] == "run")
    if proof["proven"]:  # every adaptive tensor, patched alone, moved the compiled output
        assert proof["min_effect"] > PROOF_ATOL
    assert wm.target == target and wm.mode == "buffers"
    assert [i.name for i in wm.inputs] == ["history", "target"] and [o.name for o in wm.outputs] == ["logits"]
    params = dict(model.named_parameters())
    assert [(t.name, t.shape) for t in wm.tensors] == [(n, tuple(params[n].shape)) for n in model.adaptive_names()]
    assert len({t.file for t in wm.tensors}) == 1, "one file per artifact holds every adaptive tensor"
    assert all(t.offset % ALIGNMENT == 0 and t.alignment == ALIGNMENT for t in wm.tensors)


@pytest.mark.parametrize("target", TARGETS)
def test_artifact_holds_the_static_values_where_the_weight_map_says(exported, target):
    artifact, model = exported("sasrec", target)
    wm = weight_maps.load(artifact)
    stored = stored_values(wm, weight_maps.read_artifact_files(artifact, wm.files))
    params = dict(model.named_parameters())
    for name, value in stored.items():
        np.testing.assert_array_equal(value, params[name].detach().numpy())


@pytest.mark.parametrize("target", TARGETS)
def test_embedded_weight_map_is_the_sidecar_without_fingerprint(exported, target):
    artifact, _ = exported("sasrec", target)
    sidecar = json.loads(weight_maps.sidecar_path(artifact).read_text())
    embedded = embedded_weight_map(artifact)
    assert "fingerprint" not in embedded
    expected = {k: v for k, v in sidecar.items() if k != "fingerprint"}
    expected["extra"] = {k: v for k, v in sidecar["extra"].items() if k != "proof"}
    assert embedded == expected


# ---- target-specific layout claims ------------------------------------------------------------
def test_tflite_adaptive_buffers_form_one_tail_region_both_runtimes_load(exported):
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.interpreter import Interpreter

    artifact, _ = exported("sasrec", "tflite")
    wm = weight_maps.load(artifact)
    start, end = wm.extra["tflite"]["adaptive_region"]
    spans = sorted((t.offset, t.offset + t.nbytes) for t in wm.tensors)
    assert spans[0][0] == start and spans[-1][1] == end
    assert all(b0 - a1 < ALIGNMENT for (_, a1), (b0, _) in zip(spans, spans[1:])), (
        "tensors are packed, gaps are alignment only"
    )
    data = artifact.read_bytes()
    packed = schema.Model.GetRootAs(bytearray(data), 0)
    external = sorted(
        (packed.Buffers(i).Offset(), packed.Buffers(i).Size())
        for i in range(packed.BuffersLength())
        if packed.Buffers(i).Offset() > 1
    )
    assert [(o, o + n) for o, n in external if o < end] == spans, "the schema's buffers point at exactly these bytes"
    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    compiled = CompiledModel.from_file(str(artifact))
    assert compiled.get_signature_list()


def test_onnx_only_adaptive_initializers_are_external(exported):
    import onnx

    artifact, _ = exported("sasrec", "onnx")
    wm = weight_maps.load(artifact)
    proto = onnx.load(str(artifact), load_external_data=False)
    external = {i.name for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {t.name for t in wm.tensors}
    assert set(wm.files) == {"model.onnx", "model.onnx.adaptive.bin"}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), "no ORT-optimised (contrib) ops shipped"


def test_coreml_float16_stores_fp16_blobs_and_reads_back(exported):
    artifact, model = exported("sasrec", "coreml", precision="float16")
    wm = weight_maps.load(artifact)
    assert {t.dtype for t in wm.tensors} == {"float16"}
    assert all(t.nbytes == 2 * t.numel for t in wm.tensors)
    proof = wm.extra["proof"]
    assert 0 < proof["max_abs_error"] < 1e-2, "fp16 rounding, nothing worse"


class TinyBias(nn.Module):
    """A head whose last Linear has a 1-element bias: Core ML would store it inline (< 10 elements)."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(12, 16)
        self.score = nn.Linear(16, 1)

    def forward(self, features):
        return self.score(torch.relu(self.hidden(features))).squeeze(-1)


def test_coreml_tiny_adaptive_tensor_is_moved_out_of_the_protobuf(tmp_path):
    from exporters import coreml

    torch.manual_seed(0)
    model = TinyBias().eval()
    artifact = export(model, (torch.randn(3, 12),), ["score.weight", "score.bias"], "coreml", tmp_path)
    wm = weight_maps.load(artifact)
    bias = wm.tensor("score.bias")
    assert bias.file == coreml.WEIGHT_FILE and bias.nbytes == 4
    spec = coreml._load_spec(artifact)
    const = next(
        op
        for op in coreml._operations(spec)
        if op.type == "const" and op.outputs[0].name == wm.extra["coreml"]["consts"]["score.bias"]
    )
    assert const.attributes["val"].HasField("blobFileValue")
    assert wm.extra["proof"]["max_abs_error"] == 0.0


# ---- weights as inputs ------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_adaptive_as_inputs_records_inputs_and_a_flat_values_file(exported, target):
    artifact, model = exported("sasrec", target, adaptive_as_inputs=True)
    wm = weight_maps.load(artifact)
    assert wm.mode == "inputs"
    names = model.adaptive_names()
    assert [i.name for i in wm.inputs] == ["history", "target", *names]
    assert len({t.file for t in wm.tensors}) == 1 and wm.tensors[0].file.endswith("adaptive.bin")
    assert wm.extra["proof"]["max_abs_error"] <= PROOF_ATOL
    stored = stored_values(wm, weight_maps.read_artifact_files(artifact, wm.files))
    params = dict(model.named_parameters())
    for name in names:
        np.testing.assert_array_equal(stored[name], params[name].detach().numpy())


# ---- a model that is not ours ------------------------------------------------------------------
class ConvBNClassifier(nn.Module):
    """An image classifier: Conv + BatchNorm body (static), adaptive two-layer Linear head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, image):
        return self.head(self.body(image))


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so folding them changes values."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


@pytest.mark.parametrize("target", TARGETS)
def test_conv_batchnorm_model_with_adaptive_head_exports(target, tmp_path):
    torch.manual_seed(0)
    model = with_batch_statistics(ConvBNClassifier())
    adaptive = ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]
    artifact = export(model, (torch.randn(2, 3, 16, 16),), adaptive, target, tmp_path, output_names=("class_logits",))
    wm = weight_maps.load(artifact)
    assert wm.adaptive_names == adaptive
    assert [i.name for i in wm.inputs] == ["image"] and wm.outputs[0].shape == (2, 10)
    assert wm.extra["proof"]["max_abs_error"] <= PROOF_ATOL


# ---- cheap import ------------------------------------------------------------------------------
def test_importing_exporters_loads_no_torch_or_converter():
    code = (
        "import sys, exporters; from exporters import export; "
        "heavy = [m for m in ('torch', 'litert_torch', 'onnx', 'coremltools') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
