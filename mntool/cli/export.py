"""`mntool export`: compile a trained checkpoint's device model; thin over `exporters.export`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from exporters.options import PRECISIONS
from exporters.targets import TARGETS


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--target",
    type=click.Choice([*TARGETS, "all"]),
    default="all",
    show_default=True,
    help="Format to compile to; all = one artifact per format, side by side.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory for the artifacts."
)
@click.option(
    "--name", default="model", show_default=True, help="Artifact file stem (NAME.tflite, NAME.onnx, NAME.mlpackage)."
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=None,
    help="Static batch size of the artifact's inputs: histories per call in the candidate form [1], rows "
    "per call in the row form [one ranking request's candidates], images per call [1].",
)
@click.option(
    "--candidates",
    type=click.IntRange(min=1),
    default=None,
    help="Recommenders: candidates of one ranking request [the protocol's: 100].",
)
@click.option(
    "--rows",
    is_flag=True,
    help="Recommenders: the row form (history (B, L), target (B,), one row per candidate, the history "
    "re-encoded for each) instead of the candidate form (history (B, L), target (B, C)).",
)
@click.option(
    "--adaptive-as-inputs",
    is_flag=True,
    help="Adaptive tensors become model inputs (fed from NAME.<ext>.adaptive.bin) instead of swappable buffers.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="float32",
    show_default=True,
    help="Weight precision: float16 / int8 (int8 weights, float activations) quantise the frozen weights with "
    "each target's own tool, the adaptive tensors stay float (docs/quantization.md); a target that does not export "
    "it is an error (with --target all it exports float32).",
)
@click.option(
    "--no-verify", is_flag=True, help="Skip the export-time proof (patch fresh values, compare with PyTorch)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per artifact (a list) on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def export(
    checkpoint, target, out, name, batch, candidates, rows, adaptive_as_inputs, precision, no_verify, as_json, quiet
):
    """Compile CHECKPOINT's device model (static parameters) with swappable adaptive tensors.

    CHECKPOINT is a directory written by `mntool train --out`. A recommender compiles in the
    candidate form by default: one call scores one ranking request (history (1, L), target
    (1, 100) -> logits (1, 100)), encoding the history once; --rows keeps the row form (one row
    per candidate). The weight map records the form (`form`), which `mntool run` / `bench` and
    device_runtime.ranking read. Each artifact gets a weight map
    beside it (NAME.<ext>.weightmap.json: where every adaptive tensor's bytes are) and is proven
    at export: fresh values patched through the weight map must reproduce PyTorch (max abs error
    <= 1e-5 + 1e-6 x the largest |output|; Core ML is read back with coremltools off macOS).

    An early-exit checkpoint (`mntool train --method exits`) exports as a staged artifact per
    target: NAME.TARGET.stages/, one artifact per stage (each with its weight map and proof) and a
    manifest, stages.json; `mntool run` and `mntool bench` take the directory.

    \b
    Examples:
      mntool export runs/sasrec --target all --out artifacts/          # candidate form, 100 candidates
      mntool export runs/sasrec --target tflite --candidates 500 --out artifacts/
      mntool export runs/sasrec --target tflite --rows --out artifacts/rows/   # one row per candidate
      mntool export runs/sasrec --target coreml --precision float16 --out artifacts/
      mntool export runs/sasrec --target tflite --adaptive-as-inputs --out artifacts/ --json
      mntool export runs/mnist-exits --target tflite --out artifacts/   # artifacts/model.tflite.stages/
    """
    from exporters import export as run_export
    from exporters.report import summarize
    from exporters.targets import declarations
    from mntool.train import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    example, form = ckpt.export_inputs(batch=batch, candidates=candidates, layout="rows" if rows else None)
    if target == "all":  # every target this machine can export these options to; the others are named
        chosen = [d for d in declarations() if d.converter_available() and (d.inputs_mode or not adaptive_as_inputs)]
        skipped = [d.name for d in declarations() if d not in chosen]
        if skipped and not quiet:
            click.echo(
                f"skipping {', '.join(skipped)} (converter not installed, or no --adaptive-as-inputs mode)", err=True
            )
    else:
        chosen = [d for d in declarations() if d.name == target]
    staged = hasattr(ckpt.model, "stages")  # an early-exit model: one artifact per stage
    summaries = []
    for decl in chosen:
        if staged:
            summary, text = _export_staged(
                ckpt,
                decl,
                out,
                example,
                name=name,
                verify=not no_verify,
                adaptive_as_inputs=adaptive_as_inputs,
                precision=precision if precision in decl.precisions or target != "all" else "float32",
                progress=not quiet,
            )
            summaries.append(summary)
            if not as_json:
                click.echo(text)
            continue
        artifact = run_export(
            ckpt.model,
            example,
            ckpt.adaptive,
            decl.name,
            out,
            name=name,
            verify=not no_verify,
            adaptive_as_inputs=adaptive_as_inputs,
            precision=precision if precision in decl.precisions or target != "all" else "float32",
            output_names=("logits",),
            form=form,
            progress=not quiet,
        )
        summaries.append(summarize(artifact))
        if not as_json:
            click.echo(summaries[-1].line())
    if as_json:
        click.echo(json.dumps([s if isinstance(s, dict) else s.to_dict() for s in summaries], indent=2))


def _export_staged(ckpt, decl, out: Path, example: tuple, **options) -> tuple[dict, str]:
    """Export an early-exit checkpoint's model as a staged artifact: its summary (one entry per
    stage) and the lines that say so."""
    from device_runtime.staged import MANIFEST, load_staged
    from exporters import export_staged
    from exporters.report import summarize

    path = export_staged(ckpt.model, example, decl.name, out, **options)
    staged = load_staged(path)
    stages = [summarize(staged.artifact(k)) for k in range(len(staged.stages))]
    summary = {
        "target": decl.name,
        "artifact": str(path),
        "staged": True,
        "n_exits": staged.n_exits,
        "manifest": str(path / MANIFEST),
        "total_bytes": sum(s.total_bytes for s in stages),
        "adaptive_bytes": sum(s.adaptive_bytes for s in stages),
        "stages": [s.to_dict() for s in stages],
    }
    lines = [
        f"{decl.name}: {path} (staged early-exit artifact: {len(stages)} stages, one exit each, "
        f"{summary['total_bytes'] / 1024:.1f} KiB; manifest {MANIFEST})"
    ]
    lines += [f"  stage {k}: {s.line()}" for k, s in enumerate(stages)]
    return summary, "\n".join(lines)
