"""Latency benchmark of one compiled artifact, and of the weight swap each patch causes.

`benchmark` measures in this process: model load (from file and from memory), first inference,
steady-state latency, the timer's own overhead, peak RSS and, per patch, apply time, swap
latency and patched/unpatched latency. `benchmark_isolated` runs the same in a fresh worker
process (`python -m device_runtime.bench`), optionally under a device profile, so that first
loads, memory and CPU limits belong to the benchmark alone. Results serialise to JSON and CSV.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from device_runtime import weight_map as weight_maps
from device_runtime.errors import MntoolError
from device_runtime.hotswap import HotSwap
from device_runtime.patch import DeviceState, TrustPolicy, apply_patch_bytes, verify_patch
from device_runtime.profiles import DeviceProfile, ProfileSandbox
from device_runtime.ranking import RankingForm
from device_runtime.runners import (
    PACKAGE_OF_RUNTIME,
    RunnerConfig,
    find_weight_map,
    load_inputs,
    open_runner,
    runtime_for,
)
from device_runtime.weight_map import IOSpec, WeightMap

SAFE_ID_HIGH = 2  # ids drawn from [0, 2) when the vocabulary size is unknown: valid for any embedding
VOCAB_KEY = "vocab_size"  # weight map `extra` key: rows of the item embedding (valid ids 0..vocab_size-1)

Progress = Callable[[int], None]  # called with the number of work units just finished


class BenchError(MntoolError):
    """A benchmark cannot run as asked (e.g. a patch without a weight map, a failed worker)."""


@dataclass(frozen=True)
class BenchConfig:
    runs: int = 500  # timed steady-state inferences per variant (unpatched and each patch)
    warmup: int = 50  # untimed inferences first (caches, lazy packing)
    loads: int = 20  # fresh loads timed for the load / first-inference / swap figures (medians)
    rounds: int = 10  # steady-state runs of all variants are interleaved in this many rounds
    runtime: str | None = None  # default: the artifact's own (weight-map target or suffix)
    runner: RunnerConfig = RunnerConfig()
    seed: int = 0  # for generated inputs
    device_id: str | None = None  # this device's id, for patches bound to one device (verified as a device would)

    def __post_init__(self) -> None:
        for name in ("runs", "loads", "rounds"):
            if getattr(self, name) < 1:
                raise BenchError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise BenchError(f"warmup must be >= 0, got {self.warmup}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BenchConfig:
        return cls(**{**d, "runner": RunnerConfig(**d["runner"])})

    def work_units(self, n_patches: int) -> int:
        """Progress units of one benchmark: every load cycle and every timed or warm-up run."""
        return (1 + n_patches) * (self.loads + self.warmup + self.runs) + self.runs


@dataclass(frozen=True)
class LatencyStats:
    runs: int
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float

    @classmethod
    def of(cls, samples_ms: np.ndarray) -> LatencyStats:
        p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99])
        return cls(
            len(samples_ms),
            float(samples_ms.min()),
            float(p50),
            float(p90),
            float(p99),
            float(samples_ms.mean()),
            float(samples_ms.std()),
        )


@dataclass
class PatchReport:
    patch: str
    patch_bytes: int
    apply_ms: float  # median: verify the patch and write it into the idle in-memory slot
    verify_ms: float  # median: the patch's own checks alone (hashes, signature, destinations, values)
    swap_ms: float  # median: patch bytes in hand -> first output with the new parameters (HotSwap)
    swap_vs_cold_start: float  # swap_ms / the unpatched artifact's cold_start_memory_ms
    swap_vs_reference: float  # swap_ms / (cold_start_memory_ms + verify_ms): 1.0 = the swap adds nothing
    latency: LatencyStats
    p50_ratio: float  # patched p50 / unpatched p50, interleaved in the same run
    outputs_changed: bool  # the patched model's outputs differ from the unpatched model's
    samples_ms: list[float] = field(repr=False)


@dataclass
class BenchReport:
    artifact: str
    runtime: str
    runtime_version: str
    artifact_bytes: int  # every file of the artifact
    config: dict
    inputs: list[dict]  # name, dtype, shape and where the values came from
    first_load_ms: float  # the first load in the process: includes the runtime's own start-up
    load_file_ms: float  # median: new interpreter/session from the artifact's path
    load_memory_ms: float  # median: new interpreter/session from bytes already in memory
    first_inference_ms: float  # median: the first run after a load from memory
    cold_start_memory_ms: float  # median: load from memory + first inference, timed together
    latency: LatencyStats  # steady state, runner loaded from memory (as a patched one is)
    timer_overhead_us: float  # p50 of the timing loop around an empty call
    overhead_ratio: float  # timer_overhead / latency p50
    rss_before_load_mb: float
    peak_rss_mb: float
    samples_ms: list[float] = field(repr=False)
    patches: list[PatchReport] = field(default_factory=list)
    profile: dict | None = None  # what a device profile enforced (profiles.AppliedProfile)
    host: dict = field(default_factory=dict)
    # a recommender's ranking form (device_runtime.ranking) and the latency per ranking request it
    # implies: form, calls_per_request, p50_ms, p99_ms (per request); None for other artifacts
    ranking: dict | None = None

    def to_dict(self, samples: bool = True) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
            for p in d["patches"]:
                p.pop("samples_ms")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BenchReport:
        patches = [PatchReport(**{**p, "latency": LatencyStats(**p["latency"])}) for p in d["patches"]]
        return cls(**{**d, "latency": LatencyStats(**d["latency"]), "patches": patches})

    def rows(self) -> list[dict]:
        """One flat row per variant (unpatched, then each patch), for CSV."""
        base = {
            "artifact": self.artifact,
            "runtime": self.runtime,
            "threads": self.config["runner"]["threads"],
            "xnnpack": self.config["runner"]["xnnpack"],
            "profile": (self.profile or {}).get("profile", ""),
            "artifact_bytes": self.artifact_bytes,
            "load_file_ms": self.load_file_ms,
            "load_memory_ms": self.load_memory_ms,
            "first_inference_ms": self.first_inference_ms,
            "cold_start_memory_ms": self.cold_start_memory_ms,
            "timer_overhead_us": self.timer_overhead_us,
            "peak_rss_mb": self.peak_rss_mb,
        }
        rows = [
            {
                **base,
                "variant": "unpatched",
                **asdict(self.latency),
                "apply_ms": "",
                "swap_ms": "",
                "swap_vs_cold_start": "",
                "p50_ratio": 1.0,
            }
        ]
        for p in self.patches:
            rows.append(
                {
                    **base,
                    "variant": p.patch,
                    **asdict(p.latency),
                    "apply_ms": p.apply_ms,
                    "swap_ms": p.swap_ms,
                    "swap_vs_cold_start": p.swap_vs_cold_start,
                    "p50_ratio": p.p50_ratio,
                }
            )
        return rows


# ---- inputs ---------------------------------------------------------------------------------
def generate_inputs(specs: tuple[IOSpec, ...], vocab_size: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs matching an artifact's signature: ids in [1, vocab_size) (0 is padding), else [0, 2);
    floats uniform in [0, 1) (the range of the image models' pixels); booleans fair coins."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        kind = np.dtype(spec.dtype).kind
        if kind in "iu":
            low, high = (1, vocab_size) if vocab_size and vocab_size > 1 else (0, SAFE_ID_HIGH)
            feeds[spec.name] = rng.integers(low, high, size=spec.shape).astype(spec.dtype)
        elif kind == "f":
            feeds[spec.name] = rng.random(spec.shape).astype(spec.dtype)
        elif kind == "b":
            feeds[spec.name] = rng.random(spec.shape) < 0.5
        else:
            raise BenchError(f"cannot generate values for input {spec.name!r} of dtype {spec.dtype}")
    return feeds


def vocab_size(weight_map: WeightMap | None) -> int | None:
    """Rows of the artifact's item table (valid ids 0..vocab_size-1), where its weight map says:
    a ranking form's items, else the legacy `extra.vocab_size`; None if unknown."""
    if weight_map is None:
        return None
    form = RankingForm.of(weight_map)
    return form.n_items + 1 if form is not None else weight_map.extra.get(VOCAB_KEY)


