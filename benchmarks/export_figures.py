"""Export figures for the default SASRec device model (ML-100k item count), per target.

1. Export time: the first export in this process (converter imports included) and the median of
   warm exports, each also as a ratio to `torch.export.export` of the same model in this run.
2. Artifact size, adaptive bytes and their fraction; the proof's max abs error (base and fresh).
3. Latency cost of `--adaptive-as-inputs`: median per-inference time of the inputs artifact over
   the buffers artifact (TFLite with XNNPACK, ONNX Runtime; 1 thread; every input set on every
   call, as `device_runtime` runners do), interleaved in rounds, for the default head and a wide one.

    .venv/bin/python benchmarks/export_figures.py [--json] [--repeats 3] [--runs 2000]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from device_runtime import weight_map as weight_maps
from device_runtime.bench import empty_call, generate_inputs, time_interleaved
from device_runtime.runners import open_runner
from exporters import TARGETS, export
from exporters.report import summarize
from mntool.models import BackboneConfig, build_model

N_ITEMS_ML100K = 1682  # items after the ts-v1 protocol (docs/data-protocol.md)
HEADS = {"default head": BackboneConfig(), "wide head (96x1024)": BackboneConfig(head_hidden=1024)}


def sasrec(config: BackboneConfig) -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    model = build_model("sasrec", N_ITEMS_ML100K, config).eval()
    history = torch.randint(1, N_ITEMS_ML100K + 1, (1, config.max_history))
    history[:, :10] = 0
    return model, (history, torch.randint(1, N_ITEMS_ML100K + 1, (1,)))


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def export_figures(out: Path, repeats: int) -> list[dict]:
    model, example = sasrec(BackboneConfig())
    adaptive = model.adaptive_names()
    reference = statistics.median(seconds(lambda: torch.export.export(model, example)) for _ in range(3))
    rows = []
    for target in TARGETS:
        artifact = {}

        def once():
            artifact["path"] = export(model, example, adaptive, target, out, output_names=("logits",))

        first = seconds(once)
        warm = statistics.median(seconds(once) for _ in range(repeats))
        summary = summarize(artifact["path"])
        rows.append(
            {
                "target": target,
                "first_export_s": first,
                "export_s": warm,
                "torch_export_s": reference,
                "export_over_torch_export": warm / reference,
                **summary.to_dict(),
            }
        )
    return rows


def latency_figures(out: Path, runs: int, rounds: int) -> list[dict]:
    rows = []
    for label, config in HEADS.items():
        model, example = sasrec(config)
        for target in ("tflite", "onnx"):
            calls, artifacts = {}, {}
            for mode in ("buffers", "inputs"):
                artifact = export(
                    model,
                    example,
                    model.adaptive_names(),
                    target,
                    out / label.split()[0] / mode,
                    adaptive_as_inputs=mode == "inputs",
                    verify=False,
                )
                runner = open_runner(artifact, weight_map=weight_maps.load(artifact))
                arrays = runner.prepare(generate_inputs(runner.free_inputs, N_ITEMS_ML100K + 1))
                calls[mode] = lambda runner=runner, arrays=arrays: runner.invoke(arrays)
                artifacts[mode] = summarize(artifact)
            calls["timer"] = empty_call
            for call in calls.values():
                for _ in range(50):
                    call()
            samples = time_interleaved(calls, runs, rounds)
            med = {name: statistics.median(s) * 1000 for name, s in samples.items()}  # microseconds
            rows.append(
                {
                    "head": label,
                    "target": target,
                    "adaptive_bytes": artifacts["buffers"].adaptive_bytes,
                    "buffers_us": med["buffers"],
                    "inputs_us": med["inputs"],
                    "timer_us": med["timer"],
                    "inputs_over_buffers": (med["inputs"] - med["timer"]) / (med["buffers"] - med["timer"]),
                }
            )
    return rows


def print_tables(exports: list[dict], latency: list[dict]) -> None:
    click.echo(
        "| target | first export (s) | warm export (s) | / torch.export | artifact (KiB) | adaptive (KiB) "
        "| adaptive share | proof max abs err (fresh / base) | proof |"
    )
    click.echo("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in exports:
        p = r["proof"]
        click.echo(
            f"| {r['target']} | {r['first_export_s']:.1f} | {r['export_s']:.2f} | {r['export_over_torch_export']:.1f}x "
            f"| {r['total_bytes'] / 1024:.1f} | {r['adaptive_bytes'] / 1024:.1f} | {100 * r['adaptive_fraction']:.2f}% "
            f"| {p['max_abs_error']:.1e} / {p['base_max_abs_error']:.1e} | {p['method']} ({p['runtime'].split(' (')[0]}) |"
        )
    click.echo("")
    click.echo("| head | runtime | adaptive (KiB) | buffers (us) | inputs (us) | inputs / buffers |")
    click.echo("|---|---|---:|---:|---:|---:|")
    for r in latency:
        click.echo(
            f"| {r['head']} | {r['target']} | {r['adaptive_bytes'] / 1024:.1f} | {r['buffers_us']:.1f} "
            f"| {r['inputs_us']:.1f} | {r['inputs_over_buffers']:.2f}x |"
        )


@click.command()
@click.option("--repeats", default=3, show_default=True, help="Warm exports per target (median).")
@click.option("--runs", default=2000, show_default=True, help="Timed inferences per variant.")
@click.option("--rounds", default=20, show_default=True, help="Interleaving rounds for the latency figures.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of tables.")
def main(repeats: int, runs: int, rounds: int, as_json: bool) -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        exports = export_figures(Path(tmp) / "export", repeats)
        latency = latency_figures(Path(tmp) / "latency", runs, rounds)
    host = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}
    if as_json:
        click.echo(json.dumps({"host": host, "export": exports, "latency": latency}, indent=2))
    else:
        print_tables(exports, latency)


if __name__ == "__main__":
    main()
