"""Long-tail buckets (issue 17 item 5): head / torso / tail thirds of the device users by
cloud-period activity, and every metric per bucket in metrics.json (docs/dccl.md, "Long-tail buckets")."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest

from mntool.data import BUCKETS, activity_buckets, cloud_activity
from mntool.metrics import evaluate
from mntool.tasks.movielens import metrics_table
from mntool.train import device_params_for, evaluate_split, grouped_rows, load_checkpoint, score_rows

METRICS = ("auc", "uauc", "ndcg@10", "hr@10")


def _cloud_positives(dataset) -> dict[int, int]:
    """Independently of the code under test: each device user's positive rows in the cloud period."""
    train = dataset.train
    return {int(u): int(np.sum((train.user == u) & (train.label == 1))) for u in dataset.device_users}


def test_buckets_partition_the_device_users(synthetic_dataset):
    buckets = activity_buckets(synthetic_dataset)
    assert tuple(buckets) == BUCKETS == ("head", "torso", "tail")
    sizes = [len(b) for b in buckets.values()]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    together = np.concatenate(list(buckets.values()))
    assert len(np.unique(together)) == len(together)  # disjoint
    assert np.array_equal(np.sort(together), np.sort(synthetic_dataset.device_users))  # union = all devices
    for codes in buckets.values():
        assert codes.dtype == np.int64 and np.all(np.diff(codes) > 0)  # sorted user codes


def _uneven(dataset):
    """The synthetic users all have 40 interactions (27 cloud positives each), so their buckets
    follow user codes alone; this variant keeps 1..27 of each user's cloud sample groups (uneven,
    with ties), so activity decides."""
    train, group = dataset.train, dataset.config.n_negatives + 1
    keep = np.zeros(len(train), dtype=bool)
    for u in dataset.device_users:
        mine = np.flatnonzero(train.user == u)
        keep[mine[: group * (1 + (int(u) * 7919) % 27)]] = True
    return dataclasses.replace(dataset, train=train.take(keep))


@pytest.mark.parametrize("uneven", [False, True])
def test_head_is_at_least_as_active_as_torso_and_torso_as_tail(synthetic_dataset, uneven):
    ds = _uneven(synthetic_dataset) if uneven else synthetic_dataset
    active = _cloud_positives(ds)
    assert np.array_equal(cloud_activity(ds), [active[int(u)] for u in ds.device_users])
    buckets = activity_buckets(ds)
    for upper, lower in (("head", "torso"), ("torso", "tail"), ("head", "tail")):
        for a in buckets[upper]:
            for b in buckets[lower]:
                assert active[int(a)] >= active[int(b)], (upper, int(a), lower, int(b))
                if active[int(a)] == active[int(b)]:
                    assert a < b  # a tie across buckets: the smaller user code ranks higher
    if uneven:  # not vacuous: here the buckets differ in activity
        assert min(active[int(u)] for u in buckets["head"]) > max(active[int(u)] for u in buckets["tail"])


