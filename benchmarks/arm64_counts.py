"""Instruction counts of the shipped device models on the emulated arm64 device (Cortex-A76
under qemu-aarch64; `mntool device setup qemu-arm64` first): LiteRT and ONNX Runtime, unpatched
and patched, load and swap, parity with the host, repeated in separate guest processes.

Models: the three backbones at their defaults on the MovieLens-100k vocabulary (`sasrec`, the
default device model, exported as `benchmarks/swap.py` does; `gru4rec`; `din`) and the large
SASRec of `benchmarks/compare.py` (`sasrec-large`, the largest model the project ships figures
for). Runs `device_runtime.qemu.bench` `--repeats` times per model and runtime (each run a fresh
qemu process).

    .venv/bin/python benchmarks/arm64_counts.py [--models NAME ...] [--repeats 3] [--runs 20] [--json]
    .venv/bin/python benchmarks/arm64_counts.py --models sasrec --models gru4rec --models din --models sasrec-large --repeats 1
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import torch
from compare import ML100K_ITEMS, MODELS, _inputs
from swap import exported, patch_for

from device_runtime import qemu
from exporters import export
from mntool.models import build_model

TARGETS = ("tflite", "onnx")
SHIPPED = ("sasrec", "gru4rec", "din", "sasrec-large")


def shipped(root: Path, name: str, target: str) -> Path:
    if name == "sasrec":
        return exported(root, "default", target)
    if name == "sasrec-large":
        return exported(root, "large", target)
    torch.manual_seed(0)
    model = build_model(name, ML100K_ITEMS, MODELS["default"][1]).eval()
    return export(model, _inputs(model, ML100K_ITEMS), model.adaptive_names(), target, root / f"{name}-{target}")


@click.command()
@click.option("--models", multiple=True, type=click.Choice(SHIPPED), default=("sasrec",), show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Separate guest runs per model and runtime.")
@click.option("--runs", default=qemu.QemuBenchConfig.runs, show_default=True, help="Inferences per counted round.")
@click.option("--json", "as_json", is_flag=True, help="Print the full reports as JSON.")
def main(models: tuple[str, ...], repeats: int, runs: int, as_json: bool) -> None:
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for target in TARGETS:
                artifact = shipped(Path(tmp), name, target)
                patch = patch_for(artifact)
                for _ in range(repeats):
                    report = qemu.bench(artifact, [patch], config=qemu.QemuBenchConfig(runs=runs))
                    reports.append({"model": name, **report})
    if as_json:
        click.echo(json.dumps(reports, indent=2))
        return
    click.echo(
        "| model | runtime | run | instr/inference unpatched | patched (ratio) | SIMD/FP | load from memory | "
        "first inference | swap | max abs err vs host (unpatched, patched) |"
    )
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(reports):
        b, p = r["unpatched"], r["patches"][0]
        click.echo(
            f"| {r['model']} | {r['runtime']} {r['runtime_version']} | {i % repeats + 1} | {b['instructions_per_inference']:,.0f} | "
            f"{p['instructions_per_inference']:,.0f} ({p['ratio_to_unpatched']:.5f}) | {b['simd_fp_share']:.1%} | "
            f"{r['load']['from_memory_instructions']:,} | {r['load']['first_inference_instructions']:,} | "
            f"{p['swap_instructions']:,} | {b['max_abs_error_vs_host']:.2g}, {p['max_abs_error_vs_host']:.2g} |"
        )
    e = reports[0]["emulator"]
    click.echo(f"\nqemu-aarch64 {e['qemu']} -cpu {e['cpu']}; guest wheels {reports[0]['guest']['wheels']}")


if __name__ == "__main__":
    main()