def generated_source(spec: IOSpec, vocab_size: int | None) -> str:
    """How `generate_inputs` drew `spec`'s values, for the report."""
    kind = np.dtype(spec.dtype).kind
    if kind in "iu":
        return f"generated (ids < {vocab_size or SAFE_ID_HIGH})"
    return "generated (uniform [0, 1))" if kind == "f" else "generated (coin flips)"


# ---- measurement helpers --------------------------------------------------------------------
def _rss_mb() -> float | None:
    """Current resident set size, where /proc tells it."""
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        return None
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """Peak resident set size of this process. On Linux `VmHWM` (ru_maxrss of a worker started by
    fork carries its parent's peak over); the current size bounds it from below."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return max(int(line.split()[1]) / 2**10, _rss_mb() or 0.0)  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
    return max(peak_mb, _rss_mb() or 0.0)


def time_interleaved(
    calls: dict[str, Callable[[], object]], runs: int, rounds: int, progress: Progress | None = None
) -> dict[str, list[float]]:
    """Per-call wall times (ms) of each zero-argument call, `runs` each, interleaved in `rounds`
    blocks so that drift on a shared host hits every call alike; GC is off while timing.

    Every call is timed by the same loop, so timing an empty call (`empty_call`) with it measures
    exactly the overhead each sample carries."""
    clock = time.perf_counter_ns
    samples: dict[str, list[float]] = {name: [] for name in calls}
    gc.disable()
    try:
        for r in range(rounds):
            block = runs // rounds + (r < runs % rounds)
            for name, call in calls.items():
                out = samples[name]
                for _ in range(block):
                    t0 = clock()
                    call()
                    out.append((clock() - t0) / 1e6)
                if progress:
                    progress(block)
    finally:
        gc.enable()
    return samples


def empty_call() -> None:
    """The reference for the timer's overhead: a call that does nothing."""


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _host() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")), cpu
        )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _runtime_version(runtime: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE_OF_RUNTIME[runtime])
    except PackageNotFoundError:
        return "unknown"


