"""Evaluation metrics of the device period: AUC, UAUC, NDCG@k, HR@k, and the popularity floor.

Conventions (docs/data-protocol.md, "Metrics"): AUC is Mann-Whitney with tied scores counted
one half; UAUC averages per-user AUC over users that have both labels; ranking metrics rank
column 0 of each candidate row pessimistically (a tied negative counts as ranked above the
positive) and average per user first, then over users. `evaluate_buckets` gives the same figures
per group of users (the long-tail buckets) from the already computed scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from device_runtime.errors import MntoolError

if TYPE_CHECKING:
    from mntool.data.protocol import DeviceDataset


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2)."""
    labels, scores = _check_pointwise(labels, scores)
    per_group, ok = _group_auc(np.zeros(len(labels), dtype=np.int64), labels, scores)
    if not ok[0]:
        raise MntoolError("auc needs at least one positive and one negative label")
    return float(per_group[0])


def uauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean over users of each user's AUC; users with only one label class are skipped."""
    labels, scores = _check_pointwise(labels, scores)
    users = np.asarray(users)
    if users.shape != labels.shape:
        raise MntoolError(f"users {users.shape} and labels {labels.shape} differ in shape")
    _, groups = np.unique(users, return_inverse=True)
    per_user, ok = _group_auc(groups.reshape(-1), labels, scores)
    if not ok.any():
        raise MntoolError("uauc needs at least one user with both a positive and a negative label")
    return float(per_user[ok].mean())


def ranking_metrics(candidate_scores: np.ndarray, users: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(HR@k, NDCG@k) of column 0 (the positive) among each row's candidates.

    rank = number of other candidates scoring >= the positive (0 = top); HR@k = [rank < k];
    NDCG@k = 1 / log2(rank + 2) if rank < k else 0. Averaged per user, then over users.
    """
    scores = np.asarray(candidate_scores, dtype=np.float64)
    users = np.asarray(users)
    if scores.ndim != 2 or scores.shape[1] < 2 or users.shape != (len(scores),):
        raise MntoolError(f"ranking needs candidate scores (P, C>=2) and users (P,); got {scores.shape}, {users.shape}")
    if len(scores) == 0:
        raise MntoolError("ranking needs at least one candidate row")
    if np.isnan(scores).any():
        raise MntoolError("ranking scores contain NaN")
    rank = (scores[:, 1:] >= scores[:, :1]).sum(axis=1)
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    _, groups = np.unique(users, return_inverse=True)
    groups = groups.reshape(-1)
    count = np.bincount(groups)
    return (
        float(np.mean(np.bincount(groups, weights=hit) / count)),
        float(np.mean(np.bincount(groups, weights=ndcg) / count)),
    )


def evaluate(
    users: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    rank_users: np.ndarray,
    rank_scores: np.ndarray,
    k: int = 10,
) -> dict[str, float]:
    """All four figures: pointwise rows -> AUC, UAUC; candidate rows -> NDCG@k, HR@k."""
    hr, ndcg = ranking_metrics(rank_scores, rank_users, k)
    return {"auc": auc(labels, scores), "uauc": uauc(users, labels, scores), f"ndcg@{k}": ndcg, f"hr@{k}": hr}


def evaluate_users(
    users: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    rank_users: np.ndarray,
    rank_scores: np.ndarray,
    keep: np.ndarray,
    k: int = 10,
) -> dict[str, float | None]:
    """`evaluate` on the rows (pointwise and ranking) of the users in `keep` only: already computed
    scores, sliced, nothing re-scored. Every figure is None when those users have no rows."""
    users, rank_users = np.asarray(users), np.asarray(rank_users)
    rows, ranks = np.isin(users, keep), np.isin(rank_users, keep)
    if not rows.any() or not ranks.any():
        return {"auc": None, "uauc": None, f"ndcg@{k}": None, f"hr@{k}": None}
    labels, scores = np.asarray(labels), np.asarray(scores)
    return evaluate(users[rows], labels[rows], scores[rows], rank_users[ranks], np.asarray(rank_scores)[ranks], k)


def evaluate_buckets(
    users: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    rank_users: np.ndarray,
    rank_scores: np.ndarray,
    buckets: dict[str, np.ndarray],
    k: int = 10,
) -> dict[str, dict]:
    """Per bucket of user codes (e.g. `mntool.data.activity_buckets`): `evaluate_users` on its
    users, plus `users`, how many users the bucket holds."""
    return {
        name: {**evaluate_users(users, labels, scores, rank_users, rank_scores, codes, k), "users": int(len(codes))}
        for name, codes in buckets.items()
    }


def popularity_scores(item_popularity: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The sanity-floor scorer: an item's cloud-period interaction count, for items of any shape."""
    return np.asarray(item_popularity, dtype=np.float64)[np.asarray(items)]


def evaluate_popularity(dataset: DeviceDataset, split: str, k: int = 10) -> dict[str, float]:
    """`evaluate` of the popularity scorer on a `DeviceDataset`'s 'valid' or 'test' period."""
    if split not in ("valid", "test"):
        raise MntoolError(f"the popularity floor is measured on 'valid' or 'test', not {split!r}")
    rows, ranking = dataset.split(split), getattr(dataset, f"{split}_rank")
    pop = dataset.item_popularity
    return evaluate(
        rows.user,
        rows.label,
        popularity_scores(pop, rows.target),
        ranking.user,
        popularity_scores(pop, ranking.candidates),
        k,
    )


def _check_pointwise(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise MntoolError(f"labels ({labels.size}) and scores ({scores.size}) differ in length")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise MntoolError("labels must be 0 or 1")
    if np.isnan(scores).any():
        raise MntoolError("scores contain NaN")
    return labels, scores


def _group_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group AUC from average ranks within each group, and which groups have both labels."""
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order]
    n_groups = int(g.max()) + 1
    size = np.bincount(g, minlength=n_groups)
    first = np.concatenate([[0], np.cumsum(size)[:-1]])
    rank = np.arange(len(g)) - first[g] + 1.0  # 1-based rank within the group
    new_tie = np.ones(len(g), dtype=bool)
    new_tie[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    tie = np.cumsum(new_tie) - 1
    average_rank = (np.bincount(tie, weights=rank) / np.bincount(tie))[tie]
    n_pos = np.bincount(g, weights=y, minlength=n_groups)
    n_neg = size - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    rank_sum = np.bincount(g, weights=average_rank * y, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_group = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return per_group, ok
