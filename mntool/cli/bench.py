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
from device_runtime.ranking import RankingForm
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
@click.option(
    "--threshold",
    "thresholds",
    type=float,
    multiple=True,
    help="Staged artifacts: answer at the first early exit whose max softmax probability reaches this "
    "(one value, or one per early exit, repeated); default: run every stage.",
)
@click.option("--all-exits", is_flag=True, help="Staged artifacts: run every stage and print every exit's logits.")
def run(
    artifact: Path,
    inputs_path: Path,
    output: Path | None,
    runtime: str | None,
    threads: int,
    xnnpack: bool,
    as_json: bool,
    device: str | None,
    thresholds: tuple[float, ...],
    all_exits: bool,
) -> None:
    """Run one inference of ARTIFACT (.tflite, .onnx; .mlpackage on macOS), or of a staged
    early-exit artifact (a NAME.TARGET.stages directory from `mntool export`).

    Inputs are cast to the artifact's dtypes when that loses nothing (int64 ids -> int32);
    a lossy cast is an error. A staged artifact takes images (the array named `images`, or the
    file's only array: one image or a batch; 0..255 integer pixels or floats in [0, 1]) and, per
    image, runs its stages in order until an exit is confident enough (--threshold), printing
    the exit used and its logits.

    \b
    Example:
      echo '{"history": [[0, 0, 12, 7, 301]], "target": [42]}' > in.json
      mntool run artifacts/model.tflite --inputs in.json --json
      mntool run artifacts/model.onnx --inputs in.npz -o out.npz
      mntool run artifacts/model.tflite.stages --inputs digits.npz --threshold 0.9
      mntool run artifacts/model.tflite.stages --inputs digits.npz --threshold 0.8 --threshold 0.95 --json
      mntool run artifacts/model.tflite.stages --inputs digits.npz --all-exits
    """
    from device_runtime.runners import RunnerConfig, load_inputs, run_artifact
    from device_runtime.staged import StagedError, is_staged

    if is_staged(artifact):
        if device:
            raise StagedError("staged artifacts run on this host (--device takes a single artifact)")
        _run_staged(
            artifact,
            inputs_path,
            output,
            runtime,
            RunnerConfig(threads=threads, xnnpack=xnnpack),
            as_json,
            thresholds,
            all_exits,
        )
        return
    if thresholds or all_exits:
        raise StagedError("--threshold and --all-exits apply to staged artifacts (NAME.TARGET.stages directories)")
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


