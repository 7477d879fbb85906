"""A tiny synthetic interaction generator with controllable taste drift, for fast unit tests.

Items fall into equal contiguous clusters; each user has a taste (a distribution over clusters).
After the first `shift_at` of a user's interactions the taste moves `drift` of the way towards a
fresh random taste, so drift=0 keeps the device period like the cloud period and drift=1 makes
it independent. Timestamps strictly increase per user, so protocol cuts land exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_runtime.errors import MntoolError
from mntool.data.interactions import Interactions


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 100
    n_items: int = 200
    n_clusters: int = 8  # items 1..n_items split into this many equal contiguous clusters
    per_user: int = 40  # interactions per user (no item twice)
    shift_at: float = 0.7  # taste drifts after this fraction (matches ProtocolConfig.cloud_frac)
    drift: float = 0.0  # 0: same taste throughout; 1: an independent new taste after shift_at
    concentration: float = 0.3  # Dirichlet concentration of tastes; small = a few favourite clusters
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drift <= 1.0:
            raise MntoolError(f"synthetic drift must be in [0, 1] (got {self.drift})")
        if not 0 < self.per_user <= self.n_items:
            raise MntoolError(f"synthetic per_user must be in 1..n_items={self.n_items} (got {self.per_user})")
        if not 1 <= self.n_clusters <= self.n_items:
            raise MntoolError(f"synthetic n_clusters must be in 1..n_items={self.n_items} (got {self.n_clusters})")

    def cluster_of(self, items: np.ndarray) -> np.ndarray:
        """Cluster index (0..n_clusters-1) of item codes 1..n_items."""
        return (np.asarray(items) - 1) * self.n_clusters // self.n_items


def synthetic_interactions(config: SyntheticConfig = SyntheticConfig()) -> Interactions:
    rng = np.random.default_rng(config.seed)
    items = np.arange(1, config.n_items + 1)
    cluster = config.cluster_of(items)
    cluster_size = np.bincount(cluster, minlength=config.n_clusters)
    n_before = int(round(config.per_user * config.shift_at))

    chosen = []
    for _ in range(config.n_users):
        taste = rng.dirichlet(np.full(config.n_clusters, config.concentration))
        fresh = rng.dirichlet(np.full(config.n_clusters, config.concentration))
        drifted = (1 - config.drift) * taste + config.drift * fresh
        before = _draw(rng, items, taste[cluster] / cluster_size[cluster], n_before)
        left = np.setdiff1d(items, before)
        after = _draw(
            rng,
            left,
            drifted[config.cluster_of(left)] / cluster_size[config.cluster_of(left)],
            config.per_user - n_before,
        )
        chosen.append(np.concatenate([before, after]))

    gaps = rng.integers(1, 3600, size=(config.n_users, config.per_user))  # seconds between interactions
    start = rng.integers(880_000_000, 890_000_000, size=(config.n_users, 1))
    return Interactions(
        user=np.repeat(np.arange(config.n_users, dtype=np.int64), config.per_user),
        item=np.concatenate(chosen).astype(np.int64),
        timestamp=(start + np.cumsum(gaps, axis=1)).reshape(-1).astype(np.int64),
        rating=np.ones(config.n_users * config.per_user, dtype=np.float32),
        user_ids=np.arange(config.n_users).astype(str),
        item_ids=np.concatenate([[""], items.astype(str)]),
        source=f"synthetic(drift={config.drift}, seed={config.seed})",
    )


def _draw(rng: np.random.Generator, pool: np.ndarray, weight: np.ndarray, size: int) -> np.ndarray:
    """`size` distinct items of `pool` in draw order (the order is their time order)."""
    weight = np.maximum(weight, 1e-12)  # a taste can be ~0 on a cluster; keep every item drawable
    return rng.choice(pool, size=size, replace=False, p=weight / weight.sum())
