"""The Android path: benchmark_model's output parsed from real logs of that tool (quoted with their
sources), the device spec, the missing-adb error, the command lines run through a stand-in adb
whose "phone" is a local shell, and the end-to-end run when a phone is attached."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from device_runtime import adb as adb_module
from device_runtime.adb import (
    AdbError,
    DeviceBenchConfig,
    adb_executable,
    attached_devices,
    benchmark_on_device,
    parse_benchmark_model_output,
    parse_device,
)

# Source: https://gist.github.com/Rexhaif/a73d899a8ae837f9a3b4cbdd5653d71d
# (`adb shell taskset f0 /data/local/tmp/benchmark_model --graph=.../albert_base.tflite --num_threads=1`)
ALBERT_ANDROID = """\
STARTING!
Log parameter values verbosely: [0]
Num threads: [1]
Graph: [/data/local/tmp/albert_base.tflite]
#threads used for CPU inference: [1]
Loaded model /data/local/tmp/albert_base.tflite
INFO: Initialized TensorFlow Lite runtime.
The input model file size (MB): 11.983
Initialized session in 20.283ms.
Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=2 first=339304 curr=266325 min=266325 max=339304 avg=302814 std=36489
Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=266601 curr=266931 min=265837 max=268116 avg=266473 std=419
Inference timings in us: Init: 20283, First inference: 339304, Warmup (avg): 302814, Inference (avg): 266473
"""

# Source: https://github.com/google/XNNPACK/issues/999 (benchmark_model on a Raspberry Pi, XNNPACK)
YOLO_XNNPACK = """\
STARTING!
Log parameter values verbosely: [0]
Num threads: [4]
Graph: [yolo_best_recall_int8_static.tflite]
Enable op profiling: [1]
#threads used for CPU inference: [4]
Loaded model yolo_best_recall_int8_static.tflite
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
The input model file size (MB): 3.67827
Initialized session in 18.777ms.
Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=9 first=64791 curr=56295 min=54873 max=65831 avg=57758.2 std=4065

Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=58154 curr=53809 min=53077 max=60727 avg=55043.2 std=1562

Inference timings in us: Init: 18777, First inference: 64791, Warmup (avg): 57758.2, Inference (avg): 55043.2
Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
Memory footprint delta from the start of the tool (MB): init=8.97656 overall=18.7227
"""

# Source: https://github.com/lp6m/yolov5s_android/blob/7b789d1023e0d78a2d6cb9287a002c939ab4e67a/benchmark/README.md (Xiaomi Mi11, NNAPI fp16)
YOLOV5_MI11 = """\
count=50 first=96719 curr=90158 min=89745 max=96719 avg=92571.2 std=1638
Inference timings in us: Init: 365972, First inference: 120877, Warmup (avg): 108605, Inference (avg): 92571.2
Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
Peak memory footprint (MB): init=6.90625 overall=61.0547
"""

# Same source: the int8 model with the NNAPI qti-dsp accelerator, which fails on that phone.
YOLOV5_MI11_FAILED = """\
STARTING!
Log parameter values verbosely: [0]
Num threads: [4]
Graph: [/data/local/tmp/yolov5s_int8_640.tflite]
#threads used for CPU inference: [4]
Use NNAPI: [1]
NNAPI execution preference: [sustained_speed]
NNAPI accelerator name: [qti-dsp]
NNAPI accelerators available: [qti-default,qti-dsp,qti-gpu,nnapi-reference]
Loaded model /data/local/tmp/yolov5s_int8_640.tflite
INFO: Initialized TensorFlow Lite runtime.
INFO: Created TensorFlow Lite delegate for NNAPI.
NNAPI delegate created.
ERROR: NN API returned error ANEURALNETWORKS_BAD_DATA at line 1068 while adding operation.

ERROR: Restored original execution plan after delegate application failure.
Failed to apply NNAPI delegate.
Benchmarking failed.
"""

# Source: https://github.com/tensorflow/tensorflow/blob/master/tensorflow/lite/tools/benchmark/README.md
# (the older summary format, after --enable_op_profiling=true tables)
MOBILENET_README_OLD = """\
Timings (microseconds): count=50 first=79449 curr=81350 min=77385 max=88213 avg=79732 std=1929
Memory (bytes): count=0
31 nodes observed