def _read_patch(path: Path) -> bytes:
    if not path.is_file():
        raise BenchError(f"patch {path} does not exist")
    return path.read_bytes()


def _apply_patch(
    files: dict[str, bytes], patch: bytes, weight_map: WeightMap, device_id: str | None
) -> dict[str, bytes | bytearray]:
    """The artifact's files with the patch verified and written in, all in memory. The artifact
    itself was checked against its weight map when the benchmark loaded it, as an app does at
    start-up, so a swap re-verifies the patch but does not re-hash the whole artifact."""
    return apply_patch_bytes(files, patch, weight_map, policy=TrustPolicy(device_id=device_id), check_artifact=False)


# ---- the benchmark --------------------------------------------------------------------------
def benchmark(
    artifact: Path,
    patches: list[Path] = (),
    inputs: Path | None = None,
    config: BenchConfig = BenchConfig(),
    progress: Progress | None = None,
) -> BenchReport:
    """Benchmark `artifact` (and the swap to each patch) in this process."""
    artifact = Path(artifact)
    tick = progress or (lambda n: None)
    weight_map = find_weight_map(artifact)
    if patches and weight_map is None:
        raise BenchError(f"patches need the artifact's weight map; none beside {artifact}")
    runtime = config.runtime or runtime_for(artifact, weight_map)
    patch_bytes = {Path(p): _read_patch(Path(p)) for p in patches}

    def load(from_files: dict[str, bytes] | None):
        return open_runner(artifact, runtime=runtime, files=from_files, weight_map=weight_map, config=config.runner)

    rss_before = _rss_mb() or _peak_rss_mb()
    t0 = time.perf_counter_ns()
    runner = load(None)
    first_load_ms = (time.perf_counter_ns() - t0) / 1e6
    input_specs = runner.free_inputs
    form = RankingForm.of(weight_map)
    vocab = vocab_size(weight_map)
    feeds = load_inputs(inputs) if inputs else generate_inputs(input_specs, vocab, config.seed)
    reference = runner.run(feeds)
    runner.close()
    files = weight_maps.read_artifact_files(artifact, weight_map.files if weight_map else [artifact.name])

    # Load cycles: a load from file, a load from memory + first inference, and each patch's swap.
    # Their order rotates every cycle, so neither drift on a shared host nor what the previous
    # step left behind (freed sessions, cold caches) favours one of them.
    clock = time.perf_counter_ns
    load_file, load_memory, first_run, cold_start = [], [], [], []
    apply_times: dict[Path, list[float]] = {p: [] for p in patch_bytes}
    verify_times: dict[Path, list[float]] = {p: [] for p in patch_bytes}
    swap_times: dict[Path, list[float]] = {p: [] for p in patch_bytes}
    patched_files = {p: _apply_patch(files, data, weight_map, config.device_id) for p, data in patch_bytes.items()}
    sizes = {name: len(data) for name, data in files.items()}
    policy = TrustPolicy(device_id=config.device_id)
    swappers = {
        p: HotSwap(artifact, weight_map=weight_map, files=files, runtime=runtime, config=config.runner, policy=policy)
        for p in patch_bytes
    }

    def from_file() -> None:
        t0 = clock()
        runner = load(None)
        load_file.append((clock() - t0) / 1e6)
        runner.close()

    def from_memory() -> None:
        t0 = clock()
        runner = load(files)
        t1 = clock()
        runner.run(feeds)
        t2 = clock()
        load_memory.append((t1 - t0) / 1e6)
        first_run.append((t2 - t1) / 1e6)
        cold_start.append((t2 - t0) / 1e6)
        runner.close()

    def verify(path: Path) -> None:
        t0 = clock()
        verify_patch(patch_bytes[path], weight_map, sizes, policy)
        verify_times[path].append((clock() - t0) / 1e6)

    def swap(path: Path) -> None:
        swapper = swappers[path]
        swapper.state = DeviceState()  # the same patch again: a timing loop, not a replay
        t0 = clock()
        runner, _ = swapper.swap(patch_bytes[path])
        runner.run(feeds)  # weights-as-inputs artifacts bind the patched values here
        t1 = clock()
        swap_times[path].append((t1 - t0) / 1e6)
        swapper.release_previous()  # as the cold loads close theirs: off the clock

    def apply(path: Path) -> None:
        t0 = clock()
        _apply_patch(files, patch_bytes[path], weight_map, config.device_id)
        apply_times[path].append((clock() - t0) / 1e6)

    steps = [from_file, from_memory, *(partial(step, p) for p in patch_bytes for step in (verify, swap, apply))]
    gc.disable()
    try:
        for cycle in range(config.loads):
            k = cycle % len(steps)
            for step in steps[k:] + steps[:k]:
                step()
            tick(1 + len(patch_bytes))
    finally:
        gc.enable()
        for swapper in swappers.values():
            swapper.close()

    # Steady state: every variant loaded from memory, warmed up, then timed in interleaved rounds.
    variants = {"unpatched": load(files), **{str(p): load(patched_files[p]) for p in patch_bytes}}
    arrays = {key: variant.prepare(feeds) for key, variant in variants.items()}
    outputs = {}
    for key, variant in variants.items():
        for _ in range(config.warmup):
            variant.invoke(arrays[key])
        tick(config.warmup)
        outputs[key] = variant.run(feeds)
    calls = {key: partial(variant.invoke, arrays[key]) for key, variant in variants.items()}
    samples = time_interleaved({**calls, "timer overhead": empty_call}, config.runs, config.rounds, tick)
    for variant in variants.values():
        variant.close()

    base = np.asarray(samples["unpatched"])
    latency = LatencyStats.of(base)
    cold_start_ms = _median(cold_start)
    timer_overhead_us = _median(samples["timer overhead"]) * 1e3
    patch_reports = []
    for path, patch in patch_bytes.items():
        stats = LatencyStats.of(np.asarray(samples[str(path)]))
        changed = any(not np.array_equal(outputs[str(path)][n], outputs["unpatched"][n]) for n in reference)
        patch_reports.append(
            PatchReport(
                patch=str(path),
                patch_bytes=len(patch),
                apply_ms=_median(apply_times[path]),
                verify_ms=_median(verify_times[path]),
                swap_ms=_median(swap_times[path]),
                swap_vs_cold_start=_median(swap_times[path]) / cold_start_ms,
                swap_vs_reference=_median(swap_times[path]) / (cold_start_ms + _median(verify_times[path])),
                latency=stats,
                p50_ratio=stats.p50_ms / latency.p50_ms,
                outputs_changed=changed,
                samples_ms=samples[str(path)],
            )
        )
    assert all(np.array_equal(outputs["unpatched"][n], reference[n]) for n in reference), "memory load changed outputs"
    return BenchReport(
        artifact=str(artifact),
        runtime=runtime,
        runtime_version=_runtime_version(runtime),
        artifact_bytes=sum(len(b) for b in files.values()),
        config=config.to_dict(),
        inputs=[
            {
                "name": s.name,
                "dtype": s.dtype,
                "shape": list(s.shape),
                "source": str(inputs) if inputs else generated_source(s, vocab),
            }
            for s in input_specs
        ],
        first_load_ms=first_load_ms,
        load_file_ms=_median(load_file),
        load_memory_ms=_median(load_memory),
        first_inference_ms=_median(first_run),
        cold_start_memory_ms=cold_start_ms,
        latency=latency,
        timer_overhead_us=timer_overhead_us,
        overhead_ratio=timer_overhead_us / 1e3 / latency.p50_ms,
        rss_before_load_mb=rss_before,
        peak_rss_mb=_peak_rss_mb(),
        samples_ms=samples["unpatched"],
        patches=patch_reports,
        host=_host(),
        ranking=None
        if form is None
        else {
            "form": form.to_dict(),
            "calls_per_request": form.calls_per_request,
            "p50_ms": latency.p50_ms * form.calls_per_request,
            "p99_ms": latency.p99_ms * form.calls_per_request,
        },
    )


