"""`mntool demo`: the whole cloud -> device loop on MovieLens-100k; thin over `mntool.demo.run_demo`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import click


@click.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Directory for checkpoints, artifacts, patches and the report (reused by later runs).",
)
@click.option("--quick", is_flag=True, help="Smoke-test settings: 120 training users, 1 epoch each, 24 scored users.")
@click.option(
    "--fresh",
    is_flag=True,
    help="Retrain and re-export instead of reusing OUT's caches (the verified data cache stays).",
)
@click.option(
    "--users",
    type=click.IntRange(min=0),
    default=None,
    help="Device users to personalise and score with the compiled models [default: 200; --quick: 24; 0 = all].",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, path_type=Path),
    help="MovieLens files (u.data or RecBole .inter) [default: the fetched cache, fetched if missing].",
)
@click.option("--json", "as_json", is_flag=True, help="Print report.json on stdout (progress still goes to stderr).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def demo(out, quick, fresh, users, data_dir, as_json, quiet):
    """Run the whole loop and write OUT/report.md (+ report.json, PNGs).

    Fetch MovieLens-100k, train the static and MetaNetwork SASRec device models, export the
    device model to TFLite, ONNX and Core ML with swappable adaptive buffers, generate a signed
    patch per sampled device user from its recent samples, apply it on the device side, score
    the user's test-period interactions with the compiled models (Core ML: read back with
    coremltools on Linux), benchmark load / latency / swap, and report. A re-run reuses the
    checkpoints and artifacts whose inputs did not change.

    \b
    Examples:
      mntool demo                      # what `make demo` runs; training takes most of the time
      mntool demo --quick --out /tmp/demo-smoke
      mntool demo --users 0 --out demo-all --json > report.json
    """
    from mntool.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if quick else DemoConfig()
    if users is not None:
        config = dataclasses.replace(config, users=users)
    with contextlib.redirect_stdout(sys.stderr):  # trainers and converters print; stdout is for the result
        result = run_demo(out, quick=quick, fresh=fresh, data_dir=data_dir, progress=not quiet, config=config)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for c in result["checks"]:
        click.echo(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}")
    click.echo(f"report: {out / 'report.md'}")