def test_ties_are_broken_by_user_code():
    """Seven device users, activity by code 3: 2, 5: 4, 1: 2, 0: 2, 9: 1, 4: 2, 6: 0 -> ranking 5, 0, 1,
    3, 4, 9, 6 (equal activity: smaller code first), cut 3 / 2 / 2."""
    activity = {3: 2, 5: 4, 1: 2, 0: 2, 9: 1, 4: 2, 6: 0}
    user = np.concatenate([np.repeat(u, 5 * n) for u, n in activity.items()]).astype(np.int64)
    label = np.tile(np.array([1, 0, 0, 0, 0], np.float32), len(user) // 5)
    fake = SimpleNamespace(
        train=SimpleNamespace(user=user, label=label),
        device_users=np.array(sorted(activity), dtype=np.int64),
    )
    buckets = activity_buckets(fake)
    assert {k: v.tolist() for k, v in buckets.items()} == {"head": [0, 1, 5], "torso": [3, 4], "tail": [6, 9]}


def test_buckets_are_decided_on_the_cloud_period_only(synthetic_dataset):
    ds = synthetic_dataset
    buckets = activity_buckets(ds)
    # validation and test rows of other sizes and other users: the buckets stay
    some = ds.device_users[:5]
    changed = dataclasses.replace(
        ds,
        valid=ds.valid.for_users(some),
        test=ds.test.take(np.arange(len(ds.test))[::-1]),
        valid_rank=ds.valid_rank.for_users(ds.device_users[-3:]),
        test_rank=ds.test_rank.take(np.arange(10)),
    )
    again = activity_buckets(changed)
    assert all(np.array_equal(buckets[b], again[b]) for b in BUCKETS)
    # ...whereas the cloud period decides them: a head user whose training rows are cut to one
    # sample group falls to the tail
    user = int(buckets["head"][0])
    mine = np.flatnonzero(ds.train.user == user)
    keep = np.ones(len(ds.train), dtype=bool)
    keep[mine[ds.config.n_negatives + 1 :]] = False
    moved = activity_buckets(dataclasses.replace(ds, train=ds.train.take(keep)))
    assert user in moved["tail"] and user not in moved["head"]


def test_buckets_do_not_depend_on_the_windows(synthetic_dataset, synthetic_dataset_with):
    other = synthetic_dataset_with(history_len=10, recent_len=5)
    a, b = activity_buckets(synthetic_dataset), activity_buckets(other)
    assert all(np.array_equal(a[k], b[k]) for k in BUCKETS)


def test_metrics_json_holds_every_metric_per_bucket(tiny_checkpoints, synthetic_dataset):
    buckets = activity_buckets(synthetic_dataset)
    for path in tiny_checkpoints.values():
        metrics = json.loads((path / "metrics.json").read_text())
        for split in ("valid", "test"):
            for b in BUCKETS:
                section = metrics[split][b]
                assert set(section) == {*METRICS, "users"}
                assert section["users"] == len(buckets[b])
                assert all(0.0 <= section[m] <= 1.0 for m in METRICS)
        table = metrics_table(metrics)
        assert table.splitlines()[1].startswith("valid") and table.splitlines()[3].startswith("popularity")
        assert [line.split()[0] for line in table.splitlines()[4:]] == ["bucket", *BUCKETS]


def test_bucket_metrics_are_evaluate_on_the_bucket_rows(tiny_checkpoints, synthetic_dataset):
    """Score each trained checkpoint here (the evaluation's grouped form: each history once with its
    targets), slice the rows by bucket, call metrics.evaluate: those are the figures evaluate_split
    gives and train() wrote to metrics.json, per bucket and overall."""
    ds = synthetic_dataset
    buckets = activity_buckets(ds)
    group = ds.config.n_negatives + 1
    for method, path in tiny_checkpoints.items():
        metrics = json.loads((path / "metrics.json").read_text())
        ck = load_checkpoint(path)
        for split in ("valid", "test"):
            params = device_params_for(ck.model, ck.config.method, ds, split, ck.config, ck.meta)
            rows, rank = ds.split(split), getattr(ds, f"{split}_rank")
            history, target, _ = grouped_rows(rows, np.arange(len(rows)), group)
            scores = score_rows(ck.model, history, target, rows.user[::group], params).reshape(-1)
            rank_scores = score_rows(ck.model, rank.history, rank.candidates, rank.user, params)
            got = evaluate_split(ck.model, ds, split, params, buckets=buckets)
            overall = evaluate(rows.user, rows.label, scores, rank.user, rank_scores)
            for m in METRICS:
                assert got[m] == overall[m]
                assert metrics[split][m] == pytest.approx(overall[m], abs=1e-9), (method, split, m)
            for b, codes in buckets.items():
                r, q = np.isin(rows.user, codes), np.isin(rank.user, codes)
                assert r.sum() > 0 and q.sum() > 0
                expected = evaluate(rows.user[r], rows.label[r], scores[r], rank.user[q], rank_scores[q])
                assert got[b] == {**expected, "users": len(codes)}, (method, split, b)
                for m in METRICS:
                    assert metrics[split][b][m] == pytest.approx(expected[m], abs=1e-9), (method, split, b, m)
            # every synthetic device user has rows in each period: per-user averages split by bucket size
            for m in ("uauc", "ndcg@10", "hr@10"):
                weighted = sum(got[b][m] * got[b]["users"] for b in BUCKETS) / len(ds.device_users)
                assert weighted == pytest.approx(overall[m], abs=1e-12), (method, split, m)


def test_buckets_leave_the_overall_figures_exactly(tiny_checkpoints, synthetic_dataset):
    ds = synthetic_dataset
    buckets = activity_buckets(ds)
    for path in tiny_checkpoints.values():
        ck = load_checkpoint(path)
        metrics = json.loads((path / "metrics.json").read_text())
        for split in ("valid", "test"):
            params = device_params_for(ck.model, ck.config.method, ds, split, ck.config, ck.meta)
            plain = evaluate_split(ck.model, ds, split, params)
            with_buckets = evaluate_split(ck.model, ds, split, params, buckets=buckets)
            assert list(plain) == list(METRICS)  # without buckets: the four figures, as before
            assert {m: with_buckets[m] for m in METRICS} == plain  # bit for bit
            for m in METRICS:  # and what train() wrote (the same weights, reloaded)
                assert metrics[split][m] == pytest.approx(plain[m], abs=1e-9), (split, m)
            assert list(with_buckets) == [*METRICS, *BUCKETS]


def test_an_empty_bucket_has_no_figures(synthetic_dataset):
    """Two device users: the tail is empty; its figures are None, not an error."""
    ds = synthetic_dataset.for_users(synthetic_dataset.device_users[:2])
    buckets = activity_buckets(ds)
    assert [len(buckets[b]) for b in BUCKETS] == [1, 1, 0]
    from mntool.metrics import evaluate_buckets

    rows, rank = ds.test, ds.test_rank
    scores = np.linspace(0, 1, len(rows))
    rank_scores = np.random.default_rng(0).random(rank.candidates.shape)
    out = evaluate_buckets(rows.user, rows.label, scores, rank.user, rank_scores, buckets)
    assert out["tail"] == {"auc": None, "uauc": None, "ndcg@10": None, "hr@10": None, "users": 0}
    assert out["head"]["users"] == 1 and out["head"]["auc"] is not None
