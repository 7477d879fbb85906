"""Instruction counts of the default SASRec on the emulated arm64 device (Cortex-A76 under
qemu-aarch64; `mntool device setup qemu-arm64` first): LiteRT and ONNX Runtime, unpatched and
patched, load and swap, parity with the host, repeated in separate guest processes.

Exports the default model as `benchmarks/swap.py` does (same seed, same patch), then runs
`device_runtime.qemu.bench` `--repeats` times per runtime (each run a fresh qemu process).

    .venv/bin/python benchmarks/arm64_counts.py [--repeats 3] [--runs 20] [--json]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
from swap import exported, patch_for

from device_runtime import qemu

TARGETS = ("tflite", "onnx")


@click.command()
@click.option("--repeats", default=3, show_default=True, help="Separate guest runs per runtime.")
@click.option("--runs", default=qemu.QemuBenchConfig.runs, show_default=True, help="Inferences per counted round.")
@click.option("--json", "as_json", is_flag=True, help="Print the full reports as JSON.")
def main(repeats: int, runs: int, as_json: bool) -> None:
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in TARGETS:
            artifact = exported(Path(tmp), "default", target)
            patch = patch_for(artifact)
            for _ in range(repeats):
                reports.append(qemu.bench(artifact, [patch], config=qemu.QemuBenchConfig(runs=runs)))
    if as_json:
        click.echo(json.dumps(reports, indent=2))
        return
    click.echo(
        "| runtime | run | instr/inference unpatched | patched (ratio) | SIMD/FP | load from memory | "
        "first inference | swap | max abs err vs host (unpatched, patched) |"
    )
    click.echo("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(reports):
        b, p = r["unpatched"], r["patches"][0]
        click.echo(
            f"| {r['runtime']} {r['runtime_version']} | {i % repeats + 1} | {b['instructions_per_inference']:,.0f} | "
            f"{p['instructions_per_inference']:,.0f} ({p['ratio_to_unpatched']:.5f}) | {b['simd_fp_share']:.1%} | "
            f"{r['load']['from_memory_instructions']:,} | {r['load']['first_inference_instructions']:,} | "
            f"{p['swap_instructions']:,} | {b['max_abs_error_vs_host']:.2g}, {p['max_abs_error_vs_host']:.2g} |"
        )
    e = reports[0]["emulator"]
    click.echo(f"\nqemu-aarch64 {e['qemu']} -cpu {e['cpu']}; guest wheels {reports[0]['guest']['wheels']}")


if __name__ == "__main__":
    main()
