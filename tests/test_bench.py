"""The benchmark on real exported artifacts: structure and sanity of every figure (never their
size), the patch swap, JSON/CSV/PNG from `mntool bench`, profiles in the worker, clean errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from small_artifacts import patch_for

from device_runtime.bench import (
    BenchConfig,
    BenchError,
    BenchReport,
    benchmark,
    benchmark_isolated,
    generate_inputs,
    time_interleaved,
)
from device_runtime.profiles import get_profile
from device_runtime.runners import find_weight_map
from device_runtime.weight_map import IOSpec

QUICK = BenchConfig(runs=60, warmup=5, loads=3, rounds=3)


def _check_stats(stats, runs: int) -> None:
    assert stats.runs == runs
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.min_ms <= stats.mean_ms


def _check_report(report: BenchReport, n_patches: int) -> None:
    _check_stats(report.latency, QUICK.runs)
    assert len(report.samples_ms) == QUICK.runs
    assert min(report.samples_ms) == report.latency.min_ms
    for figure in (report.first_load_ms, report.load_file_ms, report.load_memory_ms, report.first_inference_ms):
        assert figure > 0
    assert report.cold_start_memory_ms >= report.load_memory_ms
    assert 0 < report.timer_overhead_us and report.overhead_ratio == pytest.approx(
        report.timer_overhead_us / 1e3 / report.latency.p50_ms
    )
    assert report.peak_rss_mb >= report.rss_before_load_mb > 0
    assert len(report.patches) == n_patches
    for p in report.patches:
        _check_stats(p.latency, QUICK.runs)
        assert 0 < p.apply_ms and 0 < p.verify_ms < p.swap_ms
        assert p.swap_vs_reference == pytest.approx(p.swap_ms / (report.cold_start_memory_ms + p.verify_ms))
        assert p.p50_ratio == pytest.approx(p.latency.p50_ms / report.latency.p50_ms)
        assert p.swap_vs_cold_start == pytest.approx(p.swap_ms / report.cold_start_memory_ms)
        assert p.outputs_changed, "the patch did not reach the runtime"


def test_benchmark_with_patch_in_process(artifact):
    report = benchmark(artifact, [patch_for(artifact)], config=QUICK)
    _check_report(report, 1)
    assert report.artifact_bytes == sum((artifact.parent / f).stat().st_size for f in find_weight_map(artifact).files)
    assert [i["name"] for i in report.inputs] == ["history", "target"]


def test_isolated_worker_round_trips_the_report(onnx_artifact, onnx_patch):
    progress: list[int] = []
    report = benchmark_isolated(onnx_artifact, [onnx_patch], config=QUICK, progress=progress.append)
    _check_report(report, 1)
    assert sum(progress) == QUICK.work_units(1)
    assert report.runtime == "onnxruntime" and report.host["cpu_count"] >= 1
    assert BenchReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_weights_as_inputs_swap(tflite_inputs_artifact, tflite_inputs_patch):
    _check_report(benchmark(tflite_inputs_artifact, [tflite_inputs_patch], config=QUICK), 1)


def test_profile_sets_threads_and_is_reported(tflite_artifact):
    report = benchmark_isolated(tflite_artifact, config=QUICK, profile=get_profile("little-core"))
    assert report.config["runner"]["threads"] == 1
    assert report.profile["profile"] == "little-core" and len(report.profile["cpus"]) == 1
    assert report.profile["bandwidth_applied"] or report.profile["notes"]


def test_rows_have_one_line_per_variant(tflite_artifact, tflite_patch):
    rows = benchmark(tflite_artifact, [tflite_patch], config=QUICK).rows()
    assert [r["variant"] for r in rows] == ["unpatched", str(tflite_patch)]
    assert rows[0].keys() == rows[1].keys()


def test_given_inputs_are_used(onnx_artifact, tmp_path):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, history=np.ones((1, 6), np.int64), target=np.array([3]))
    report = benchmark(onnx_artifact, inputs=inputs, config=QUICK)
    assert {i["source"] for i in report.inputs} == {str(inputs)}


def test_generated_inputs_follow_the_signature():
    specs = (IOSpec("ids", "ids", "int32", (2, 50)), IOSpec("x", "x", "float16", (3,)), IOSpec("m", "m", "bool", (4,)))
    feeds = generate_inputs(specs, vocab_size=7)
    assert feeds["ids"].dtype == np.int32 and feeds["ids"].shape == (2, 50)
    assert feeds["ids"].min() >= 1 and feeds["ids"].max() < 7
    assert feeds["x"].dtype == np.float16 and feeds["m"].dtype == bool
    assert generate_inputs(specs, vocab_size=None)["ids"].max() < 2


def test_time_interleaved_counts_and_order():
    order: list[str] = []
    samples = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, runs=7, rounds=3)
    assert [len(samples["a"]), len(samples["b"])] == [7, 7]
    assert order == ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2 + ["a"] * 2 + ["b"] * 2


def test_patch_for_another_artifact_is_a_clean_error(tflite_artifact, onnx_patch):
    with pytest.raises(BenchError, match="patch is for a onnx artifact"):
        benchmark_isolated(tflite_artifact, [onnx_patch], config=QUICK)


def test_bad_config_is_refused():
    with pytest.raises(BenchError, match="runs must be >= 1"):
        BenchConfig(runs=0)


# ---- mntool bench ---------------------------------------------------------------------------
def _mntool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mntool.cli.main", *args], capture_output=True, text=True)


SMALL = ["--runs", "40", "--warmup", "5", "--loads", "2"]


def test_cli_json_csv_and_plot(tflite_artifact, tflite_patch, onnx_artifact, tmp_path):
    done = _mntool("bench", str(tflite_artifact), "--patch", str(tflite_patch), "--json", *SMALL)
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    assert report["patches"][0]["outputs_changed"] and len(report["samples_ms"]) == 40

    done = _mntool("bench", str(tflite_artifact), str(onnx_artifact), "--csv", *SMALL)
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [r["runtime"] for r in rows] == ["litert", "onnxruntime"]
    assert all(float(r["p50_ms"]) <= float(r["p99_ms"]) for r in rows)

    png = tmp_path / "latency.png"
    done = _mntool("bench", str(tflite_artifact), "--patch", str(tflite_patch), "--plot", str(png), *SMALL)
    assert done.returncode == 0 and "p50" in done.stdout and f"wrote {png}" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--json", "--csv"], "--json and --csv are exclusive"),
        (["--device", "adb:X"], "--device needs --benchmark-binary"),
    ],
)
def test_cli_errors_are_one_line(tflite_artifact, extra, message):
    done = _mntool("bench", str(tflite_artifact), *SMALL, *extra)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {message}")


def test_cli_unknown_profile_lists_the_choices(tflite_artifact):
    done = _mntool("bench", str(tflite_artifact), "--profile", "pixel")
    assert done.returncode != 0 and "Traceback" not in done.stderr and "little-core" in done.stderr


def test_cli_patch_needs_one_artifact(tflite_artifact, onnx_artifact, tflite_patch):
    done = _mntool("bench", str(tflite_artifact), str(onnx_artifact), "--patch", str(tflite_patch), *SMALL)
    assert done.returncode != 0 and "--patch needs exactly one ARTIFACT" in done.stderr


def test_cli_patch_without_weight_map(tflite_artifact, tflite_patch, tmp_path):
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(Path(tflite_artifact).read_bytes())
    done = _mntool("bench", str(bare), "--patch", str(tflite_patch), *SMALL)
    assert done.returncode != 0 and "patches need the artifact's weight map" in done.stderr


def test_a_patch_bound_to_a_device_needs_that_device_id(tflite_artifact, tmp_path):
    from dataclasses import replace

    from small_artifacts import fresh_params

    from device_runtime.errors import MntoolError
    from mntool.patches import build_patch

    bound = tmp_path / "bound.mnpatch"
    bound.write_bytes(build_patch(tflite_artifact, fresh_params(tflite_artifact), device_id="phone-1"))
    with pytest.raises(MntoolError, match="bound to one device"):
        benchmark(tflite_artifact, [bound], config=QUICK)
    report = benchmark(tflite_artifact, [bound], config=replace(QUICK, device_id="phone-1"))
    assert report.patches[0].outputs_changed
