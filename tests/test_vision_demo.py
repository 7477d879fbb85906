"""`mntool demo --task mnist` end to end, shrunk (6 devices, one epoch each, short benchmarks): the
report's structure, the compiled models' accuracy is PyTorch's, a re-run reuses the checkpoints and
artifacts, and the CLI keeps the recommender as its default.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_runtime import weight_map as wmap
from device_runtime.patch import TrustPolicy, apply_patch_bytes
from device_runtime.runners import open_runner
from device_runtime.signing import load_public_key
from mntool.cli.main import main
from mntool.demo import MARKER, DemoError
from mntool.vision.demo import METHODS, STAGES, VisionDemoConfig, check_out_dir, run_demo, score_compiled

pytestmark = pytest.mark.slow
CONFIG = VisionDemoConfig.quick(devices=6, threads=1, bench_runs=30, bench_warmup=5, bench_loads=2)
RUN_TARGETS = ("tflite", "onnx")


@pytest.fixture(scope="module")
def demo_run(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vision-demo") / "out"
    first = run_demo(out, quick=True, data_dir=mnist_dir, progress=False, config=CONFIG)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    second = run_demo(out, quick=True, data_dir=mnist_dir, progress=False, config=CONFIG)
    return out, first, second, mtimes


def test_report_files_are_written_and_consistent(demo_run):
    out, first, second, _ = demo_run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(second))
    assert second["task"] == "mnist" and second["data"]["protocol_version"] == "img-v1"
    md = (out / "report.md").read_text()
    for section in (
        "## At a glance",
        "## Accuracy on the test period",
        "## Parity",
        "## Patches vs artifacts",
        "## Latency, load and swap",
        "## Stages",
    ):
        assert section in md
    for png in ("accuracy_per_device.png", "latency.png"):
        assert f"]({png})" in md
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{png} is not a real figure"
    assert [s["stage"] for s in first["stages"]] == list(STAGES)
    assert [c["check"] for c in first["checks"]] == [c["check"] for c in second["checks"]]


def test_compiled_accuracy_is_pytorch_accuracy(demo_run):
    _, result, _, _ = demo_run
    assert result["sample"]["devices"] == CONFIG.devices
    for method in METHODS:
        want = result["metrics"][method]["pytorch"]
        for target in RUN_TARGETS:
            assert result["parity"][method][target] <= 1e-5, (method, target)
            assert result["prediction_mismatches"][method][target] == 0, (method, target)
            got = result["metrics"][method][target]
            for metric in ("device_mean_accuracy", "accuracy", "macro_f1"):  # from the predictions: equal
                assert got[metric] == want[metric], (method, target, metric)
            for metric in ("nll", "ece"):  # from the probabilities: within the logits' parity
                assert got[metric] == pytest.approx(want[metric], abs=1e-4), (method, target, metric)
    assert result["coreml"]["exact"] and result["coreml"]["devices"] == CONFIG.devices
    passed = {c["check"]: c["ok"] for c in result["checks"]}
    assert all(ok for check, ok in passed.items() if "match PyTorch" in check or "Core ML" in check)
    assert all(ok for check, ok in passed.items() if "predict what PyTorch predicts" in check)


def test_per_device_figures_add_up_to_the_table(demo_run):
    _, result, _, _ = demo_run
    per_device = result["per_device"]
    assert per_device["device"] == list(range(CONFIG.devices))
    for method in METHODS:
        values = np.asarray(per_device[f"accuracy_{method}"])
        assert values.shape == (CONFIG.devices,) and np.all((values >= 0) & (values <= 1))
        assert values.mean() == pytest.approx(result["metrics"][method]["tflite"]["device_mean_accuracy"], abs=1e-12)
    assert per_device["accuracy_metanetwork"] == per_device["accuracy_metanetwork_pytorch"]
    for method in ("bn-adapt", "metanetwork"):
        assert result["personalise"]["generate_ms_per_device"][method] > 0


def test_example_patches_are_signed_and_apply(demo_run):
    out, result, _, _ = demo_run
    public = load_public_key(out / "keys" / "demo.pub")
    artifacts = out / "artifacts" / CONFIG.model / "metanetwork"
    for target, path in result["example_patches"].items():
        artifact = artifacts / {"tflite": "model.tflite", "onnx": "model.onnx", "coreml": "model.mlpackage"}[target]
        wm = wmap.load(artifact)
        patch = open(path, "rb").read()
        assert len(patch) == result["patch_bytes"][target] < result["artifacts"]["metanetwork"][target]["total_bytes"]
        apply_patch_bytes(
            wmap.read_artifact_files(artifact, wm.files), patch, wm, policy=TrustPolicy(verify_key=public)
        )
    for target in RUN_TARGETS:
        bench = result["bench"][target]
        assert bench["latency"]["runs"] == CONFIG.bench_runs
        assert bench["inputs"][0]["name"] == "images" and bench["inputs"][0]["shape"] == [CONFIG.batch, 1, 28, 28]
        assert bench["patches"][0]["patch_bytes"] == result["patch_bytes"][target]


def test_rerun_reuses_checkpoints_and_artifacts(demo_run):
    _, first, second, mtimes = demo_run
    cached = {s["stage"]: s["cached"] for s in second["stages"]}
    assert cached == {
        "data": False,
        "train static": True,
        "train bn-adapt": True,
        "train metanetwork": True,
        "export": True,
        "personalise and score": False,
        "benchmark": False,
    }
    assert not any(s["cached"] for s in first["stages"])
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes, "a cached checkpoint was rewritten"
    assert second["metrics"] == first["metrics"] and second["parity"] == first["parity"]


def test_score_compiled_pads_the_last_chunk(demo_run, mnist_dir, tmp_path):
    """10 images through a batch-4 artifact: the padded last chunk must score its 2 images as
    PyTorch does, and the padding must not leak into them."""
    from exporters import export
    from mntool.data.images import ImageProtocolConfig, load_image_dataset
    from mntool.train import load_checkpoint
    from mntool.vision.train import score_images

    out, _, _, _ = demo_run
    ck = load_checkpoint(out / "runs" / CONFIG.model / "static")
    artifact = export(ck.model, ck.example_inputs(4), ck.adaptive, "onnx", tmp_path, output_names=("logits",))
    images = load_image_dataset(mnist_dir, ImageProtocolConfig(**ck.protocol)).test.images[:10]
    with open_runner(artifact, weight_map=wmap.load(artifact)) as runner:
        got = score_compiled(runner, images, 4)
    want = score_images(ck.model, images, np.zeros(10, np.int64), None)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ---- refusals and the CLI (no training) ---------------------------------------------------------
def test_a_recommender_demo_directory_is_refused(tmp_path):
    (tmp_path / MARKER).touch()
    (tmp_path / "report.json").write_text(json.dumps({"format": 1, "metrics": {}}))  # the recommender's: no task
    with pytest.raises(DemoError, match="holds a --task movielens demo"):
        check_out_dir(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"task": "mnist"}))
    check_out_dir(tmp_path)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--task", "mnist", "--users", "3"], "--users is for --task movielens"),
        (["--model", "lenet"], "are for --task mnist"),
        (["--task", "mnist", "--devices", "1"], "--devices"),
        (["--task", "mnist", "--model", "resnet"], "--model"),
    ],
)
def test_cli_refuses_options_of_the_other_task(args, match, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), *args]) in (1, 2)
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_help_shows_the_task_and_keeps_the_recommender_default(capsys):
    assert main(["demo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "mntool demo --task mnist" in text and "[default: movielens]" in text


@pytest.mark.parametrize("field, value", [("devices", 1), ("static_epochs", 0), ("batch", 0), ("model", "resnet")])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(DemoError, match=field if field != "model" else "unknown model"):
        VisionDemoConfig(**{field: value})
