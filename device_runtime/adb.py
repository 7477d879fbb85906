"""Benchmarks on a real Android phone over adb, with LiteRT's own `benchmark_model` binary.

`benchmark_on_device` pushes the binary, the artifact and each patched artifact to the phone,
runs the binary there with its output redirected to a file, pulls that file back and parses it
(`parse_benchmark_model_output`, which reads the tool's timing and memory lines), then removes
everything it pushed. The phone's shell parses every `adb shell` command line, so each word of
one is quoted (`shlex.quote`): a file name with spaces or `;` stays one argument.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from device_runtime.errors import MntoolError
from device_runtime.patch import TrustPolicy, apply_patch_bytes
from device_runtime.runners import find_weight_map

DEVICE_DIR = "/data/local/tmp/mntool-bench"
ADB_INSTALL_HINT = "install the adb client (Debian/Ubuntu: apt-get install adb; or Android SDK platform-tools)"

_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"  # C++ streams print large floats as 1.45151e+06
_SUMMARY = re.compile(
    rf"Inference timings in us: Init: {_NUM}, First inference: {_NUM}, Warmup \(avg\): {_NUM}, Inference \(avg\): {_NUM}"
)
_SUMMARY_OLD = re.compile(rf"Average inference timings in us: Warmup: {_NUM}, Init: {_NUM}, Inference: {_NUM}")
_STATS = re.compile(rf"count=(\d+) first={_NUM} curr={_NUM} min={_NUM} max={_NUM} avg={_NUM} std={_NUM}")
_RUN_HEADER = re.compile(r"^Running benchmark for at least", re.M)
_PROFILER_STATS = re.compile(
    rf"Timings \(microseconds\): count=(\d+) first={_NUM} curr={_NUM} min={_NUM} max={_NUM} avg={_NUM} std={_NUM}"
)
_MEMORY = re.compile(
    rf"(Peak memory footprint|Memory footprint delta from the start of the tool) \(MB\): init={_NUM} overall={_NUM}"
)


class AdbError(MntoolError):
    """adb is missing, the phone is not attached, or benchmark_model failed on it."""


@dataclass(frozen=True)
class RunStats:
    """One `count=... first=... min=... max=... avg=... std=...` line (microseconds)."""

    count: int
    first_us: float
    min_us: float
    max_us: float
    avg_us: float
    std_us: float


@dataclass(frozen=True)
class BenchmarkModelResult:
    """What benchmark_model reported (microseconds; memory in MB). `None` where the tool's
    version does not print the figure."""

    init_us: float
    inference_avg_us: float
    first_inference_us: float | None = None
    warmup_avg_us: float | None = None
    warmup: RunStats | None = None
    steady: RunStats | None = None
    memory_kind: str | None = None  # "peak" (newer tools) or "delta" (older tools)
    memory_init_mb: float | None = None
    memory_overall_mb: float | None = None


def parse_benchmark_model_output(text: str) -> BenchmarkModelResult:
    """Parse the log of LiteRT/TFLite `benchmark_model` (both the current summary line and the
    older `Average inference timings` one)."""
    if "Benchmarking failed" in text:
        errors = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("ERROR")]
        raise AdbError(f"benchmark_model failed: {errors[-1] if errors else 'Benchmarking failed.'}")
    runs = []
    for header in _RUN_HEADER.finditer(text):
        stats = _STATS.search(text, header.end())
        if stats:
            runs.append(_run_stats(stats))
    memory = _MEMORY.search(text)
    memory_fields = {}
    if memory:
        memory_fields = {
            "memory_kind": "peak" if memory.group(1).startswith("Peak") else "delta",
            "memory_init_mb": float(memory.group(2)),
            "memory_overall_mb": float(memory.group(3)),
        }
    summary = _SUMMARY.search(text)
    if summary:
        init, first, warmup_avg, inference_avg = (float(g) for g in summary.groups())
        return BenchmarkModelResult(
            init_us=init,
            inference_avg_us=inference_avg,
            first_inference_us=first,
            warmup_avg_us=warmup_avg,
            warmup=runs[0] if runs else None,
            steady=runs[1] if len(runs) > 1 else None,
            **memory_fields,
        )
    old = _SUMMARY_OLD.search(text)
    if old:
        warmup_avg, init, inference_avg = (float(g) for g in old.groups())
        profiler = _PROFILER_STATS.search(text)
        steady = runs[1] if len(runs) > 1 else (_run_stats(profiler) if profiler else None)
        return BenchmarkModelResult(
            init_us=init,
            inference_avg_us=inference_avg,
            warmup_avg_us=warmup_avg,
            warmup=runs[0] if runs else None,
            steady=steady,
            **memory_fields,
        )
    raise AdbError("benchmark_model output has no 'Inference timings in us' line; is this its log?")


def _run_stats(match: re.Match) -> RunStats:
    count, first, _curr, low, high, avg, std = match.groups()
    return RunStats(int(count), float(first), float(low), float(high), float(avg), float(std))


# ---- the phone ------------------------------------------------------------------------------
def parse_device(spec: str) -> str:
    """'adb:SERIAL' -> SERIAL."""
    kind, _, serial = spec.partition(":")
    if kind != "adb" or not serial:
        raise AdbError(f"device {spec!r} is not of the form adb:SERIAL (see `adb devices`)")
    return serial


def adb_executable() -> str:
    path = shutil.which("adb")
    if path is None:
        raise AdbError(f"adb is not installed: {ADB_INSTALL_HINT}")
    return path


def attached_devices() -> list[str]:
    """Serials of phones adb sees in the 'device' (authorised, online) state."""
    out = subprocess.run([adb_executable(), "devices"], capture_output=True, text=True, check=False).stdout
    rows = [ln.split() for ln in out.splitlines()[1:]]
    return [row[0] for row in rows if len(row) == 2 and row[1] == "device"]


@dataclass(frozen=True)
class DeviceBenchConfig:
    runs: int = 50  # benchmark_model --num_runs
    warmup: int = 1  # --warmup_runs
    threads: int = 1  # --num_threads
    xnnpack: bool = True  # --use_xnnpack
    device_id: str | None = None  # verifies patches bound to one device before they are written


@dataclass
class DeviceVariant:
    variant: str  # "unpatched" or the patch path
    artifact_bytes: int
    result: BenchmarkModelResult
    log: str = field(repr=False)


@dataclass
class DeviceBenchReport:
    serial: str
    model: str  # ro.product.model
    abi: str  # ro.product.cpu.abi
    artifact: str
    config: dict
    variants: list[DeviceVariant]

    def to_dict(self, logs: bool = False) -> dict:
        d = asdict(self)
        if not logs:
            for v in d["variants"]:
                v.pop("log")
        return d


class _Adb:
    def __init__(self, serial: str) -> None:
        self.base = [adb_executable(), "-s", serial]

    def __call__(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise AdbError(f"adb {' '.join(args[:2])} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        return done.stdout

    def shell(self, *argv: str, log: str | None = None) -> str:
        """Run `argv` in the phone's shell, each word quoted; with `log`, stdout and stderr go to
        that file on the phone and the exit status is ignored (the log says what happened)."""
        command = shlex.join(argv)
        if log is not None:
            command += f" > {shlex.quote(log)} 2>&1; true"
        return self("shell", command)


def benchmark_on_device(
    artifact: Path,
    patches: list[Path],
    device: str,
    benchmark_binary: Path,
    config: DeviceBenchConfig = DeviceBenchConfig(),
) -> DeviceBenchReport:
    """Run benchmark_model on the phone for the artifact and for each patch applied to it."""
    artifact, benchmark_binary = Path(artifact), Path(benchmark_binary)
    if artifact.suffix != ".tflite":
        raise AdbError(
            f"the Android path runs LiteRT's benchmark_model, which takes .tflite artifacts, not {artifact.name}"
        )
    if not benchmark_binary.is_file():
        raise AdbError(
            f"benchmark binary {benchmark_binary} does not exist (download LiteRT's android_aarch64 benchmark_model)"
        )
    serial = parse_device(device)
    attached = attached_devices()
    if serial not in attached:
        raise AdbError(f"no phone {serial!r} attached and authorised (`adb devices` lists {attached})")
    adb = _Adb(serial)
    with tempfile.TemporaryDirectory(prefix="mntool-adb-") as scratch:
        variants = [("unpatched", artifact)] + [
            (str(p), _write_patched(artifact, Path(p), Path(scratch), config.device_id)) for p in patches
        ]
        adb.shell("mkdir", "-p", DEVICE_DIR)
        try:
            adb("push", str(benchmark_binary), f"{DEVICE_DIR}/benchmark_model")
            adb.shell("chmod", "+x", f"{DEVICE_DIR}/benchmark_model")
            results = [_run_variant(adb, name, path, Path(scratch), config) for name, path in variants]
            model = adb.shell("getprop", "ro.product.model").strip()
            abi = adb.shell("getprop", "ro.product.cpu.abi").strip()
        finally:
            adb.shell("rm", "-rf", DEVICE_DIR)
    return DeviceBenchReport(serial, model, abi, str(artifact), asdict(config), results)


def _write_patched(artifact: Path, patch: Path, scratch: Path, device_id: str | None) -> Path:
    """The patched artifact as a local file, to push (the phone gets exactly what an app would)."""
    weight_map = find_weight_map(artifact)
    if weight_map is None:
        raise AdbError(f"patches need the artifact's weight map; none beside {artifact}")
    if not patch.is_file():
        raise AdbError(f"patch {patch} does not exist")
    files = apply_patch_bytes(
        {artifact.name: artifact.read_bytes()}, patch.read_bytes(), weight_map, policy=TrustPolicy(device_id=device_id)
    )
    out = scratch / f"{patch.stem}-{artifact.name}"
    out.write_bytes(files[artifact.name])
    return out


def _run_variant(adb: _Adb, name: str, path: Path, scratch: Path, config: DeviceBenchConfig) -> DeviceVariant:
    remote = f"{DEVICE_DIR}/{path.name}"
    log_remote = f"{remote}.log"
    adb("push", str(path), remote)
    adb.shell(
        f"{DEVICE_DIR}/benchmark_model",
        f"--graph={remote}",
        f"--num_threads={config.threads}",
        f"--num_runs={config.runs}",
        f"--warmup_runs={config.warmup}",
        f"--use_xnnpack={'true' if config.xnnpack else 'false'}",
        log=log_remote,
    )
    local_log = scratch / f"{path.name}.log"
    adb("pull", log_remote, str(local_log))
    log = local_log.read_text(errors="replace")
    return DeviceVariant(name, path.stat().st_size, parse_benchmark_model_output(log), log)