Average inference timings in us: Warmup: 83235, Init: 38467, Inference: 79760.9
"""


def test_parses_android_log_with_warmup_and_steady_runs():
    r = parse_benchmark_model_output(ALBERT_ANDROID)
    assert (r.init_us, r.first_inference_us, r.warmup_avg_us, r.inference_avg_us) == (20283, 339304, 302814, 266473)
    assert r.warmup.count == 2 and r.warmup.std_us == 36489
    assert (r.steady.count, r.steady.min_us, r.steady.max_us, r.steady.avg_us, r.steady.std_us) == (
        50,
        265837,
        268116,
        266473,
        419,
    )
    assert r.memory_kind is None


def test_parses_fractional_averages_and_memory_delta():
    r = parse_benchmark_model_output(YOLO_XNNPACK)
    assert r.inference_avg_us == pytest.approx(55043.2) and r.warmup_avg_us == pytest.approx(57758.2)
    assert r.steady.count == 50 and r.steady.std_us == 1562
    assert (r.memory_kind, r.memory_init_mb, r.memory_overall_mb) == (
        "delta",
        pytest.approx(8.97656),
        pytest.approx(18.7227),
    )


def test_parses_peak_memory_footprint():
    r = parse_benchmark_model_output(YOLOV5_MI11)
    assert r.init_us == 365972 and r.inference_avg_us == pytest.approx(92571.2)
    assert (r.memory_kind, r.memory_overall_mb) == ("peak", pytest.approx(61.0547))


def test_parses_the_older_summary_format():
    r = parse_benchmark_model_output(MOBILENET_README_OLD)
    assert (r.init_us, r.warmup_avg_us, r.inference_avg_us) == (38467, 83235, pytest.approx(79760.9))
    assert r.first_inference_us is None
    assert (r.steady.count, r.steady.avg_us, r.steady.std_us) == (50, 79732, 1929)


def test_scientific_notation_from_cpp_streams():
    # C++ ostreams print a float >= 1e6 as 1.45151e+06; an Init of 1.45 s is realistic with a GPU delegate.
    text = "Inference timings in us: Init: 1451507, First inference: 11147, Warmup (avg): 8779.68, Inference (avg): 1.45151e+06\n"
    assert parse_benchmark_model_output(text).inference_avg_us == pytest.approx(1451510)


def test_failed_benchmark_reports_the_last_error():
    with pytest.raises(AdbError, match="ANEURALNETWORKS_BAD_DATA|Restored original execution plan"):
        parse_benchmark_model_output(YOLOV5_MI11_FAILED)


def test_text_without_timings_is_rejected():
    with pytest.raises(AdbError, match="no 'Inference timings in us' line"):
        parse_benchmark_model_output("adb: error: device offline\n")


@pytest.mark.parametrize("spec", ["R58M123ABC", "adb:", "usb:R58M123ABC"])
def test_device_spec_must_be_adb_serial(spec):
    with pytest.raises(AdbError, match="adb:SERIAL"):
        parse_device(spec)


def test_device_spec_serial():
    assert parse_device("adb:emulator-5554") == "emulator-5554"


def test_missing_adb_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AdbError, match="apt-get install adb"):
        adb_executable()


def test_onnx_artifacts_are_refused_before_touching_the_phone(tmp_path):
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"")
    with pytest.raises(AdbError, match=r"\.tflite artifacts"):
        benchmark_on_device(artifact, [], "adb:any", tmp_path / "benchmark_model")


# ---- command lines, through a stand-in adb --------------------------------------------------
FAKE_ADB = """\
import os, shutil, subprocess, sys
args = sys.argv[1:]
if args == ["devices"]:
    print("List of devices attached\\nphone-1\\tdevice")
    sys.exit(0)
assert args[:2] == ["-s", "phone-1"], args
verb, *rest = args[2:]
if verb in ("push", "pull"):
    shutil.copyfile(*rest)
elif verb == "shell":  # adb joins its arguments with spaces; the phone's sh parses the line
    sys.exit(subprocess.run(["sh", "-c", " ".join(rest)], cwd=os.environ["FAKE_ADB_PHONE_CWD"]).returncode)
