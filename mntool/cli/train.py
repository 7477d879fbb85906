"""`mntool train` and `mntool evaluate`: thin over `mntool.train`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mntool.models import BACKBONES

METRICS = ("auc", "uauc", "ndcg@10", "hr@10")


def _metrics_table(metrics: dict) -> str:
    lines = [f"{'':12s}" + "".join(f"{m:>10s}" for m in METRICS)]
    for label, row in (
        ("valid", metrics["valid"]),
        ("test", metrics["test"]),
        ("popularity", metrics["popularity"]["test"]),
    ):
        lines.append(f"{label:12s}" + "".join(f"{row[m]:10.4f}" for m in METRICS))
    return "\n".join(lines)


@click.command()
@click.option(
    "--model", type=click.Choice(list(BACKBONES)), default="sasrec", show_default=True, help="Device backbone."
)
@click.option(
    "--method",
    type=click.Choice(["static", "finetune", "metanetwork"]),
    default="static",
    show_default=True,
    help="static: one model for all devices; finetune: per-device gradient steps on recent samples; "
    "metanetwork: generated per-device parameters.",
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
    "--init",
    "init",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Static checkpoint that finetune (and metanetwork with a frozen backbone) starts from "
    "[default: train one first into OUT/static].",
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
    model,
    method,
    no_stabilizer,
    frozen_backbone,
    shuffled_uploads,
    epochs,
    seed,
    history_len,
    recent_len,
    init,
    data_dir,
    out,
    as_json,
    quiet,
):
    """Train a device backbone on MovieLens-100k under the time-shift protocol.

    Writes OUT/config.json, OUT/weights.pt and OUT/metrics.json (AUC, UAUC, NDCG@10, HR@10 on the
    validation and test periods; the test period is scored once, with the epoch chosen on
    validation).

    \b
    Examples:
      mntool train --model sasrec --method static --out runs/sasrec-static
      mntool train --model sasrec --method metanetwork --seed 1 --out runs/sasrec-mn
      mntool train --model sasrec --method metanetwork --init runs/sasrec-static --out runs/sasrec-patches
      mntool train --model gru4rec --method finetune --init runs/gru-static --out runs/gru-ft
      mntool train --model sasrec --history-len 10 --method metanetwork --out runs/sasrec-l10
      mntool train --model sasrec --history-len 10 --recent-len 100 --method metanetwork --out runs/sasrec-l10-r100
      mntool train --model sasrec --history-len 10 --method metanetwork --shuffled-uploads --out runs/sasrec-l10-control
    """
    from mntool.data import ProtocolConfig
    from mntool.data.datasets import load_dataset
    from mntool.meta import MetaConfig
    from mntool.models import BackboneConfig
    from mntool.train import TrainConfig
    from mntool.train import train as run_train

    cfg = TrainConfig(model=model, method=method, seed=seed, backbone=BackboneConfig(max_history=history_len))
    if epochs is not None:
        cfg.epochs = epochs
    for flag, on in (
        ("--no-stabilizer", no_stabilizer),
        ("--frozen-backbone", frozen_backbone),
        ("--shuffled-uploads", shuffled_uploads),
    ):
        if on and method != "metanetwork":
            raise click.UsageError(f"{flag} only applies to --method metanetwork")
    if no_stabilizer:
        cfg.meta = MetaConfig(gate=False, ema=False)
    cfg.meta_train_backbone = not (frozen_backbone or init is not None)
    cfg.shuffled_uploads = shuffled_uploads
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    dataset = load_dataset(data_dir, ProtocolConfig(history_len=history_len, recent_len=recent_len), log=log)
    metrics = run_train(dataset, cfg, out, init=init, progress=not quiet, log=log)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        variant = "".join(
            f" ({v})"
            for v, on in (
                ("frozen backbone", not cfg.meta_train_backbone and method == "metanetwork"),
                ("no stabilizer", no_stabilizer),
                ("shuffled uploads", shuffled_uploads),
            )
            if on
        )
        click.echo(f"{model} {method}{variant}, seed {seed} -> {out}")
        click.echo(_metrics_table(metrics))


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
    from mntool.data.datasets import load_dataset
    from mntool.train import experiment_dataset, load_checkpoint, report_metrics

    ck = load_checkpoint(ckpt)
    dataset = load_dataset(data_dir, ck.protocol)
    if dataset.n_items != ck.n_items:
        raise click.ClickException(f"{ckpt} was trained on {ck.n_items} items, the data has {dataset.n_items}")
    metrics = report_metrics(ck.model, experiment_dataset(dataset, ck.config), ck.config, ck.meta, progress=False)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        click.echo(f"{ck.config.model} {ck.config.method} ({ckpt})")
        click.echo(_metrics_table(metrics))
