"""The emulated arm64 device (device_runtime.qemu): set-up, parity with the host runners and
instruction counts. Runs for real wherever setup can: as root with apt-get (CI, dev machines of
this kind); the set-up is cached in ~/.cache/mntool/devices (or $MNTOOL_DEVICE_DIR)."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from device_runtime import qemu
from device_runtime.bench import generate_inputs
from device_runtime.runners import find_weight_map, open_runner
from mntool.cli.main import main


def _skip_reason() -> str | None:
    if qemu.status()["ready"]:
        return None
    if os.geteuid() != 0:
        return "not root: `mntool device setup qemu-arm64` installs apt packages and runs mmdebstrap --mode=root"
    if not shutil.which("apt-get"):
        return "apt-get absent: cannot install qemu-user and mmdebstrap on this host"
    return None


@pytest.fixture(scope="module")
def device():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    t0 = time.perf_counter()
    lay = qemu.setup(log=lambda s: None)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    qemu.setup(log=lambda s: pytest.fail(f"a cached set-up did work again: {s}"))
    cached = time.perf_counter() - t0
    print(f"qemu-arm64 setup {first:.1f} s, cached {cached:.2f} s")
    return lay


# ---- pieces that need no emulator -----------------------------------------------------------
def test_mirrors_from_deb822(tmp_path):
    sources = tmp_path / "debian.sources"
    sources.write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\n# a comment: here\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
    )
    assert qemu.debian_mirrors(sources) == ("http://mirror.example/debian", "http://mirror.example/debian-security")
    assert qemu.debian_mirrors(tmp_path / "absent")[0] == "http://deb.debian.org/debian"


def test_cpuinfo_describes_cortex_a76_cores():
    text = qemu.cpuinfo_text(3)
    assert text.count("processor\t:") == 3
    assert "CPU part\t: 0xd0b" in text and "asimddp" in text


def test_missing_tools_without_root_print_the_command(monkeypatch):
    monkeypatch.setattr(qemu, "_have_tools", lambda: ["qemu-user", "mmdebstrap"])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(qemu.DeviceError, match="apt-get install -y --no-install-recommends qemu-user mmdebstrap"):
        qemu.ensure_tools(log=lambda s: None)


def test_regions_subtract_marks():
    rows = [(0, 100, 1), (1, 150, 6), (2, 200, 6), (3, 1200, 506)]
    assert qemu._regions(rows, {"a": 0, "b": 1, "c": 2}) == {"a": (50, 5), "b": (1000, 500)}


# ---- on the emulated device -----------------------------------------------------------------
def test_status_after_setup(device):
    s = qemu.status()
    assert s["ready"], s["missing"]
    assert s["qemu"] and s["cpu"] == "cortex-a76"
    assert s["wheels"]["ai-edge-litert"] == "2.3.0" and s["wheels"]["onnxruntime"] == "1.32.0"
    assert not (device.app / "mntool").exists() and not (device.app / "exporters").exists()
    assert not (device.site / "torch").exists()


@pytest.mark.parametrize("target", ["tflite", "onnx"])
def test_run_matches_host(device, request, target):
    artifact = request.getfixturevalue(f"{target}_artifact")
    weight_map = find_weight_map(artifact)
    with open_runner(artifact, weight_map=weight_map) as runner:
        feeds = generate_inputs(runner.free_inputs, weight_map.extra.get("vocab_size"), seed=3)
        host = runner.run(feeds)
    arm = qemu.run_artifact(artifact, feeds)
    assert set(arm) == set(host)
    for name in host:
        np.testing.assert_allclose(arm[name], host[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("target", ["tflite", "onnx"])
def test_bench_counts_are_repeatable_and_patch_independent(device, request, target, capsys):
    artifact = request.getfixturevalue(f"{target}_artifact")
    patch = request.getfixturevalue(f"{target}_patch")
    config = qemu.QemuBenchConfig(runs=10)
    report = qemu.bench(artifact, [patch], config=config)
    base, patched = report["unpatched"], report["patches"][0]
    assert report["emulator"]["cpu"] == "cortex-a76" and report["guest"]["machine"] == "aarch64"
    assert base["instructions_per_inference"] > 0
    assert base["spread"] < 0.01, base["per_round"]
    assert base["max_abs_error_vs_host"] <= 1e-5 and patched["max_abs_error_vs_host"] <= 1e-5
    assert patched["outputs_changed"]
    assert abs(patched["ratio_to_unpatched"] - 1) < 0.01, patched["ratio_to_unpatched"]
    assert patched["swap_instructions"] > 0 and report["load"]["from_memory_instructions"] > 0

    # A second, separate run of the same measurement (through the CLI) counts the same within 1%.
    assert (
        main(["bench", str(artifact), "--patch", str(patch), "--device", "qemu-arm64", "--runs", "10", "--json"]) == 0
    )
    again = json.loads(capsys.readouterr().out)[0]["unpatched"]["instructions_per_inference"]
    assert abs(again / base["instructions_per_inference"] - 1) < 0.01
