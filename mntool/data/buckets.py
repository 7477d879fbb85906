"""Long-tail buckets: device users split into head / torso / tail thirds by cloud-period activity.

A device user's activity is its number of positive rows in `dataset.train`: the cloud-period
interactions that make a training sample (every cloud interaction but the user's first
`min_history`, which have no history). Under the default `min_history = 1` that is each user's
cloud-period interaction count minus one, so the order is the same as by cloud interactions. Only
`dataset.train` (and the list of device users) is read: the buckets are decided on the cloud period,
never on validation or test data.

Rule (docs/dccl.md, "Long-tail buckets"): device users ranked by activity, most active first, ties
broken by user code (smaller code first); the ranking cut into three consecutive parts with
`numpy.array_split` (sizes differ by at most one, the larger parts first): head, torso, tail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mntool.data.protocol import DeviceDataset

BUCKETS = ("head", "torso", "tail")


def cloud_activity(dataset: DeviceDataset) -> np.ndarray:
    """(U,) int64: for each of `dataset.device_users`, its positive rows in `dataset.train`."""
    train = dataset.train
    positives = np.asarray(train.user)[np.asarray(train.label) == 1]
    users = np.asarray(dataset.device_users, dtype=np.int64)
    counts = np.bincount(positives, minlength=int(users.max(initial=-1)) + 1)
    return counts[users].astype(np.int64)


def activity_buckets(dataset: DeviceDataset) -> dict[str, np.ndarray]:
    """{"head", "torso", "tail"}: the device users' codes (sorted) in each third of the ranking
    by cloud-period activity (`cloud_activity`; most active first, ties by smaller user code)."""
    users = np.asarray(dataset.device_users, dtype=np.int64)
    activity = cloud_activity(dataset)
    ranked = users[np.lexsort((users, -activity))]
    return {name: np.sort(part) for name, part in zip(BUCKETS, np.array_split(ranked, len(BUCKETS)))}


def bucket_summary(dataset: DeviceDataset) -> dict[str, dict]:
    """Per bucket: `users` and the lowest / highest activity in it (`min_activity`, `max_activity`)."""
    users = np.asarray(dataset.device_users, dtype=np.int64)
    activity = cloud_activity(dataset)
    out = {}
    for name, codes in activity_buckets(dataset).items():
        a = activity[np.isin(users, codes)]
        out[name] = {
            "users": int(len(codes)),
            "min_activity": int(a.min()) if len(a) else None,
            "max_activity": int(a.max()) if len(a) else None,
        }
    return out
