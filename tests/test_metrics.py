"""Metrics against hand-computed cases (ties, one-class users, per-user averaging) and a
brute-force pairwise AUC; the popularity floor on the real MovieLens-100k device period."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_runtime.errors import MntoolError
from mntool.metrics import auc, evaluate, evaluate_popularity, popularity_scores, ranking_metrics, uauc


def pairwise_auc(labels, scores) -> float:
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_cases():
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert auc([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.8]) == 0.0
    assert auc([1, 0, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # pairs: (.9 vs .9) tie 1/2, (.9 vs .1) 1, (.3 vs .9) 0, (.3 vs .1) 1 -> 2.5 / 4
    assert auc([1, 0, 1, 0], [0.9, 0.9, 0.3, 0.1]) == 0.625


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 4)), min_size=2, max_size=60))
def test_auc_equals_pairwise_count(rows):
    labels, scores = zip(*rows)
    if len(set(labels)) < 2:
        with pytest.raises(MntoolError, match="one positive and one negative"):
            auc(labels, scores)
    else:
        assert auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores))


def test_uauc_skips_one_class_users_and_averages_users_equally():
    users = ["a", "a", "a", "b", "b", "c", "c"]
    labels = [1, 0, 0, 1, 0, 1, 1]  # c has only positives: skipped
    scores = [0.7, 0.8, 0.1, 0.2, 0.2, 0.0, 0.0]
    # a: pos .7 beats .1, loses to .8 -> 0.5 ; b: tie -> 0.5 ; mean 0.5 (global AUC differs)
    assert uauc(users, labels, scores) == 0.5
    assert uauc(users, labels, [0.9, 0.8, 0.1, 0.3, 0.2, 0.0, 0.0]) == 1.0
    with pytest.raises(MntoolError, match="both a positive and a negative"):
        uauc(["a", "b"], [1, 0], [0.3, 0.4])


def test_ranking_ranks_ties_pessimistically_and_averages_per_user():
    scores = np.array(
        [
            [5.0, 1.0, 2.0, 3.0],  # top -> rank 0: hit, ndcg 1
            [2.0, 3.0, 4.0, 1.0],  # two above -> rank 2: ndcg 1/log2(4) = 0.5
            [2.0, 2.0, 1.0, 0.0],  # one tied negative counts above -> rank 1: ndcg 1/log2(3)
        ]
    )
    hr, ndcg = ranking_metrics(scores, np.array([0, 1, 2]), k=10)
    assert hr == 1.0 and ndcg == pytest.approx((1 + 0.5 + 1 / math.log2(3)) / 3)
    hr, ndcg = ranking_metrics(scores, np.array([0, 1, 2]), k=2)  # rank 2 falls out of the top 2
    assert hr == pytest.approx(2 / 3) and ndcg == pytest.approx((1 + 1 / math.log2(3)) / 3)
    # per user first: user 0 has rows (hit, miss) -> 0.5, user 1 (hit) -> 1; mean 0.75, not 2/3
    hr, _ = ranking_metrics(scores, np.array([0, 0, 1]), k=2)
    assert hr == pytest.approx(0.75)
    # a constant scorer gets nothing from ties
    assert ranking_metrics(np.zeros((4, 100)), np.arange(4)) == (0.0, 0.0)


def test_evaluate_keys_and_bad_input():
    out = evaluate(
        [0, 0, 1, 1], [1, 0, 1, 0], [0.9, 0.1, 0.2, 0.8], np.array([0, 1]), np.array([[3.0, 1.0], [0.0, 1.0]])
    )
    # global: .9 > .1, .9 > .8, .2 > .1, .2 < .8 -> 3/4; per user 1 and 0 -> 1/2
    assert out == pytest.approx({"auc": 0.75, "uauc": 0.5, "ndcg@10": (1 + 1 / math.log2(3)) / 2, "hr@10": 1.0})
    with pytest.raises(MntoolError, match="NaN"):
        auc([1, 0], [np.nan, 0.0])
    with pytest.raises(MntoolError, match="0 or 1"):
        auc([2, 0], [0.1, 0.0])
    with pytest.raises(MntoolError, match="differ in length"):
        auc([1, 0, 1], [0.1, 0.0])
    with pytest.raises(MntoolError, match=r"\(P, C>=2\)"):
        ranking_metrics(np.zeros(5), np.zeros(5))


def test_popularity_scores_index_counts():
    pop = np.array([0, 5, 1, 9])
    assert popularity_scores(pop, np.array([[3, 1], [2, 2]])).tolist() == [[9.0, 5.0], [1.0, 1.0]]


def test_popularity_floor_on_movielens(ml100k_dataset):
    rng = np.random.default_rng(0)
    for split in ("valid", "test"):
        figures = evaluate_popularity(ml100k_dataset, split)
        rows, rank = ml100k_dataset.split(split), getattr(ml100k_dataset, f"{split}_rank")
        chance = evaluate(rows.user, rows.label, rng.random(len(rows)), rank.user, rng.random(rank.candidates.shape))
        assert chance["auc"] == pytest.approx(0.5, abs=0.01) and chance["hr@10"] == pytest.approx(0.1, abs=0.01)
        assert figures["auc"] > 0.7 and figures["hr@10"] > 0.3 and figures["ndcg@10"] > 0.15
    with pytest.raises(MntoolError):
        evaluate_popularity(ml100k_dataset, "train")
