"""Candidate-form ranking artifacts (issue 19): `mntool export` of a recommender writes the
candidate form by default and records it in the weight map; the row form stays available; both
score a request like PyTorch on LiteRT and ONNX Runtime; `mntool bench` reports the latency per
ranking request; a form that does not fit is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_patch_cli import mntool

from device_runtime import ranking
from device_runtime import weight_map as weight_maps
from device_runtime.patch import apply_patch_bytes
from device_runtime.ranking import RankingForm, RankingFormError
from device_runtime.runners import open_runner
from exporters import export
from mntool.patches import build_patch
from mntool.train import load_checkpoint

SUFFIX = {"tflite": ".tflite", "onnx": ".onnx"}


@pytest.fixture(scope="module")
def forms(tiny_checkpoints, tmp_path_factory):
    """The tiny MetaNetwork's device model in both forms on both runnable targets (CLI export)."""
    root = tmp_path_factory.mktemp("forms")
    ckpt = tiny_checkpoints["metanetwork"]
    for target in SUFFIX:
        for layout, extra in (("candidates", []), ("rows", ["--rows"])):
            r = mntool("export", ckpt, "--target", target, "--out", root / layout, "--quiet", *extra)
            assert r.returncode == 0, r.stderr
    return root


def test_default_export_is_the_candidate_form_and_says_so(forms, tiny_checkpoints):
    ckpt = load_checkpoint(tiny_checkpoints["metanetwork"])
    L, C = ckpt.protocol["history_len"], 1 + ckpt.protocol["n_rank_negatives"]
    for suffix in SUFFIX.values():
        wm = weight_maps.load(forms / "candidates" / f"model{suffix}")
        form = RankingForm.of(wm)
        assert form == RankingForm("candidates", 1, C, L, ckpt.n_items)
        assert {s.name: s.shape for s in wm.inputs} == {"history": (1, L), "target": (1, C)}
        assert wm.outputs[0].shape == (1, C)
        rows = weight_maps.load(forms / "rows" / f"model{suffix}")
        assert RankingForm.of(rows) == RankingForm("rows", C, C, L, ckpt.n_items)
        assert {s.name: s.shape for s in rows.inputs} == {"history": (C, L), "target": (C,)}
        # the same adaptive tensors, so one generated parameter set patches either form
        assert [(t.name, t.shape) for t in wm.tensors] == [(t.name, t.shape) for t in rows.tensors]


@pytest.mark.parametrize("target", list(SUFFIX))
def test_both_forms_match_pytorch_and_each_other_before_and_after_a_patch(forms, tiny_checkpoints, target):
    ckpt = load_checkpoint(tiny_checkpoints["metanetwork"])
    rng = np.random.default_rng(1)
    history = rng.integers(0, ckpt.n_items + 1, (7, ckpt.protocol["history_len"]))
    candidates = rng.integers(1, ckpt.n_items + 1, (7, 100))
    with torch.no_grad():
        upload = torch.randint(1, ckpt.n_items + 1, (1, 30), generator=torch.Generator().manual_seed(0))
        generated = {n: p[0].numpy() for n, p in ckpt.meta.adaptive_params(upload).items()}
    got = {}
    for layout in ("candidates", "rows"):
        artifact = forms / layout / f"model{SUFFIX[target]}"
        wm = weight_maps.load(artifact)
        files = weight_maps.read_artifact_files(artifact, wm.files)
        patched = apply_patch_bytes(files, build_patch(wm, generated), wm, check_artifact=False)
        for name, fs in (("static", None), ("patched", patched)):
            with open_runner(artifact, weight_map=wm, files=fs) as runner:
                got[layout, name] = ranking.score(runner, RankingForm.of(wm), history, candidates)
    with torch.no_grad():
        h, c = torch.from_numpy(history), torch.from_numpy(candidates)
        want = {
            "static": ckpt.model(h, c).numpy(),
            "patched": torch.func.functional_call(
                ckpt.model, {n: torch.from_numpy(v) for n, v in generated.items()}, (h, c)
            ).numpy(),
        }
    for (layout, name), scores in got.items():
        tol = 1e-5 + 1e-6 * np.abs(want[name]).max()
        assert np.abs(scores - want[name]).max() <= tol, (layout, name)
    assert np.abs(got["candidates", "patched"] - got["rows", "patched"]).max() <= 1e-5
    assert np.abs(got["candidates", "patched"] - got["candidates", "static"]).max() > 1e-3, "the patch changed nothing"


