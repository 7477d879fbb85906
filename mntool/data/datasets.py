"""Which data a command trains and evaluates on: a directory the user names, else the fetched
MovieLens-100k cache (fetched on first use), built under a given protocol configuration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mntool.data.fetch import fetch_movielens_100k
from mntool.data.movielens import load_interactions
from mntool.data.protocol import DeviceDataset, ProtocolConfig, build_dataset


def load_dataset(
    data_dir: Path | str | None = None,
    config: ProtocolConfig | dict | None = None,
    log: Callable[[str], None] | None = None,
) -> DeviceDataset:
    """`build_dataset` over `data_dir` (GroupLens or RecBole files), or over the fetched cache."""
    if isinstance(config, dict):
        config = ProtocolConfig(**config)
    path = Path(data_dir) if data_dir is not None else fetch_movielens_100k(log=log)
    return build_dataset(load_interactions(path), config or ProtocolConfig())
