"""The weight map as exported: JSON round trip, every malformation rejected on load with a
WeightMapError, and the fingerprint's definition (adaptive bytes excluded, everything else in).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_runtime import weight_map as weight_maps
from device_runtime.weight_map import WeightMap, WeightMapError
from exporters import export


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 16)
        self.score = nn.Linear(16, 3)

    def forward(self, features):
        return self.score(torch.relu(self.hidden(features)))


@pytest.fixture(scope="module")
def tflite_artifact(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("weight-map")
    return export(Head().eval(), (torch.randn(1, 6),), ["score.weight", "score.bias"], "tflite", out)


@pytest.fixture()
def valid(tflite_artifact) -> dict:
    return json.loads(weight_maps.sidecar_path(tflite_artifact).read_text())


def test_json_round_trip(tflite_artifact):
    wm = weight_maps.load(tflite_artifact)
    assert WeightMap.from_json(wm.to_json()) == wm


def mutate(d: dict, path: str, value) -> dict:
    """A copy of `d` with the field at dotted `path` (list indices as numbers) replaced or deleted."""
    d = copy.deepcopy(d)
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = d
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return d


DELETE = object()
MALFORMED = [
    ("format", "something-else", "not a weight map"),
    ("version", 2, "version 2"),
    ("target", "tensorrt", "target"),
    ("mode", "streaming", "mode"),
    ("tensors", [], "no adaptive tensors"),
    ("tensors.0.offset", 3, "alignment"),
    ("tensors.0.nbytes", 5, "does not hold"),
    ("tensors.0.dtype", "int8", "dtype"),
    ("tensors.0.layout", "nhwc", "layout"),
    ("tensors.0.stored_shape", [1, 1], "stored_shape"),
    ("tensors.0.shape", ["3", "16"], "shape"),
    ("tensors.0.file", "other.tflite", "not one of the artifact's files"),
    ("files", ["../model.tflite"], "relative path"),
    ("files", ["/etc/model.tflite"], "relative path"),
    ("fingerprint", "not-hex", "SHA-256"),
    ("inputs", "features", "malformed"),
    ("tensors.0.name", DELETE, "malformed"),
    ("outputs", DELETE, "malformed"),
]


@pytest.mark.parametrize("path,value,words", MALFORMED, ids=[m[0] + ":" + m[2] for m in MALFORMED])
def test_malformed_weight_map_is_rejected(valid, path, value, words):
    with pytest.raises(WeightMapError) as err:
        WeightMap.from_dict(mutate(valid, path, value))
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("field", ["offset", "nbytes", "alignment"])
@pytest.mark.parametrize("convert", [float, lambda v: v + 0.9, lambda v: True], ids=["whole-float", "fraction", "bool"])
def test_byte_fields_must_be_json_integers(valid, field, convert):
    # int() would have read 64.9 as 64 and true as 1 (a bool alignment of 1 even validated)
    bad = convert(valid["tensors"][0][field])
    with pytest.raises(WeightMapError) as err:
        WeightMap.from_dict(mutate(valid, f"tensors.0.{field}", bad))
    assert str(err.value) == f"score.weight: {field} {bad!r} is not an integer"


@pytest.mark.parametrize("path", ["tensors.0.shape", "tensors.0.stored_shape", "inputs.0.shape", "outputs.0.shape"])
@pytest.mark.parametrize("convert", [float, lambda v: True], ids=["whole-float", "bool"])
def test_shapes_must_be_json_integers(valid, path, convert):
    dims = valid
    for key in path.split("."):
        dims = dims[int(key) if key.isdigit() else key]
    with pytest.raises(WeightMapError, match="is not a list of non-negative integers"):
        WeightMap.from_dict(mutate(valid, f"{path}.0", convert(dims[0])))


def test_version_must_be_the_integer_1(valid):
    with pytest.raises(WeightMapError, match="version True is not supported"):
        WeightMap.from_dict(mutate(valid, "version", True))


def test_overlapping_tensors_are_rejected(valid):
    bias = valid["tensors"][1]
    overlapping = mutate(valid, "tensors.1.offset", valid["tensors"][0]["offset"])
    assert bias["name"] == "score.bias"
    with pytest.raises(WeightMapError, match="overlap"):
        WeightMap.from_dict(overlapping)


def test_inputs_mode_needs_an_input_per_tensor(valid):
    with pytest.raises(WeightMapError, match="mode 'inputs'"):
        WeightMap.from_dict(mutate(valid, "mode", "inputs"))


def test_load_checks_sidecar_files_and_fingerprint(tflite_artifact, tmp_path):
    copy_ = tmp_path / tflite_artifact.name
    shutil.copy(tflite_artifact, copy_)
    with pytest.raises(WeightMapError, match="no weight map beside"):
        weight_maps.load(copy_)
    shutil.copy(weight_maps.sidecar_path(tflite_artifact), weight_maps.sidecar_path(copy_))
    wm = weight_maps.load(copy_)
    data = bytearray(copy_.read_bytes())
    data[-1] ^= 0xFF  # the last byte is the embedded weight map, outside every adaptive tensor
    copy_.write_bytes(bytes(data))
    with pytest.raises(WeightMapError, match="changed outside its adaptive tensors"):
        weight_maps.load(copy_)
    copy_.write_bytes(bytes(data[: wm.tensors[-1].offset]))
    with pytest.raises(WeightMapError, match="lie outside"):
        weight_maps.load(copy_)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_fingerprint_ignores_exactly_the_adaptive_bytes(tflite_artifact, position, flip):
    wm = weight_maps.load(tflite_artifact)
    data = bytearray(tflite_artifact.read_bytes())
    index = int(position * len(data))
    data[index] ^= flip
    inside = any(t.offset <= index < t.offset + t.nbytes for t in wm.tensors)
    changed = weight_maps.compute_fingerprint({wm.files[0]: bytes(data)}, wm.tensors, wm.artifact) != wm.fingerprint
    assert changed != inside
