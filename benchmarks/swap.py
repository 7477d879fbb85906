"""Swap figures: patch bytes in hand -> first output with the new parameters (`HotSwap`: verify,
write the patch into the idle in-memory slot, new interpreter/session, first run), against the
reference measured in the same run, interleaved: a cold load of the artifact from memory + first
run, plus the patch's own verification alone. Target: swap <= 1.1x that reference. For ExecuTorch
the cold load is ExecuTorch's own way to change weights: load the program with a new `.ptd`.

On the default SASRec device model (MovieLens-100k vocabulary) and the large variant that
`benchmarks/compare.py` uses, exported to LiteRT and ONNX Runtime, 1 thread, in a fresh worker
process per artifact (`device_runtime.bench.benchmark_isolated`, as `mntool bench` runs).

    .venv/bin/python benchmarks/swap.py [--loads 60] [--runs 500] [--json]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np
import torch
from compare import MODELS, _inputs

from device_runtime import weight_map as wmap
from device_runtime.bench import BenchConfig, benchmark_isolated
from exporters import export
from exporters.targets import get
from mntool.models import build_model
from mntool.patches import build_patch

TARGETS = ("tflite", "onnx", "executorch")  # executorch: when installed (the peers extra)


def exported(root: Path, name: str, target: str) -> Path:
    n_items, config = MODELS[name]
    torch.manual_seed(0)
    model = build_model("sasrec", n_items, config).eval()
    return export(model, _inputs(model, n_items), model.adaptive_names(), target, root / f"{name}-{target}")


def patch_for(artifact: Path) -> Path:
    wm = wmap.load(artifact)
    rng = np.random.default_rng(1)
    params = {t.name: rng.normal(0.0, 0.3, t.shape).astype(np.float32) for t in wm.tensors}
    path = artifact.with_name(artifact.name + ".p1.mnpatch")
    path.write_bytes(build_patch(artifact, params))
    return path


@click.command()
@click.option("--loads", default=60, show_default=True, help="Load/swap cycles timed (medians).")
@click.option("--runs", default=500, show_default=True, help="Steady-state runs (not the point here; kept small).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def main(loads: int, runs: int, as_json: bool) -> None:
    """Measure the in-memory swap against a cold load + first run + the patch's verification."""
    config = BenchConfig(runs=runs, loads=loads, warmup=50, rounds=5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            for target in (t for t in TARGETS if get(t).converter_available()):
                artifact = exported(Path(tmp), name, target)
                report = benchmark_isolated(artifact, [patch_for(artifact)], config=config)
                p = report.patches[0]
                rows.append(
                    {
                        "model": name,
                        "runtime": report.runtime,
                        "artifact_bytes": report.artifact_bytes,
                        "patch_bytes": p.patch_bytes,
                        "cold_start_memory_ms": report.cold_start_memory_ms,
                        "verify_ms": p.verify_ms,
                        "swap_ms": p.swap_ms,
                        "swap_vs_reference": p.swap_vs_reference,
                        "swap_vs_cold_start": p.swap_vs_cold_start,
                        "copying_apply_ms": p.apply_ms,
                    }
                )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(
        f"{'model':>8} {'runtime':>12} {'artifact':>10} {'patch':>8} {'cold start':>10} {'verify':>8} "
        f"{'swap':>8} {'swap/(cold+verify)':>19}"
    )
    for r in rows:
        click.echo(
            f"{r['model']:>8} {r['runtime']:>12} {r['artifact_bytes']:>10} {r['patch_bytes']:>8} "
            f"{r['cold_start_memory_ms']:>8.3f}ms {r['verify_ms']:>6.3f}ms {r['swap_ms']:>6.3f}ms "
            f"{r['swap_vs_reference']:>18.2f}x"
        )


if __name__ == "__main__":
    main()