def test_time_requests_reports_per_request_latency_of_both_forms(forms):
    artifacts = {layout: forms / layout / "model.onnx" for layout in ("rows", "candidates")}
    runners = {}
    for name, a in artifacts.items():
        wm = weight_maps.load(a)
        runners[name] = (open_runner(a, weight_map=wm), RankingForm.of(wm))
    form = runners["rows"][1]
    rng = np.random.default_rng(0)
    try:
        timed = ranking.time_requests(
            runners,
            rng.integers(1, form.n_items + 1, form.history_len),
            rng.integers(1, form.n_items + 1, form.candidates),
            runs=20,
            warmup=2,
            rounds=2,
        )
    finally:
        for r, _ in runners.values():
            r.close()
    assert timed["max_abs_difference"] <= 1e-5
    for name in artifacts:
        assert timed["forms"][name]["latency"].runs == 20 and timed["forms"][name]["latency"].p50_ms > 0


def test_bench_reports_latency_per_ranking_request(forms):
    r = mntool("bench", forms / "candidates" / "model.tflite", "--runs", "20", "--loads", "1", "--json")
    assert r.returncode == 0, r.stderr
    [report] = json.loads(r.stdout)
    assert report["ranking"]["form"]["layout"] == "candidates" and report["ranking"]["calls_per_request"] == 1
    assert report["ranking"]["p50_ms"] == pytest.approx(report["latency"]["p50_ms"])
    # generated inputs are valid item ids of the model (the form carries the vocabulary)
    n_items = report["ranking"]["form"]["n_items"]
    assert n_items > 2 and {i["source"] for i in report["inputs"]} == {f"generated (ids < {n_items + 1})"}
    r = mntool("bench", forms / "rows" / "model.onnx", "--runs", "20", "--loads", "1")
    assert r.returncode == 0, r.stderr
    assert "per ranking request of 100 candidates (row form, 100 rows per call" in r.stdout


def test_form_refusals(forms):
    form = RankingForm.of(weight_maps.load(forms / "candidates" / "model.onnx"))
    with open_runner(forms / "candidates" / "model.onnx") as runner:
        with pytest.raises(RankingFormError, match="reads"):
            ranking.score(runner, form, np.ones((2, form.history_len + 1), np.int64), np.ones((2, 5), np.int64))
    with pytest.raises(RankingFormError, match="layout"):
        RankingForm.from_dict(
            {"kind": "ranking", "layout": "columns", "per_call": 1, "candidates": 9, "history_len": 3, "n_items": 9}
        )
    with pytest.raises(RankingFormError, match="per_call"):
        RankingForm.from_dict(
            {"kind": "ranking", "layout": "rows", "per_call": 0, "candidates": 9, "history_len": 3, "n_items": 9}
        )


def test_python_export_api_takes_a_form(tiny_checkpoints, tmp_path):
    """`exporters.export(..., form=...)` copies the caller's form into the weight map and never reads it."""
    ckpt = load_checkpoint(tiny_checkpoints["static"])
    example, form = ckpt.export_inputs(batch=2, candidates=7)
    assert example[0].shape == (2, ckpt.protocol["history_len"]) and example[1].shape == (2, 7)
    artifact = export(ckpt.model, example, ckpt.adaptive, "onnx", tmp_path, form=form, output_names=("logits",))
    assert (
        weight_maps.load(artifact).form
        == form
        == RankingForm("candidates", 2, 7, ckpt.protocol["history_len"], ckpt.n_items).to_dict()
    )
