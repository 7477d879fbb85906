"""The time-shift protocol on the real MovieLens-100k: no future leaks, strict period order,
never-touched negatives, padding, determinism; plus tie handling on hand-made interactions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_runtime.errors import MntoolError
from mntool.cli.main import main
from mntool.data import PROTOCOL_VERSION, ProtocolConfig, build_dataset
from mntool.data.interactions import from_raw

CFG = ProtocolConfig()


@pytest.fixture(scope="module")
def reference(ml100k_interactions):
    """Independent per-user time order (plain Python sort) and a (user, item) -> time table."""
    x = ml100k_interactions
    sequences: dict[int, list[int]] = {}
    for row in sorted(range(len(x)), key=lambda r: (x.user[r], x.timestamp[r], r)):
        sequences.setdefault(int(x.user[row]), []).append(int(x.item[row]))
    when = np.full((x.n_users, x.n_items + 1), -1, dtype=np.int64)
    when[x.user, x.item] = x.timestamp
    return sequences, when


def positives(samples):
    return samples.take(samples.label == 1)


def test_sizes_and_ids(ml100k_dataset, ml100k_interactions):
    ds = ml100k_dataset
    assert ds.protocol_version == PROTOCOL_VERSION == "ts-v1"
    assert (ds.n_users, ds.n_items, ds.skipped_users) == (943, 1682, 0)
    n_pos = sum(positives(ds.split(s)).n_positives for s in ("train", "valid", "test"))
    assert n_pos == len(ml100k_interactions) - 943 * CFG.min_history  # each user's first item has no history
    for s in ("train", "valid", "test"):
        rows = ds.split(s)
        assert len(rows) == rows.n_positives * (1 + CFG.n_negatives)
        assert rows.history.shape == (len(rows), CFG.history_len) and rows.recent.shape == (len(rows), CFG.recent_len)
        assert (
            rows.history.dtype == rows.recent.dtype == rows.target.dtype == np.int64 and rows.label.dtype == np.float32
        )
        assert np.array_equal(rows.label.reshape(-1, 5), np.tile([1, 0, 0, 0, 0], (rows.n_positives, 1)))
        assert rows.target.min() >= 1 and rows.target.max() <= ds.n_items
    for rank, rows in ((ds.valid_rank, ds.valid), (ds.test_rank, ds.test)):
        assert rank.candidates.shape == (rows.n_positives, 100)
        assert np.array_equal(rank.target, positives(rows).target)
    # Every user has about 70/15/15 of their interactions in cloud/valid/test.
    assert 0.6 < ds.train.n_positives / n_pos < 0.75 and 0.12 < ds.test.n_positives / n_pos < 0.2


def test_device_period_strictly_later_per_user(ml100k_dataset, ml100k_interactions, reference):
    _, when = reference
    ds = ml100k_dataset
    x = ml100k_interactions
    valid, test = positives(ds.valid), positives(ds.test)
    in_device = np.zeros_like(when, dtype=bool)
    in_device[valid.user, valid.target] = True
    in_device[test.user, test.target] = True
    cloud = ~in_device[x.user, x.item]
    cloud_last = np.full(x.n_users, -1)
    np.maximum.at(cloud_last, x.user[cloud], x.timestamp[cloud])
    valid_first, test_first = (np.full(x.n_users, np.iinfo(np.int64).max) for _ in range(2))
    np.minimum.at(valid_first, valid.user, valid.timestamp)
    np.minimum.at(test_first, test.user, test.timestamp)
    valid_last = np.full(x.n_users, -1)
    np.maximum.at(valid_last, valid.user, valid.timestamp)
    assert (cloud_last < valid_first).all(), "a validation interaction is not later than the cloud period"
    assert (valid_last < test_first).all(), "a test interaction is not later than the validation period"
    assert np.array_equal(np.unique(valid.user), np.arange(943)) and np.array_equal(
        np.unique(test.user), np.arange(943)
    )


def test_no_future_interaction_in_history_or_recent(ml100k_dataset, reference):
    _, when = reference
    ds = ml100k_dataset
    for name in ("train", "valid", "test"):
        rows = ds.split(name)
        for window in (rows.history, rows.recent):
            seen = when[rows.user[:, None], window]
            assert ((seen <= rows.timestamp[:, None]) | (window == 0)).all(), f"{name}: future item in a window"
            assert (seen[window != 0] >= 0).all(), f"{name}: a window holds an item the user never touched"
    # Uploads of the device periods predate the whole period they serve.
    for name in ("valid", "test"):
        rows = positives(ds.split(name))
        period_start = np.full(ds.n_users, np.iinfo(np.int64).max)
        np.minimum.at(period_start, rows.user, rows.timestamp)
        seen = when[rows.user[:, None], rows.recent]
        assert ((seen < period_start[rows.user, None]) | (rows.recent == 0)).all()


def test_history_and_recent_match_reference(ml100k_dataset, reference):
    sequences, _ = reference
    ds = ml100k_dataset
    L, R, K = CFG.history_len, CFG.recent_len, CFG.request_every

    def last(items: list[int], n: int) -> list[int]:
        tail = items[-n:] if items else []
        return [0] * (n - len(tail)) + tail

    train, valid, test = positives(ds.train), positives(ds.valid), positives(ds.test)
    for u in (0, 1, 404, 942):  # includes user 405 (737 ratings) and short sequences
        seq = sequences[u]
        t, v, s = train.user == u, valid.user == u, test.user == u
        n_cloud = 1 + t.sum()
        n_valid = v.sum()
        assert np.array_equal(np.concatenate([train.target[t], valid.target[v], test.target[s]]), seq[1:])
        for rows, mask, first in ((train, t, 1), (valid, v, n_cloud), (test, s, n_cloud + n_valid)):
            for i, row in enumerate(np.flatnonzero(mask)):
                p = first + i
                assert rows.history[row].tolist() == last(seq[:p], L)
                request = {"train": (p // K) * K, "valid": n_cloud, "test": n_cloud + n_valid}[rows.split]
                assert rows.recent[row].tolist() == last(seq[:request], R)
    # In training the upload lags the history: most rows see a different window.
    assert np.mean((train.history != train.recent).any(axis=1)) > 0.8


def test_left_padding(ml100k_dataset):
    for rows in (ml100k_dataset.train.history, ml100k_dataset.train.recent, ml100k_dataset.test_rank.history):
        nonzero = rows != 0
        # once a real item appears, no padding follows it
        assert (np.maximum.accumulate(nonzero, axis=1) == nonzero).all()
    assert (ml100k_dataset.train.recent == 0).all(axis=1).any(), "first request block should upload nothing"


def test_negatives_never_touched(ml100k_dataset, ml100k_interactions):
    x = ml100k_interactions
    touched = np.zeros((x.n_users, x.n_items + 1), dtype=bool)
    touched[x.user, x.item] = True
    for name in ("train", "valid", "test"):
        rows = ml100k_dataset.split(name)
        neg = rows.label == 0
        assert not touched[rows.user[neg], rows.target[neg]].any()
        assert touched[rows.user[~neg], rows.target[~neg]].all()
    for rank in (ml100k_dataset.valid_rank, ml100k_dataset.test_rank):
        negs = rank.candidates[:, 1:]
        assert not touched[rank.user[:, None], negs].any() and (negs >= 1).all()
        s = np.sort(negs, axis=1)
        assert (s[:, 1:] != s[:, :-1]).all(), "ranking negatives repeat within a row"


def test_deterministic_with_seed(ml100k_interactions, ml100k_dataset):
    again = build_dataset(ml100k_interactions, ProtocolConfig(seed=0))
    other = build_dataset(ml100k_interactions, ProtocolConfig(seed=1))
    for name in ("train", "valid", "test"):
        assert np.array_equal(again.split(name).target, ml100k_dataset.split(name).target)
        pos = ml100k_dataset.split(name).label == 1
        assert np.array_equal(other.split(name).target[pos], ml100k_dataset.split(name).target[pos])
        assert not np.array_equal(other.split(name).target, ml100k_dataset.split(name).target)
    assert np.array_equal(again.test_rank.candidates, ml100k_dataset.test_rank.candidates)


def test_device_recent_and_popularity(ml100k_dataset):
    ds = ml100k_dataset
    users, recent = ds.device_recent("test")
    assert recent.shape == (943, CFG.recent_len)
    by_user = dict(zip(users.tolist(), recent))
    rank = ds.test_rank
    assert all(np.array_equal(by_user[u], r) for u, r in zip(rank.user[::97], rank.recent[::97]))
    assert ds.item_popularity[0] == 0
    assert ds.item_popularity.sum() == ds.train.n_positives + 943  # cloud period incl. each first item
    with pytest.raises(MntoolError, match="'valid' or 'test'"):
        ds.device_recent("train")


def test_user_subset_and_empty_split(ml100k_dataset):
    small = ml100k_dataset.for_users([3, 7])
    assert set(small.train.user) == set(small.test_rank.user) == {3, 7}
    assert small.device_users.tolist() == [3, 7] and small.valid_request.shape == (2, CFG.recent_len)
    with pytest.raises(MntoolError, match="empty split 'train'"):
        ml100k_dataset.for_users([])
    with pytest.raises(MntoolError, match="empty split"):
        ml100k_dataset.test.for_users([10_000])


def tiny(times: dict[int, list[int]]):
    """User u rates items 100u+1, 100u+2, ... at the given times (so each user leaves others' items untouched)."""
    users = [u for u, ts in times.items() for _ in ts]
    items = [100 * u + i + 1 for u, ts in times.items() for i in range(len(ts))]
    stamps = [t for ts in times.values() for t in ts]
    return from_raw(np.array(users), np.array(items), np.array(stamps), np.ones(len(users)), "tiny")


def test_ties_at_a_cut_stay_in_one_period():
    # 10 items; the 70% cut (position 7) falls inside a tie group at t=6 covering positions 5..8.
    ds = build_dataset(
        tiny({0: [1, 2, 3, 4, 5, 6, 6, 6, 6, 7], 1: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}),
        ProtocolConfig(n_rank_negatives=2, n_negatives=1),
    )
    valid, test = positives(ds.valid), positives(ds.test)
    u0 = valid.user == 0
    # Cuts may fall only where time increases (positions 1-5, 9); 5 is nearest to 7 below 9,
    # so the whole t=6 group is validation and the test cut takes position 9.
    assert valid.timestamp[u0].tolist() == [6, 6, 6, 6]
    assert test.timestamp[test.user == 0].tolist() == [7]
    assert valid.timestamp[valid.user == 1].tolist() == [8] and test.timestamp[test.user == 1].tolist() == [9, 10]


def test_unsplittable_users_are_skipped_and_empty_splits_rejected():
    ds = build_dataset(tiny({0: [5] * 8, 1: list(range(10))}), ProtocolConfig(n_rank_negatives=2, n_negatives=1))
    assert ds.skipped_users == 1 and ds.device_users.tolist() == [1] and 0 not in ds.train.user
    with pytest.raises(MntoolError, match="empty split"):
        build_dataset(tiny({0: [5] * 8, 1: [3] * 8}), ProtocolConfig(n_rank_negatives=2, n_negatives=1))


@pytest.mark.parametrize("bad", [dict(cloud_frac=0.9, valid_frac=0.2), dict(history_len=0), dict(min_history=-1)])
def test_bad_config(bad):
    with pytest.raises(MntoolError):
        ProtocolConfig(**bad)


def test_not_enough_items_for_negatives():
    with pytest.raises(MntoolError, match="cannot sample 99 ranking negatives"):
        build_dataset(tiny({0: list(range(10)), 1: list(range(10))}))


def test_cli_stats_json(ml100k_dir, capsys):
    assert main(["data", "stats", str(ml100k_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["users"] == 943 and out["protocol_version"] == "ts-v1"
    assert out["popularity"]["test"]["auc"] > 0.7  # popularity is a strong floor on MovieLens
