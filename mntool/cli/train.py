"""`mntool train` and `mntool evaluate`: thin over `mntool.train`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mntool import tasks

MODELS = sorted({m for name in tasks.TASKS for m in tasks.get(name).MODELS})
METHODS = list(dict.fromkeys(m for name in tasks.TASKS for m in tasks.get(name).METHODS))


@click.command()
@click.option(
    "--task",
    type=click.Choice(list(tasks.TASKS)),
    default=tasks.DEFAULT_TASK,
    show_default=True,
    help="movielens: recommenders on MovieLens-100k (docs/metanetwork.md); mnist: image classifiers on "
    "per-device MNIST (docs/vision.md).",
)
@click.option(
    "--model",
    type=click.Choice(MODELS),
    default=None,
    help="Device model: gru4rec, sasrec, din (movielens; default sasrec) or lenet, mobilenet (mnist; default lenet).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="static",
    show_default=True,
    help="static: one model for all devices; finetune: per-device gradient steps on labelled recent samples; "
    "metapatch (movielens): DCCL's MetaPatch, patches in the frozen static model from shared cloud parameters "
    "and a per-device vector z, only z learned per device on finetune's data (docs/dccl.md); "
    "metanetwork: generated per-device parameters (with --init of a metapatch checkpoint: generated z); "
    "momodistill (movielens): DCCL's MoMoDistill, a new cloud model trained on the cloud period with a "
    "distillation term toward the personalised device models of --teacher (docs/dccl.md); "
    "bn-adapt, tent (mnist): label-free test-time adaptation on the device's upload.",
)
@click.option("--no-stabilizer", is_flag=True, help="metanetwork without MetaStabilizer (ablation).")
@click.option(
    "--frozen-backbone",
    is_flag=True,
    help="metanetwork: train only the generator, on the frozen backbone of a static model (--init, or "
    "trained first into OUT/static), so the unpatched model is exactly that static model "
    "[implied by --init; default: backbone and generator trained together from scratch].",
)
@click.option(
    "--shuffled-uploads",
    is_flag=True,
    help="metanetwork control: every device reads another device's upload (what is left of the gain "
    "does not come from the uploads).",
)
@click.option(
    "--metapatch-dim",
    type=int,
    default=None,
    help="metapatch: size of the per-device vector z, the model's only adaptive tensor [default: 32; at least 10, "
    "since Core ML stores smaller constants inline where no patch can reach them].",
)
@click.option(
    "--teacher",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="momodistill: checkpoint whose per-device personalised models are distilled (metapatch, metanetwork, "
    "finetune; static = self-distillation control), trained under the same protocol.",
)
@click.option(
    "--distill-alpha",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="momodistill: weight of the distillation term; the label term gets 1 - alpha [default: 0.5].",
)
@click.option(
    "--distill-weighting",
    type=click.Choice(["devices", "rows"]),
    default=None,
    help="momodistill: devices = every device's distillation rows weigh the same in total (tail devices count "
    "as much as head ones); rows = every cloud row weighs 1 [default: devices].",
)
@click.option("--epochs", type=int, default=None, help="Maximum epochs (early stopping on validation UAUC).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--history-len",
    type=click.IntRange(1, 30),
    default=30,
    show_default=True,
    help="Clicks the device model reads per inference (its on-device window).",
)
@click.option(
    "--recent-len",
    type=click.IntRange(1, 500),
    default=30,
    show_default=True,
    help="Items a device uploads when it asks for parameters (what the MetaGenerator reads).",
)
@click.option(
    "--upload-len",
    type=click.IntRange(1, 256),
    default=None,
    help="mnist: images a device uploads when it asks for parameters [default: 32].",
)
@click.option(
    "--init",
    "init",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Static checkpoint that finetune, metapatch (and metanetwork with a frozen backbone) start from "
    "[default: train one first into OUT/static]; for metanetwork also a metapatch checkpoint (the generator "
    "then outputs its z).",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, path_type=Path),
    help="MovieLens files (u.data or RecBole .inter) [default: the fetched cache, fetched if missing].",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Checkpoint directory to write."
)
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json to stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(
    task,
    model,
    method,
    no_stabilizer,
    frozen_backbone,
    shuffled_uploads,
    metapatch_dim,
    teacher,
    distill_alpha,
    distill_weighting,
    epochs,
    seed,
    history_len,
    recent_len,
    upload_len,
    init,
    data_dir,
    out,
    as_json,
    quiet,
):
    """Train a device model: a recommender on MovieLens-100k (time-shift protocol), or with
    --task mnist an image classifier on per-device MNIST (img-v1).

    Writes OUT/config.json, OUT/weights.pt and OUT/metrics.json (recommender: AUC, UAUC, NDCG@10,
    HR@10; mnist: per-device mean accuracy, accuracy, macro-F1, NLL, ECE; on the validation and
    test periods; the test period is scored once, with choices made on validation).

    \b
    Examples:
      mntool train --model sasrec --method static --out runs/sasrec-static
      mntool train --model sasrec --method metanetwork --seed 1 --out runs/sasrec-mn
      mntool train --model sasrec --method metanetwork --init runs/sasrec-static --out runs/sasrec-patches
      mntool train --model gru4rec --method finetune --init runs/gru-static --out runs/gru-ft
      mntool train --model sasrec --history-len 10 --method metapatch --init runs/sasrec-l10 --out runs/sasrec-l10-mp
      mntool train --model sasrec --history-len 10 --method metanetwork --init runs/sasrec-l10-mp --out runs/sasrec-l10-mp-mn
      mntool train --model sasrec --history-len 10 --method metanetwork --out runs/sasrec-l10
      mntool train --model sasrec --history-len 10 --method momodistill --teacher runs/sasrec-l10-mp --out runs/sasrec-l10-md
      mntool train --model sasrec --history-len 10 --method finetune --init runs/sasrec-l10-md --out runs/sasrec-l10-md-ft
      mntool train --model sasrec --history-len 10 --recent-len 100 --method metanetwork --out runs/sasrec-l10-r100
      mntool train --model sasrec --history-len 10 --method metanetwork --shuffled-uploads --out runs/sasrec-l10-control
      mntool train --task mnist --model lenet --method metanetwork --out runs/mnist-mn
      mntool train --task mnist --model mobilenet --method tent --init runs/mnist-static --out runs/mnist-tent
      mntool train --task mnist --model lenet --method exits --init runs/mnist-static --out runs/mnist-exits
      mntool train --task mnist --model lenet --method metanetwork --init runs/mnist-exits --out runs/mnist-exits-mn
    """
    from device_runtime.errors import MntoolError

    spec = tasks.get(task)
    model = model or spec.DEFAULT_MODEL
    for kind, value, allowed in (("model", model, spec.MODELS), ("method", method, spec.METHODS)):
        if value not in allowed:
            raise click.UsageError(f"--{kind} {value} is not one of --task {task}'s: {', '.join(allowed)}")
    for flag, on in (
        ("--no-stabilizer", no_stabilizer),
        ("--frozen-backbone", frozen_backbone),
        ("--shuffled-uploads", shuffled_uploads),
    ):
        if on and method != "metanetwork":
            raise click.UsageError(f"{flag} only applies to --method metanetwork")
    if metapatch_dim is not None and method != "metapatch":
        raise click.UsageError("--metapatch-dim only applies to --method metapatch")
    if method == "momodistill" and teacher is None:
        raise click.UsageError("--method momodistill needs --teacher CKPT (the personalised device models to distil)")
    for flag, value in (
        ("--teacher", teacher),
        ("--distill-alpha", distill_alpha),
        ("--distill-weighting", distill_weighting),
    ):
        if value is not None and method != "momodistill":
            raise click.UsageError(f"{flag} only applies to --method momodistill")
    if upload_len is not None and task != "mnist":
        raise click.UsageError("--upload-len applies to --task mnist (the recommender's upload is --recent-len)")
    options = dict(
        model=model,
        method=method,
        seed=seed,
        epochs=epochs,
        no_stabilizer=no_stabilizer,
        meta_train_backbone=not (frozen_backbone or init is not None),
        shuffled_uploads=shuffled_uploads,
        metapatch_dim=metapatch_dim,
        teacher=teacher,
        distill_alpha=distill_alpha,
        distill_weighting=distill_weighting,
        history_len=history_len,
        recent_len=recent_len,
        upload_len=upload_len,
    )
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    try:
        metrics = spec.train(options, out, init, data_dir, progress=not quiet, log=log)
    except MntoolError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        variant = "".join(
            f" ({v})"
            for v, on in (
                ("frozen backbone", not options["meta_train_backbone"] and method == "metanetwork"),
                ("no stabilizer", no_stabilizer),
                ("shuffled uploads", shuffled_uploads),
            )
            if on
        )
        click.echo(f"{model} {method}{variant}, seed {seed} -> {out}")
        click.echo(spec.metrics_table(metrics))


@click.command()
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, path_type=Path),
    help="Data directory [default: the fetched cache].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(ckpt, data_dir, as_json):
    """Re-compute a checkpoint's metrics on the validation and test periods.

    \b
    Example:
      mntool evaluate runs/sasrec-static --json
    """
    from device_runtime.errors import MntoolError
    from mntool.train import load_checkpoint

    ck = load_checkpoint(ckpt)
    spec = tasks.get(ck.task)
    try:
        metrics = spec.evaluate(ck, data_dir)
    except MntoolError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        click.echo(f"{ck.config.model} {ck.config.method} ({ckpt})")
        click.echo(spec.metrics_table(metrics))