def _run_staged(
    artifact: Path,
    inputs_path: Path,
    output: Path | None,
    runtime: str | None,
    config: RunnerConfig,
    as_json: bool,
    thresholds: tuple[float, ...],
    all_exits: bool,
) -> None:
    """`mntool run` on a staged artifact: early exit per image, or every exit (--all-exits)."""
    from device_runtime.exit_policy import confidence as max_softmax
    from device_runtime.staged import StagedError, StagedRunner, load_images

    if all_exits and thresholds:
        raise StagedError("--all-exits runs every stage; it takes no --threshold")
    with StagedRunner(artifact, config=config, runtime=runtime) as runner:
        images = load_images(inputs_path, runner.input.name)
        chunks, n, _ = runner.prepare(images)
        batch = np.concatenate(chunks)[:n]
        if all_exits:
            exits = runner.run_all(batch)
        else:
            th = runner.thresholds(thresholds) if thresholds else (float("inf"),) * runner.last
            answers = [runner.classify_prepared(runner.prepare(batch[i : i + 1])[0][0], th) for i in range(n)]
    if all_exits:
        arrays = {f"{name}_{k}": out[name] for k, out in enumerate(exits) for name in ("logits", "embedding")}
        if output:
            np.savez(output, **arrays)
        if as_json:
            _echo_json(
                {
                    "exits": [
                        {
                            "exit": k,
                            "logits": out["logits"].tolist(),
                            "max_softmax": max_softmax(out["logits"]).tolist(),
                        }
                        for k, out in enumerate(exits)
                    ]
                }
            )
        elif output:
            click.echo(f"wrote {output} ({', '.join(f'{n}: {v.dtype} {v.shape}' for n, v in arrays.items())})")
        else:
            for k, out in enumerate(exits):
                click.echo(
                    f"exit {k} logits {out['logits'].dtype} {out['logits'].shape}: "
                    f"{np.array2string(out['logits'], precision=6)}"
                )
        return
    logits = np.stack([a[0] for a in answers])
    used = np.array([a[1] for a in answers], dtype=np.int32)
    confidence = max_softmax(logits)
    if output:
        np.savez(output, logits=logits, exit=used)
    if as_json:
        _echo_json(
            {
                "thresholds": list(th) if thresholds else None,
                "exit": used.tolist(),
                "max_softmax": confidence.tolist(),
                "logits": logits.tolist(),
            }
        )
    elif output:
        click.echo(f"wrote {output} (logits: {logits.dtype} {logits.shape}, exit: {used.dtype} {used.shape})")
    else:
        last = runner.last
        for i in range(n):
            click.echo(
                f"image {i}: exit {used[i]} of {last} ({'early' if used[i] < last else 'last'}; max softmax "
                f"{confidence[i]:.4f}), class {int(np.argmax(logits[i]))}, logits "
                f"{np.array2string(logits[i], precision=6)}"
            )


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
@click.option(
    "--threshold",
    "thresholds",
    type=float,
    multiple=True,
    help="Staged artifacts: also stream inputs through the early-exit path at this max-softmax threshold "
    "(one value, or one per early exit, repeated): mean latency per input, exit rates, ratio to every stage.",
)
@click.option(
    "--stream",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Staged artifacts with --threshold and no --inputs: random images in the stream.",
)
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
    thresholds: tuple[float, ...],
    stream: int,
) -> None:
    """Benchmark load, latency, memory and weight-swap time of compiled models.

    Each artifact is measured in a fresh worker process (under --profile if given): model load
    from file and from memory, first inference, steady-state latency (p50/p90/p99/min) and the
    timer's own overhead, peak RSS and size. With --patch: patch apply time, swap latency (patch
    bytes in hand -> first output with the new parameters) and patched/unpatched p50.

    A staged early-exit artifact (a NAME.TARGET.stages directory) reports each stage's latency alone
    and each exit path's (stages 0..k); with --threshold, the mean latency per input of the
    early-exit path over a stream of images (--inputs, else --stream random ones), the rate of
    each exit and the ratio to running every stage on the same images.

    \b
    Examples:
      mntool bench artifacts/model.tflite artifacts/model.onnx --plot latency.png
      mntool bench artifacts/model.tflite --patch p.mnpatch --runs 2000 --json > bench.json
      mntool bench artifacts/model.onnx --profile little-core --csv
      mntool bench artifacts/model.tflite --device adb:R58M123ABC --benchmark-binary ./benchmark_model
      mntool bench artifacts/model.tflite.stages --threshold 0.9 --inputs digits.npz
    """
    from device_runtime.bench import BenchError
    from device_runtime.runners import RunnerConfig
    from device_runtime.staged import is_staged

    if as_json and as_csv:
        raise BenchError("--json and --csv are exclusive")
    staged = [is_staged(a) for a in artifacts]
    if any(staged):
        if not all(staged):
            raise BenchError("benchmark staged artifacts (.stages directories) and single artifacts separately")
        refused = [
            flag
            for flag, given in (("--patch", patches), ("--device", device), ("--csv", as_csv), ("--plot", plot))
            if given
        ]
        if refused:
            raise BenchError(f"{', '.join(refused)} not supported for staged artifacts")
        config = BenchConfig(
            runs=runs,
            warmup=warmup,
            loads=loads,
            runtime=runtime,
            runner=RunnerConfig(threads=threads, xnnpack=xnnpack, graph_optimization=graph_optimization),
        )
        staged_reports = measure_staged(list(artifacts), inputs_path, config, profile_name, thresholds or None, stream)
        if as_json:
            _echo_json([r.to_dict() for r in staged_reports])
        else:
            click.echo("\n".join(describe_staged(r) for r in staged_reports))
        return
    if thresholds:
        raise BenchError("--threshold applies to staged artifacts (NAME.TARGET.stages directories)")
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


def measure_staged(
    artifacts: list[Path],
    inputs: Path | None,
    config: BenchConfig,
    profile_name: str | None,
    thresholds: tuple[float, ...] | None,
    stream: int,
) -> list:
    """Benchmark each staged artifact in its own worker process, with a progress bar on stderr."""
    from tqdm import tqdm

    from device_runtime.profiles import get_profile
    from device_runtime.staged import bench_staged_isolated, bench_work_units, load_images, load_staged

    profile = get_profile(profile_name) if profile_name else None
    reports = []
    for artifact in artifacts:
        staged = load_staged(artifact)
        streamed = None
        if thresholds:
            streamed = len(load_images(inputs, staged.input_spec(0).name)) if inputs else stream
        units = bench_work_units(config, staged.n_exits, streamed)
        with tqdm(
            total=units, desc=f"bench {artifact.name}", unit="run", file=sys.stderr, disable=None, leave=False
        ) as bar:
            reports.append(
                bench_staged_isolated(
                    artifact,
                    config,
                    thresholds=list(thresholds) if thresholds else None,
                    inputs=inputs,
                    stream=stream,
                    profile=profile,
                    progress=bar.update,
                )
            )
    return reports


