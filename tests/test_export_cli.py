"""`mntool export` on checkpoints written by `mntool.train`: JSON output, artifacts that load and
were proven, weights-as-inputs, and one-line errors for bad input."""

from __future__ import annotations

import json

from test_patch_cli import mntool, one_line_error

from device_runtime import weight_map as weight_maps
from exporters.options import PROOF_ATOL


def test_export_onnx_prints_json_and_writes_a_proven_artifact(tiny_checkpoints, tmp_path):
    result = mntool("export", tiny_checkpoints["static"], "--target", "onnx", "--out", tmp_path, "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    [summary] = json.loads(result.stdout)
    artifact = tmp_path / "model.onnx"
    assert summary["artifact"] == str(artifact) and summary["target"] == "onnx"
    wm = weight_maps.load(artifact)
    assert summary["adaptive_bytes"] == sum(t.nbytes for t in wm.tensors) > 0
    assert 0 < summary["adaptive_fraction"] < 1
    assert summary["proof"]["max_abs_error"] <= PROOF_ATOL and [o.name for o in wm.outputs] == ["logits"]


def test_export_metanetwork_checkpoint_as_inputs(tiny_checkpoints, tmp_path):
    result = mntool(
        "export",
        tiny_checkpoints["metanetwork"],
        "--target",
        "tflite",
        "--adaptive-as-inputs",
        "--batch",
        "4",
        "--out",
        tmp_path,
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tflite: ") and "proof max abs error" in result.stdout
    wm = weight_maps.load(tmp_path / "model.tflite")
    assert wm.mode == "inputs" and wm.inputs[0].shape[0] == 4


def test_export_errors_are_one_line(tiny_checkpoints, tmp_path):
    one_line_error(mntool("export", tmp_path, "--out", tmp_path / "out"), "not an mntool checkpoint")
    one_line_error(
        mntool(
            "export",
            tiny_checkpoints["static"],
            "--target",
            "executorch",
            "--precision",
            "int8",
            "--out",
            tmp_path / "out",
        ),
        "tflite, onnx, coreml only",
    )
    assert not (tmp_path / "out").exists()


def test_export_help_has_an_example():
    result = mntool("export", "--help")
    assert result.returncode == 0 and "mntool export runs/sasrec --target all --out artifacts/" in result.stdout
