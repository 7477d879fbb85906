"""Runners on real exported artifacts (a small SASRec through `exporters.export`): names from the
weight map, outputs equal to PyTorch's, lossless casts only, loading from path / memory / bytes,
patched parameters reaching the runtime, weights-as-inputs binding, and `mntool run`.

The artifacts and patches are session fixtures from conftest.py (built by small_artifacts.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from small_artifacts import HISTORY, N_ITEMS, fresh_params, patch_for, small_sasrec

from device_runtime import weight_map as weight_maps
from device_runtime.patch import apply_patch_bytes
from device_runtime.runners import (
    RunnerConfig,
    RunnerError,
    cast_lossless,
    find_weight_map,
    load_inputs,
    open_runner,
    run_artifact,
    runtime_for,
)


def _feeds() -> dict[str, np.ndarray]:
    _, (history, target) = small_sasrec()
    return {"history": history.numpy(), "target": target.numpy()}


def _torch_output(params: dict[str, np.ndarray] | None = None) -> np.ndarray:
    model, example = small_sasrec()
    with torch.no_grad():
        if params is None:
            return model(*example).numpy()
        tensors = {name: torch.from_numpy(value) for name, value in params.items()}
        return torch.func.functional_call(model, tensors, example).numpy()


# ---- names, outputs, casts ------------------------------------------------------------------
def test_inputs_and_outputs_carry_forward_names(artifact):
    wm = find_weight_map(artifact)
    with open_runner(artifact, weight_map=wm) as runner:
        assert [s.name for s in runner.inputs] == ["history", "target"]
        assert [s.name for s in runner.outputs] == [s.name for s in wm.outputs]
        assert runner.runtime == runtime_for(artifact)


def test_outputs_equal_pytorch(artifact):
    outputs = run_artifact(artifact, _feeds())
    (value,) = outputs.values()
    np.testing.assert_allclose(value, _torch_output(), atol=1e-5)


def test_int64_ids_are_cast_losslessly_to_int32(tflite_artifact):
    with open_runner(tflite_artifact, weight_map=find_weight_map(tflite_artifact)) as runner:
        assert runner.inputs[0].dtype == "int32"
        feeds = _feeds()
        assert feeds["history"].dtype == np.int64
        runner.run(feeds)
        feeds["history"] = feeds["history"] + 2**40
        with pytest.raises(RunnerError, match="int64 to int32 would change values"):
            runner.run(feeds)


@pytest.mark.parametrize(
    "value, dtype, ok",
    [
        (np.array([1.0, 2.0]), "int32", True),
        (np.array([1.5]), "int64", False),
        (np.array([2**24 + 1]), "float32", False),
        (np.array([0.1]), "float32", False),
        (np.array([np.nan]), "float32", True),
        (np.array([3], np.int32), "int64", True),
    ],
)
def test_cast_lossless(value, dtype, ok):
    if ok:
        assert cast_lossless("x", value, dtype).dtype == np.dtype(dtype)
    else:
        with pytest.raises(RunnerError, match="would change values"):
            cast_lossless("x", value, dtype)


def test_wrong_names_and_shapes_are_refused(artifact):
    with open_runner(artifact, weight_map=find_weight_map(artifact)) as runner:
        feeds = _feeds()
        with pytest.raises(RunnerError, match=r"missing \['target'\], unknown \['item'\]"):
            runner.run({"history": feeds["history"], "item": feeds["target"]})
        with pytest.raises(RunnerError, match="shape"):
            runner.run({**feeds, "history": feeds["history"][:, :-1]})


def test_ids_outside_the_vocabulary_are_a_clean_error(artifact):
    feeds = {**_feeds(), "target": np.array([N_ITEMS + 1000])}
    with pytest.raises(RunnerError, match="rejected the inputs|failed to run"):
        run_artifact(artifact, feeds)


# ---- configurations and loading routes ------------------------------------------------------
@pytest.mark.parametrize(
    "config", [RunnerConfig(threads=2), RunnerConfig(xnnpack=False), RunnerConfig(graph_optimization="disable")]
)
def test_configurations_compute_the_same(artifact, config):
    (value,) = run_artifact(artifact, _feeds(), config=config).values()
    np.testing.assert_allclose(value, _torch_output(), atol=1e-5)


def test_bad_configuration_is_refused():
    with pytest.raises(RunnerError, match="threads"):
        RunnerConfig(threads=0)
    with pytest.raises(RunnerError, match="graph optimisation"):
        RunnerConfig(graph_optimization="max")


def test_memory_and_bytes_loads_equal_the_file_load(artifact):
    wm = find_weight_map(artifact)
    files = weight_maps.read_artifact_files(artifact, wm.files)
    with (
        open_runner(artifact, weight_map=wm) as from_file,
        open_runner(artifact, weight_map=wm, files=files) as from_memory,
    ):
        expected = from_file.run(_feeds())
        assert from_memory.run(_feeds()).keys() == expected.keys()
        for name, value in from_memory.run(_feeds()).items():
            np.testing.assert_array_equal(value, expected[name])
    if artifact.suffix == ".tflite":  # a single-file artifact also loads from its bare bytes
        with open_runner(files[artifact.name], runtime="litert", weight_map=wm) as from_bytes:
            np.testing.assert_array_equal(from_bytes.run(_feeds())["output"], expected["output"])


def test_patched_in_memory_computes_pytorch_with_the_new_parameters(artifact):
    wm = find_weight_map(artifact)
    patch = patch_for(artifact)
    files = apply_patch_bytes(weight_maps.read_artifact_files(artifact, wm.files), patch.read_bytes(), wm)
    with open_runner(artifact, weight_map=wm, files=files) as runner:
        (value,) = runner.run(_feeds()).values()
    expected = _torch_output(fresh_params(artifact))
    np.testing.assert_allclose(value, expected, atol=1e-5)
    assert not np.allclose(expected, _torch_output()), "the fresh parameters must change the output"


def test_weights_as_inputs_are_bound_from_the_artifact(tflite_inputs_artifact, tflite_inputs_patch):
    wm = find_weight_map(tflite_inputs_artifact)
    assert wm.mode == "inputs"
    with open_runner(tflite_inputs_artifact, weight_map=wm) as runner:
        assert [s.name for s in runner.free_inputs] == ["history", "target"]
        assert sorted(runner.bound) == sorted(wm.adaptive_names)
        (value,) = runner.run(_feeds()).values()
    np.testing.assert_allclose(value, _torch_output(), atol=1e-5)
    patched = apply_patch_bytes(
        weight_maps.read_artifact_files(tflite_inputs_artifact, wm.files), tflite_inputs_patch.read_bytes(), wm
    )
    with open_runner(tflite_inputs_artifact, weight_map=wm, files=patched) as runner:
        (value,) = runner.run(_feeds()).values()
    np.testing.assert_allclose(value, _torch_output(fresh_params(tflite_inputs_artifact)), atol=1e-5)


def test_runtime_errors_name_the_cause(tmp_path, tflite_artifact):
    with pytest.raises(RunnerError, match="does not exist"):
        open_runner(tmp_path / "missing.tflite")
    with pytest.raises(RunnerError, match="cannot tell the runtime"):
        runtime_for(tmp_path / "model.pt")
    with pytest.raises(RunnerError, match="needs its runtime"):
        open_runner(tflite_artifact.read_bytes())
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(tflite_artifact.read_bytes()[:1000])
    with pytest.raises(RunnerError, match="LiteRT cannot load"):
        open_runner(corrupt)


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS; this checks the Linux refusal")
def test_coreml_prediction_needs_macos(tmp_path):
    package = tmp_path / "model.mlpackage"
    package.mkdir()
    with pytest.raises(RunnerError, match="Core ML prediction needs macOS"):
        open_runner(package)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("in.csv", "1,2", "must be .npz or .json"),
        ("in.json", "[1, 2]", "JSON object"),
        ("in.json", "{", "not valid JSON"),
        ("in.json", '{"history": [[1, 2], [3]]}', "not a rectangular array"),
        ("in.npz", "not a zip", "not a readable .npz"),
    ],
)
def test_bad_input_files(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(RunnerError, match=match):
        load_inputs(path)


# ---- mntool run -----------------------------------------------------------------------------
def _mntool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mntool.cli.main", *args], capture_output=True, text=True)


def test_cli_run_json_and_npz(artifact, tmp_path):
    inputs = tmp_path / "in.json"
    inputs.write_text(json.dumps({k: v.tolist() for k, v in _feeds().items()}))
    done = _mntool("run", str(artifact), "--inputs", str(inputs), "--json")
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(json.loads(done.stdout)["output"], _torch_output(), atol=1e-5)
    out = tmp_path / "out.npz"
    done = _mntool("run", str(artifact), "--inputs", str(inputs), "-o", str(out))
    assert done.returncode == 0 and "wrote" in done.stdout
    with np.load(out) as npz:
        assert npz.files == ["output"]


def test_cli_run_bad_inputs_is_one_line(artifact, tmp_path):
    inputs = tmp_path / "in.json"
    inputs.write_text(json.dumps({"history": [[0.5] * HISTORY], "target": [1]}))
    done = _mntool("run", str(artifact), "--inputs", str(inputs))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: input 'history': casting float64")
    assert "Traceback" not in done.stderr