# ---- the isolated worker --------------------------------------------------------------------
def benchmark_isolated(
    artifact: Path,
    patches: list[Path] = (),
    inputs: Path | None = None,
    config: BenchConfig = BenchConfig(),
    profile: DeviceProfile | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """`benchmark` in a fresh worker process, under `profile` if given (threads, CPU affinity,
    CPU bandwidth), so that no limit leaks into the caller."""
    if profile is not None:
        config = replace(config, runner=replace(config.runner, threads=profile.threads))
    request = {
        "artifact": str(artifact),
        "patches": [str(p) for p in patches],
        "inputs": str(inputs) if inputs else None,
        "config": config.to_dict(),
    }
    message = run_worker("device_runtime.bench", request, profile, progress)
    if "error" in message:
        raise BenchError(message["error"])
    report = BenchReport.from_dict(message["report"])
    report.profile = message["profile"]
    return report


def run_worker(module: str, request: dict, profile: DeviceProfile | None, progress: Progress | None) -> dict:
    """Run `python -m module` as a benchmark worker under `profile` (threads, CPU affinity, CPU
    bandwidth; none leaks into the caller): `request` as JSON on its stdin, progress lines passed
    to `progress`, its last message returned ({"report": ...} or {"error": ...}) with
    "profile": the limits applied (None without a profile). A crash raises RuntimeError."""
    sandbox = ProfileSandbox(profile) if profile is not None else None
    with sandbox or contextlib.nullcontext():
        worker = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=sandbox.enter_child if sandbox else None,
        )
        worker.stdin.write(json.dumps(request))
        worker.stdin.close()
        message = {}
        for line in worker.stdout:
            message = json.loads(line)
            if "progress" in message and progress:
                progress(message["progress"])
        worker.wait()
    if "error" not in message and (worker.returncode != 0 or "report" not in message):
        raise RuntimeError(f"{module} worker failed (exit {worker.returncode}); its traceback is above")
    message["profile"] = sandbox.applied.to_dict() if sandbox else None
    return message


def worker_main(run: Callable[[dict, Progress], object]) -> int:
    """A benchmark worker's main: read the request on stdin, call `run(request, progress)`, write
    progress lines and one report (or error) line on stdout as JSON; runtimes' own prints go to
    stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # runtimes print to stdout; keep the channel for JSON lines only

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    request = json.loads(sys.stdin.read())
    try:
        report = run(request, lambda n: send({"progress": n}))
    except MntoolError as err:
        send({"error": str(err)})
        return 1
    except Exception:
        traceback.print_exc()
        return 2
    send({"report": report.to_dict()})
    return 0


def _run_request(request: dict, progress: Progress) -> BenchReport:
    return benchmark(
        Path(request["artifact"]),
        [Path(p) for p in request["patches"]],
        Path(request["inputs"]) if request["inputs"] else None,
        BenchConfig.from_dict(request["config"]),
        progress=progress,
    )


if __name__ == "__main__":
    sys.exit(worker_main(_run_request))
