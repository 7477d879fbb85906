"""`mntool demo`: the whole cloud -> device loop on MovieLens-100k (`mntool.demo.run_demo`) or, with
`--task mnist`, on images (`mntool.vision.demo.run_demo`); thin over both."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import click

OUT = {"movielens": Path("demo-out"), "mnist": Path("demo-out-mnist")}


@click.command()
@click.option(
    "--task",
    type=click.Choice(list(OUT)),
    default="movielens",
    show_default=True,
    help="movielens: SASRec on MovieLens-100k; mnist: a CNN on the per-device MNIST protocol (img-v1).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory for checkpoints, artifacts, patches and the report (reused by later runs) "
    "[default: demo-out; --task mnist: demo-out-mnist].",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Smoke-test settings: 120 training users, 1 epoch each, 24 scored users (mnist: 12 devices, 1 epoch each).",
)
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
    "--model",
    type=click.Choice(["lenet", "mobilenet"]),
    default=None,
    help="--task mnist: the device CNN [default: lenet].",
)
@click.option(
    "--devices",
    type=click.IntRange(min=2),
    default=None,
    help="--task mnist: simulated phones in the protocol, every one personalised and scored [default: 100; "
    "--quick: 12].",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, path_type=Path),
    help="MovieLens files (u.data or RecBole .inter), or with --task mnist the MNIST IDX files "
    "[default: the fetched cache, fetched if missing].",
)
@click.option("--json", "as_json", is_flag=True, help="Print report.json on stdout (progress still goes to stderr).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def demo(task, out, quick, fresh, users, model, devices, data_dir, as_json, quiet):
    """Run the whole loop and write OUT/report.md (+ report.json, PNGs).

    Fetch MovieLens-100k, train the static and MetaNetwork SASRec device models, export the
    device model to TFLite, ONNX and Core ML with swappable adaptive buffers, generate a signed
    patch per sampled device user from its recent samples, apply it on the device side, score
    the user's test-period interactions with the compiled models (Core ML: read back with
    coremltools on Linux), benchmark load / latency / swap, and report. A re-run reuses the
    checkpoints and artifacts whose inputs did not change.

    With --task mnist the same loop runs on images: a static CNN, BN adaptation and a MetaNetwork
    on the per-device MNIST protocol, each device's patch generated from its unlabelled upload,
    per-device accuracy from the compiled models.

    \b
    Examples:
      mntool demo                      # what `make demo` runs; training takes most of the time
      mntool demo --quick --out /tmp/demo-smoke
      mntool demo --users 0 --out demo-all --json > report.json
      mntool demo --task mnist         # images: LeNet, 100 devices, a few minutes
      mntool demo --task mnist --model mobilenet --out demo-mobilenet
    """
    from device_runtime.errors import MntoolError

    out = out or OUT[task]
    if task == "movielens":
        if model is not None or devices is not None:
            raise MntoolError("--model and --devices are for --task mnist (the recommender demo samples --users)")
        from mntool.demo import DemoConfig, run_demo

        config = DemoConfig.quick() if quick else DemoConfig()
        if users is not None:
            config = dataclasses.replace(config, users=users)
    else:
        if users is not None:
            raise MntoolError("--users is for --task movielens; --task mnist personalises every one of its --devices")
        from mntool.vision.demo import VisionDemoConfig, run_demo

        config = VisionDemoConfig.quick() if quick else VisionDemoConfig()
        changes = {k: v for k, v in (("model", model), ("devices", devices)) if v is not None}
        config = dataclasses.replace(config, **changes)
    with contextlib.redirect_stdout(sys.stderr):  # trainers and converters print; stdout is for the result
        result = run_demo(out, quick=quick, fresh=fresh, data_dir=data_dir, progress=not quiet, config=config)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for c in result["checks"]:
        click.echo(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}")
    click.echo(f"report: {out / 'report.md'}")