def describe_staged(r) -> str:
    """A human-readable summary of one staged benchmark (`device_runtime.staged.StagedBenchReport`)."""
    runner, engine, load = _setting(r)
    lines = [
        f"{r.artifact}  [staged, {len(r.stages)} stages; {r.runtime} {r.runtime_version}, {runner['threads']} "
        f"thread(s), {engine}, batch {r.batch}; host load average {load:.1f} on {r.host.get('cpu_count')} CPUs]"
    ] + _profile_lines(r)
    for k, (name, L) in enumerate(zip(r.stage_artifacts, r.stages)):
        lines.append(f"  stage {k}     {name}: p50 {_ms(L.p50_ms)}  p99 {_ms(L.p99_ms)}  ({L.runs} runs)")
    for k, L in enumerate(r.paths):
        lines.append(
            f"  exit {k}      stages 0..{k}: p50 {_ms(L.p50_ms)}  p99 {_ms(L.p99_ms)}  "
            f"({L.p50_ms / r.paths[-1].p50_ms:.2f}x every stage)"
        )
    lines.append(f"  overhead   timer loop {r.timer_overhead_us:.2f} us per run (not subtracted)")
    st = r.stream
    if st:
        rates = ", ".join(f"exit {k} {rate:.0%}" for k, rate in enumerate(st.exit_rates))
        lines.append(
            f"  early exit thresholds {st.thresholds} over {st.inputs} inputs ({st.source}, {st.passes} pass(es)): "
            f"mean {_ms(st.mean_ms)} per input vs {_ms(st.all_stages_mean_ms)} every stage ({st.ratio:.2f}x); {rates}"
        )
    return "\n".join(lines)


def _setting(r) -> tuple[dict, str, float]:
    """(runner config, the runtime's engine setting in words, host load) of a bench report."""
    runner = r.config["runner"]
    engine = {
        "litert": f"XNNPACK {'on' if runner['xnnpack'] else 'off'}",
        "onnxruntime": f"graph opt {runner['graph_optimization']}",
    }.get(r.runtime, "")
    return runner, engine, r.host.get("load_average_1min")


def _profile_lines(r) -> list[str]:
    if not r.profile:
        return []
    p = r.profile
    limit = f"{p['cpu_bandwidth']:.0%} CPU bandwidth" if p["bandwidth_applied"] else "no bandwidth limit"
    return [f"  profile {p['profile']}: cpus {p['cpus']}, {limit}" + "".join(f"; {n}" for n in p["notes"])]


def _ms(value: float) -> str:
    return f"{value * 1e3:.1f} us" if value < 1 else f"{value:.2f} ms"


def describe(r: BenchReport) -> str:
    """A human-readable summary of one report."""
    runner, engine, load = _setting(r)
    lines = [
        f"{r.artifact}  [{r.runtime} {r.runtime_version}, {runner['threads']} thread(s), {engine}, "
        f"{r.artifact_bytes / 1e3:.1f} kB; host load average {load:.1f} on {r.host.get('cpu_count')} CPUs]"
    ] + _profile_lines(r)
    L = r.latency
    lines += [
        f"  load       first in process {_ms(r.first_load_ms)} (runtime start-up), from file {_ms(r.load_file_ms)}, "
        f"from memory {_ms(r.load_memory_ms)}; first inference {_ms(r.first_inference_ms)}",
        f"  latency    p50 {_ms(L.p50_ms)}  p90 {_ms(L.p90_ms)}  p99 {_ms(L.p99_ms)}  min {_ms(L.min_ms)}  "
        f"mean {_ms(L.mean_ms)}  ({L.runs} runs)",
        f"  overhead   timer loop {r.timer_overhead_us:.2f} us per run ({r.overhead_ratio:.1%} of p50, not subtracted)",
    ]
    if r.ranking:
        form = RankingForm.from_dict(r.ranking["form"])
        lines.append(
            f"  request    p50 {_ms(r.ranking['p50_ms'])}  p99 {_ms(r.ranking['p99_ms'])} per ranking request of "
            f"{form.candidates} candidates ({form.describe()})"
        )
    lines += [
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
