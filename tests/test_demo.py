"""`mntool demo` end to end on a slice of the real MovieLens-100k (quick settings): the report's
figures come from the compiled, patched models and agree with PyTorch; a re-run reuses the
checkpoints and artifacts; bad output directories are refused without touching them.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from device_runtime import weight_map as wmap
from device_runtime.patch import TrustPolicy, apply_patch_bytes
from device_runtime.runners import open_runner
from device_runtime.signing import load_public_key
from mntool.cli.main import main
from mntool.demo import STAGES, DemoConfig, DemoError, prepare_out_dir, read_stamp, run_demo, write_stamp

pytestmark = pytest.mark.slow
CONFIG = dataclasses.replace(DemoConfig.quick(), users=16, threads=1, bench_runs=30, bench_warmup=5, bench_loads=2)


@pytest.fixture(scope="module")
def demo_run(ml100k_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    first = run_demo(out, quick=True, data_dir=ml100k_dir, progress=False, config=CONFIG)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    second = run_demo(out, quick=True, data_dir=ml100k_dir, progress=False, config=CONFIG)
    return out, first, second, mtimes


def test_report_files_are_written_and_consistent(demo_run):
    out, first, second, _ = demo_run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(second))
    md = (out / "report.md").read_text()
    for section in (
        "## Metrics on the test period",
        "## Parity",
        "## Patches vs artifacts",
        "## Latency, load and swap",
        "## Row form vs candidate form",
    ):
        assert section in md
    for png in ("uauc_per_user.png", "latency.png"):
        assert f"]({png})" in md
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{png} is not a real figure"
    assert [s["stage"] for s in first["stages"]] == list(STAGES)


def test_row_and_candidate_forms_score_the_request_alike(demo_run):
    """The demo's artifacts are in the candidate form; the row form beside them scores the same
    request to float32 rounding (timings are reported, never asserted)."""
    out, result, _, _ = demo_run
    assert set(result["forms"]) == {"tflite", "onnx"}
    for target, f in result["forms"].items():
        assert f["max_abs_difference"] <= 1e-5, target
        assert f["rows_p50_ms"] > 0 and f["candidates_p50_ms"] > 0
    for suffix in (".tflite", ".onnx"):
        form = wmap.load(out / "artifacts" / "metanetwork" / f"model{suffix}").form
        assert form["layout"] == "candidates" and form["per_call"] == 1 and form["candidates"] == 100
        assert wmap.load(out / "artifacts" / "metanetwork-rows" / f"model{suffix}").form["layout"] == "rows"


def test_compiled_patched_models_match_pytorch(demo_run):
    _, result, _, _ = demo_run
    parity = result["parity"]
    for model in ("static", "metanetwork"):
        for target in ("tflite", "onnx"):
            assert parity[model][target] <= 1e-5, (model, target, parity[model][target])
    assert result["coreml"]["exact"] and result["coreml"]["users"] == CONFIG.users
    for model in ("static", "metanetwork"):
        for target in ("tflite", "onnx"):
            for metric, value in result["metrics"][model][target].items():
                assert value == pytest.approx(result["metrics"][model]["pytorch"][metric], abs=1e-4), (
                    model,
                    target,
                    metric,
                )
    assert all(c["ok"] for c in result["checks"] if "match PyTorch" in c["check"] or "Core ML" in c["check"])


def test_sample_and_per_user_figures(demo_run):
    _, result, _, _ = demo_run
    sample, per_user = result["sample"], result["per_user"]
    assert sample["users"] == CONFIG.users and sample["of"] == CONFIG.train_users
    assert sample["candidates"] == 100 and sample["ranking_tasks"] >= CONFIG.users
    assert len(per_user["user"]) == len(set(per_user["user"])) == CONFIG.users
    for key in ("uauc_static", "uauc_metanetwork"):
        values = np.asarray(per_user[key])
        assert values.shape == (CONFIG.users,) and np.all((values >= 0) & (values <= 1))
        # UAUC is the mean of the per-user AUCs: the scatter shows the table's figure
        model = key.removeprefix("uauc_")
        assert values.mean() == pytest.approx(result["metrics"][model]["tflite"]["uauc"], abs=1e-9)


def test_example_patches_are_signed_and_smaller_than_artifacts(demo_run):
    out, result, _, _ = demo_run
    public = load_public_key(out / "keys" / "demo.pub")
    for target, path in result["example_patches"].items():
        artifact = (
            out
            / "artifacts"
            / "metanetwork"
            / {"tflite": "model.tflite", "onnx": "model.onnx", "coreml": "model.mlpackage"}[target]
        )
        wm = wmap.load(artifact)
        patch = open(path, "rb").read()
        assert (
            len(patch) == result["patch_bytes"][target] < result["artifacts"]["metanetwork"][target]["total_bytes"] / 10
        )
        apply_patch_bytes(
            wmap.read_artifact_files(artifact, wm.files), patch, wm, policy=TrustPolicy(verify_key=public)
        )
    for target in ("tflite", "onnx"):
        bench = result["bench"][target]
        assert (
            bench["latency"]["runs"] == CONFIG.bench_runs
            and bench["patches"][0]["patch_bytes"] == result["patch_bytes"][target]
        )


def test_rerun_reuses_checkpoints_and_artifacts(demo_run):
    out, first, second, mtimes = demo_run
    cached = {s["stage"]: s["cached"] for s in second["stages"]}
    assert cached == {
        "data": False,
        "train static": True,
        "train metanetwork": True,
        "export": True,
        "personalise and score": False,
        "benchmark": False,
    }
    assert not any(s["cached"] for s in first["stages"])
    built = {s["stage"]: s["seconds"] for s in first["stages"]}
    for s in second["stages"]:
        if s["cached"]:  # the first run's time building what the second reused: a part of that stage
            assert 0 < s["reused_seconds"] <= built[s["stage"]], s["stage"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes, "a cached checkpoint was rewritten"
    assert second["metrics"] == first["metrics"] and second["parity"] == first["parity"]


@pytest.mark.parametrize("layout, run", [("candidates", "static"), ("rows", "metanetwork")])
@pytest.mark.parametrize("n, k", [(3, 150), (2, 5)])
def test_ranking_score_pads_requests_and_candidates(demo_run, layout, run, n, k):
    """Requests of more candidates than the artifact takes (150 through 100: a padded second call)
    and fewer (5, as pointwise groups are scored), in either form: every logit as PyTorch scores
    it, the padding never leaking into them."""
    import torch

    from device_runtime import ranking
    from mntool.train import load_checkpoint

    out, _, _, _ = demo_run
    ckpt = load_checkpoint(out / "runs" / run)
    artifact = out / "artifacts" / (run if layout == "candidates" else f"{run}-rows") / "model.onnx"
    wm = wmap.load(artifact)
    form = ranking.RankingForm.of(wm)
    assert form.layout == layout and form.candidates == 100
    rng = np.random.default_rng(0)
    history = rng.integers(0, ckpt.n_items + 1, (n, ckpt.protocol["history_len"]))
    candidates = rng.integers(1, ckpt.n_items + 1, (n, k))
    with open_runner(artifact, weight_map=wm) as runner:
        got = ranking.score(runner, form, history, candidates)
    with torch.no_grad():
        want = ckpt.model(torch.from_numpy(history), torch.from_numpy(candidates)).numpy()
    assert got.shape == (n, k)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ---- refusals (no training) ---------------------------------------------------------------------
def test_foreign_nonempty_directory_is_refused_untouched(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine.txt").write_bytes(b"keep me")
    with pytest.raises(DemoError, match="not made by `mntool demo`"):
        prepare_out_dir(tmp_path, fresh=True)
    assert (tmp_path / "runs" / "mine.txt").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_fresh_drops_only_the_demo_caches(tmp_path):
    prepare_out_dir(tmp_path, fresh=False)
    for name in ("runs", "artifacts", "keys", "patches"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    prepare_out_dir(tmp_path, fresh=True)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["keys", "patches"]


def test_stamps_reuse_only_what_was_built_from_the_same_inputs(tmp_path):
    stamp = tmp_path / "demo-key.json"
    assert read_stamp(stamp, "k1", fresh=False) is None
    write_stamp(stamp, "k1", 12.5)
    assert read_stamp(stamp, "k1", fresh=False) == {"key": "k1", "seconds": 12.5}
    assert read_stamp(stamp, "k2", fresh=False) is None
    assert read_stamp(stamp, "k1", fresh=True) is None
    stamp.write_text('{"key": "k1", "seco')  # cut off while writing
    assert read_stamp(stamp, "k1", fresh=False) is None


def test_cli_reports_bad_out_as_one_line(tmp_path, capsys):
    target = tmp_path / "report.txt"
    target.write_bytes(b"not a directory")
    assert main(["demo", "--out", str(target), "--quick"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a file" in err and "Traceback" not in err
    assert target.read_bytes() == b"not a directory"


def test_cli_help_has_an_example(capsys):
    assert main(["demo", "--help"]) == 0
    assert "mntool demo --quick" in capsys.readouterr().out


@pytest.mark.parametrize("field, value", [("users", -1), ("static_epochs", 0), ("bench_runs", 0)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(DemoError, match=field):
        DemoConfig(**{field: value})
