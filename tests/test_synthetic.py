"""The synthetic drift generator: seeded, well-formed, and drift really moves the device period."""

from __future__ import annotations

import numpy as np
import pytest

from device_runtime.errors import MntoolError
from mntool.data import ProtocolConfig, SyntheticConfig, build_dataset, synthetic_interactions


def test_seeded_and_well_formed():
    config = SyntheticConfig(n_users=30, seed=3)
    a, b = synthetic_interactions(config), synthetic_interactions(config)
    assert np.array_equal(a.item, b.item) and np.array_equal(a.timestamp, b.timestamp)
    assert not np.array_equal(a.item, synthetic_interactions(SyntheticConfig(n_users=30, seed=4)).item)
    assert len(a) == 30 * config.per_user and (a.n_users, a.n_items) == (30, config.n_items)
    items = a.item.reshape(30, config.per_user)
    assert all(len(set(row)) == config.per_user for row in items), "a user rated an item twice"
    assert (np.diff(a.timestamp.reshape(30, config.per_user), axis=1) > 0).all()


def cloud_vs_device_shift(drift: float) -> float:
    """Mean over users of the total-variation distance between the cluster mix of a user's
    training positives and of their device-period (valid + test) positives."""
    config = SyntheticConfig(n_users=300, drift=drift, seed=1)
    ds = build_dataset(synthetic_interactions(config), ProtocolConfig(n_rank_negatives=20))
    distances = []
    for u in range(config.n_users):
        cloud = ds.train.target[(ds.train.user == u) & (ds.train.label == 1)]
        device = np.concatenate([s.target[(s.user == u) & (s.label == 1)] for s in (ds.valid, ds.test)])
        p = np.bincount(config.cluster_of(cloud), minlength=config.n_clusters) / len(cloud)
        q = np.bincount(config.cluster_of(device), minlength=config.n_clusters) / len(device)
        distances.append(0.5 * np.abs(p - q).sum())
    return float(np.mean(distances))


def test_drift_changes_the_device_period():
    still, moved = cloud_vs_device_shift(0.0), cloud_vs_device_shift(1.0)
    # Without drift the distance is sampling noise (~0.3 for 12 device items); with full drift
    # the device period follows an independent taste.
    assert moved > still + 0.25, (still, moved)


def test_every_user_gets_all_periods():
    ds = build_dataset(synthetic_interactions(SyntheticConfig(n_users=20)), ProtocolConfig(n_rank_negatives=20))
    assert ds.skipped_users == 0 and len(np.unique(ds.test.user)) == 20


@pytest.mark.parametrize("bad", [dict(drift=1.5), dict(per_user=0), dict(n_clusters=0)])
def test_bad_config(bad):
    with pytest.raises(MntoolError):
        SyntheticConfig(**bad)
