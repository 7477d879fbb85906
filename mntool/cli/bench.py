"""`mntool run | bench`: thin click commands over `device_runtime.runners`, `device_runtime.bench`
and `device_runtime.adb`; the latency figure is `mntool.plots`.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click
import numpy as np

from device_runtime.bench import BenchConfig, BenchReport
from device_runtime.profiles import PROFILES
from device_runtime.runners import ORT_OPTIMIZATION_LEVELS, RUNTIMES, RunnerConfig
from mntool.plots import plot_latency, report_series, report_title

PATH = click.Path(path_type=Path)
RUNTIME = click.Choice(list(RUNTIMES))
GRAPH_OPT = click.Choice(list(ORT_OPTIMIZATION_LEVELS))
BENCH, RUNNER = BenchConfig(), RunnerConfig()  # the defaults the options show


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


# ---- mntool run -----------------------------------------------------------------------------
@click.command()
@click.argument("artifact", type=PATH)
@click.option(
    "--inputs",
    "inputs_path",
    type=PATH,
    required=True,
    help="An .npz or .json of input arrays keyed by the PyTorch forward() argument names.",
)
@click.option("-o", "--output", type=PATH, help="Write the outputs to this .npz (keys = output names).")
@click.option("--runtime", type=RUNTIME, help="Default: the artifact's own (from its weight map or suffix).")
@click.option("--threads", type=int, default=RUNNER.threads, show_default=True, help="Intra-op threads.")
@click.option(
    "--xnnpack/--no-xnnpack", default=RUNNER.xnnpack, show_default=True, help="LiteRT: use the XNNPACK delegate."
)
@click.option("--json", "as_json", is_flag=True, help="Print the outputs as JSON.")
@click.option("--device", type=click.Choice(["qemu-arm64"]), help="Run on the emulated arm64 device instead.")
def run(
    artifact: Path,
    inputs_path: Path,
    output: Path | None,
    runtime: str | None,
    threads: int,
    xnnpack: bool,
    as_json: bool,
    device: str | None,
) -> None:
    """Run one inference of ARTIFACT (.tflite, .onnx; .mlpackage on macOS).

    Inputs are cast to the artifact's dtypes when that loses nothing (int64 ids -> int32);
    a lossy cast is an error.

    \b
    Example:
      echo '{"history": [[0, 0, 12, 7, 301]], "target": [42]}' > in.json
      mntool run artifacts/model.tflite --inputs in.json --json
      mntool run artifacts/model.onnx --inputs in.npz -o out.npz
    """
    from device_runtime.runners import RunnerConfig, load_inputs, run_artifact

    if device:  # qemu-arm64: the same runners, in the arm64 Python under qemu-aarch64
        from device_runtime.qemu import run_artifact as run_emulated

        outputs = run_emulated(artifact, load_inputs(inputs_path), runner={"threads": threads, "xnnpack": xnnpack})
    else:
        outputs = run_artifact(
            artifact, load_inputs(inputs_path), runtime=runtime, config=RunnerConfig(threads=threads, xnnpack=xnnpack)
        )
    if output:
        np.savez(output, **outputs)
    if as_json:
        _echo_json({name: value.tolist() for name, value in outputs.items()})
    elif output:
        click.echo(f"wrote {output} ({', '.join(f'{n}: {v.dtype} {v.shape}' for n, v in outputs.items())})")
    else:
        for name, value in outputs.items():
            click.echo(f"{name} {value.dtype} {tuple(value.shape)}: {np.array2string(value, precision=6)}")


# ---- mntool bench ---------------------------------------------------------------------------
@click.command()
@click.argument("artifacts", nargs=-1, required=True, type=PATH)
@click.option(
    "--patch",
    "patches",
    multiple=True,
    type=PATH,
    help="Also measure the swap to this patch (repeatable); needs exactly one ARTIFACT.",
)
@click.option(
    "--device-id",
    help="This device's id, to verify patches bound to one device (as mntool generate --device-id makes).",
)
@click.option("--runtime", type=RUNTIME, help="Default: each artifact's own.")
@click.option(
    "--threads", type=int, default=RUNNER.threads, show_default=True, help="Intra-op threads (a profile sets its own)."
)
@click.option(
    "--xnnpack/--no-xnnpack", default=RUNNER.xnnpack, show_default=True, help="LiteRT: use the XNNPACK delegate."
)
@click.option(
    "--graph-optimization",
    type=GRAPH_OPT,
    default=RUNNER.graph_optimization,
    show_default=True,
    help="ONNX Runtime graph optimisation level.",
)
@click.option(
    "--profile",
    "profile_name",
    type=click.Choice(list(PROFILES)),
    help="Emulate a phone's CPU budget on this host (threads, cores, CPU bandwidth); docs/benchmarking.md.",
)
@click.option("--runs", type=int, default=BENCH.runs, show_default=True, help="Timed steady-state runs per variant.")
@click.option("--warmup", type=int, default=BENCH.warmup, show_default=True, help="Untimed runs before timing.")
@click.option(
    "--loads",
    type=int,
    default=BENCH.loads,
    show_default=True,
    help="Fresh loads timed for load, first-inference and swap figures.",
)
@click.option(
    "--inputs", "inputs_path", type=PATH, help="Inputs (.npz/.json); default: generated from the artifact's signature."
)
@click.option("--json", "as_json", is_flag=True, help="Print the full results (with per-run samples) as JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print one CSV row per artifact and variant.")
@click.option("--plot", type=PATH, help="Write the latency distributions to this PNG.")
@click.option(
    "--device",
    help="adb:SERIAL: an Android phone (see `adb devices`); qemu-arm64: instruction counts on the emulated "
    "arm64 device (`mntool device setup qemu-arm64`; --runs = inferences per counted round).",
)
@click.option("--benchmark-binary", type=PATH, help="With --device: LiteRT's benchmark_model built for the phone.")
def bench(
    artifacts: tuple[Path, ...],
    patches: tuple[Path, ...],
    device_id: str | None,
    runtime: str | None,
    threads: int,
    xnnpack: bool,
    graph_optimization: str,
    profile_name: str | None,
    runs: int,
    warmup: int,
    loads: int,
    inputs_path: Path | None,
    as_json: bool,
    as_csv: bool,
    plot: Path | None,
    device: str | None,
    benchmark_binary: Path | None,
) -> None:
    """Benchmark load, latency, memory and weight-swap time of compiled models.

    Each artifact is measured in a fresh worker process (under --profile if given): model load
    from file and from memory, first inference, steady-state latency (p50/p90/p99/min) and the
    timer's own overhead, peak RSS and size. With --patch: patch apply time, swap latency (patch
    bytes in hand -> first output with the new parameters) and patched/unpatched p50.

    \b
    Examples:
      mntool bench artifacts/model.tflite artifacts/model.onnx --plot latency.png
      mntool bench artifacts/model.tflite --patch p.mnpatch --runs 2000 --json > bench.json
      mntool bench artifacts/model.onnx --profile little-core --csv
      mntool bench artifacts/model.tflite --device adb:R58M123ABC --benchmark-binary ./benchmark_model
    """
    from device_runtime.bench import BenchError
    from device_runtime.runners import RunnerConfig

    if as_json and as_csv:
        raise BenchError("--json and --csv are exclusive")
    if patches and len(artifacts) != 1:
        raise BenchError("--patch needs exactly one ARTIFACT (a patch is built for one artifact)")
    if device == "qemu-arm64":
        _bench_on_qemu(artifacts, patches, inputs_path, runs, device_id, threads, xnnpack, graph_optimization, as_json)
        return
    if device:
        _bench_on_device(
            artifacts, patches, benchmark_binary, device, threads, xnnpack, runs, warmup, as_json, plot, device_id
        )
        return
    config = BenchConfig(
        runs=runs,
        warmup=warmup,
        loads=loads,
        runtime=runtime,
        device_id=device_id,
        runner=RunnerConfig(threads=threads, xnnpack=xnnpack, graph_optimization=graph_optimization),
    )
    reports = measure(list(artifacts), list(patches), inputs_path, config, profile_name)
    if plot:
        plot_latency(report_series(reports), plot, report_title(reports))
    if as_json:
        _echo_json([r.to_dict() for r in reports])
    elif as_csv:
        rows = [row for r in reports for row in r.rows()]
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        for r in reports:
            click.echo(describe(r))
    if plot and not as_json and not as_csv:
        click.echo(f"wrote {plot}")


def measure(
    artifacts: list[Path], patches: list[Path], inputs: Path | None, config: BenchConfig, profile_name: str | None
) -> list[BenchReport]:
    """Benchmark each artifact in its own worker process, with a progress bar on stderr."""
    from tqdm import tqdm

    from device_runtime.bench import benchmark_isolated
    from device_runtime.profiles import get_profile

    profile = get_profile(profile_name) if profile_name else None
    reports = []
    with tqdm(
        total=len(artifacts) * config.work_units(len(patches)),
        desc="bench",
        unit="run",
        file=sys.stderr,
        disable=None,
        leave=False,
    ) as bar:
        for artifact in artifacts:
            bar.set_postfix_str(artifact.name)
            reports.append(benchmark_isolated(artifact, patches, inputs, config, profile, progress=bar.update))
    return reports


def _ms(value: float) -> str:
    return f"{value * 1e3:.1f} us" if value < 1 else f"{value:.2f} ms"


def describe(r: BenchReport) -> str:
    """A human-readable summary of one report."""
    runner = r.config["runner"]
    engine = {
        "litert": f"XNNPACK {'on' if runner['xnnpack'] else 'off'}",
        "onnxruntime": f"graph opt {runner['graph_optimization']}",
    }.get(r.runtime, "")
    load = r.host.get("load_average_1min")
    lines = [
        f"{r.artifact}  [{r.runtime} {r.runtime_version}, {runner['threads']} thread(s), {engine}, "
        f"{r.artifact_bytes / 1e3:.1f} kB; host load average {load:.1f} on {r.host.get('cpu_count')} CPUs]"
    ]
    if r.profile:
        p = r.profile
        limit = f"{p['cpu_bandwidth']:.0%} CPU bandwidth" if p["bandwidth_applied"] else "no bandwidth limit"
        lines.append(f"  profile {p['profile']}: cpus {p['cpus']}, {limit}" + "".join(f"; {n}" for n in p["notes"]))
    L = r.latency
    lines += [
        f"  load       first in process {_ms(r.first_load_ms)} (runtime start-up), from file {_ms(r.load_file_ms)}, "
        f"from memory {_ms(r.load_memory_ms)}; first inference {_ms(r.first_inference_ms)}",
        f"  latency    p50 {_ms(L.p50_ms)}  p90 {_ms(L.p90_ms)}  p99 {_ms(L.p99_ms)}  min {_ms(L.min_ms)}  "
        f"mean {_ms(L.mean_ms)}  ({L.runs} runs)",
        f"  overhead   timer loop {r.timer_overhead_us:.2f} us per run ({r.overhead_ratio:.1%} of p50, not subtracted)",
        f"  memory     peak RSS {r.peak_rss_mb:.1f} MB ({r.rss_before_load_mb:.1f} MB before loading)",
    ]
    for p in r.patches:
        lines.append(
            f"  patch      {Path(p.patch).name}: apply {_ms(p.apply_ms)}, swap {_ms(p.swap_ms)} "
            f"({p.swap_vs_reference:.2f}x load-from-memory + first inference + verify), p50 {_ms(p.latency.p50_ms)} "
            f"({p.p50_ratio:.3f}x unpatched), outputs {'changed' if p.outputs_changed else 'UNCHANGED'}"
        )
    return "\n".join(lines)


def _bench_on_device(
    artifacts, patches, benchmark_binary, device, threads, xnnpack, runs, warmup, as_json, plot, device_id
) -> None:
    from device_runtime.adb import AdbError, DeviceBenchConfig, benchmark_on_device

    if benchmark_binary is None:
        raise AdbError("--device needs --benchmark-binary (LiteRT's benchmark_model built for the phone)")
    if plot:
        raise AdbError("--plot needs per-run samples, which benchmark_model does not report")
    config = DeviceBenchConfig(runs=runs, warmup=warmup, threads=threads, xnnpack=xnnpack, device_id=device_id)
    reports = [benchmark_on_device(a, list(patches), device, benchmark_binary, config) for a in artifacts]
    if as_json:
        _echo_json([r.to_dict() for r in reports])
        return
    for r in reports:
        click.echo(f"{r.artifact} on {r.model} ({r.abi}, {r.serial}), {threads} thread(s)")
        for v in r.variants:
            res = v.result
            std = f" +- {res.steady.std_us / 1e3:.3f}" if res.steady else ""
            click.echo(
                f"  {Path(v.variant).name}: init {res.init_us / 1e3:.2f} ms, first inference "
                f"{(res.first_inference_us or 0) / 1e3:.3f} ms, steady {res.inference_avg_us / 1e3:.3f}{std} ms"
            )


def _bench_on_qemu(artifacts, patches, inputs, runs, device_id, threads, xnnpack, graph_optimization, as_json) -> None:
    from device_runtime import qemu

    runner = {"threads": threads, "xnnpack": xnnpack, "graph_optimization": graph_optimization}
    explicit = click.get_current_context().get_parameter_source("runs") != click.core.ParameterSource.DEFAULT
    runs = runs if explicit else qemu.QemuBenchConfig.runs  # counts are exact: 20 inferences x 3 rounds suffice
    config = qemu.QemuBenchConfig(runs=runs, device_id=device_id, runner=runner)
    reports = [qemu.bench(a, list(patches), inputs, config) for a in artifacts]
    if as_json:
        _echo_json(reports)
    else:
        click.echo("\n".join(qemu.describe(r) for r in reports))