else:
    sys.exit(f"fake adb: unknown verb {verb}")
"""

# benchmark_model's stand-in: records its argv, and logs like the real tool when --graph exists.
FAKE_BENCHMARK_MODEL = """\
import json, os, sys
with open(os.environ["FAKE_BENCHMARK_ARGV"], "w") as f:
    json.dump(sys.argv[1:], f)
graph = next(a[len("--graph="):] for a in sys.argv[1:] if a.startswith("--graph="))
sys.stdout.write(LOG if os.path.isfile(graph) else f"ERROR: Could not open '{graph}'.\\nBenchmarking failed.\\n")
"""


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_phone(tmp_path, monkeypatch):
    """`adb` on PATH is a stand-in whose phone is this machine: push/pull copy files, `shell` runs
    the command line with sh in `cwd`, and DEVICE_DIR is a directory whose name needs quoting."""
    bin_dir, cwd = tmp_path / "bin", tmp_path / "phone-cwd"
    bin_dir.mkdir()
    cwd.mkdir()
    _script(bin_dir / "adb", FAKE_ADB)
    (bin_dir / "getprop").write_text(
        '#!/bin/sh\ncase "$1" in ro.product.model) echo "Pixel Test";; *) echo arm64-v8a;; esac\n'
    )
    (bin_dir / "getprop").chmod(0o755)
    device_dir = tmp_path / "phone storage; touch pwned-dir" / "mntool bench"
    monkeypatch.setattr(adb_module, "DEVICE_DIR", str(device_dir))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_PHONE_CWD", str(cwd))
    monkeypatch.setenv("FAKE_BENCHMARK_ARGV", str(tmp_path / "benchmark-argv.json"))
    binary = _script(tmp_path / "benchmark_model", f"LOG = {ALBERT_ANDROID!r}\n{FAKE_BENCHMARK_MODEL}")
    return SimpleNamespace(binary=binary, cwd=cwd, device_dir=device_dir, argv=tmp_path / "benchmark-argv.json")


def test_file_names_with_spaces_and_semicolons_stay_one_shell_word(fake_phone, tmp_path):
    artifact = tmp_path / "my model; touch pwned.tflite"
    artifact.write_bytes(b"not really a model")
    report = benchmark_on_device(artifact, [], "adb:phone-1", fake_phone.binary, DeviceBenchConfig(runs=7, threads=2))
    remote = f"{fake_phone.device_dir}/{artifact.name}"
    assert json.loads(fake_phone.argv.read_text()) == [
        f"--graph={remote}",
        "--num_threads=2",
        "--num_runs=7",
        "--warmup_runs=1",
        "--use_xnnpack=true",
    ]
    assert report.variants[0].result.inference_avg_us == 266473  # the log came back through the quoted redirect
    assert (report.model, report.abi) == ("Pixel Test", "arm64-v8a")
    assert list(fake_phone.cwd.iterdir()) == []  # nothing ran as a second command, nothing split into stray files
    assert not fake_phone.device_dir.exists()  # rm -rf removed exactly what was pushed


def _phone_or_skip() -> tuple[str, Path]:
    devices = attached_devices()
    if not devices:
        pytest.skip("no Android phone attached and authorised (`adb devices` lists none)")
    binary = os.environ.get("MNTOOL_BENCHMARK_BINARY")
    if not binary:
        pytest.skip("set MNTOOL_BENCHMARK_BINARY to LiteRT's android_aarch64 benchmark_model")
    return devices[0], Path(binary)


@pytest.mark.skipif(
    shutil.which("adb") is None, reason="adb is not installed (Debian/Ubuntu: apt-get install adb provides the client)"
)
def test_end_to_end_on_an_attached_phone(tflite_artifact, tflite_patch):
    serial, binary = _phone_or_skip()
    report = benchmark_on_device(tflite_artifact, [tflite_patch], f"adb:{serial}", binary, DeviceBenchConfig(runs=20))
    assert [v.variant for v in report.variants] == ["unpatched", str(tflite_patch)]
    for v in report.variants:
        assert v.result.inference_avg_us > 0 and v.result.steady.count >= 20
