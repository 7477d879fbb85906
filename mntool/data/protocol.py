"""The time-shift protocol: interactions -> cloud training samples and device-period evaluation.

Each user's interactions, in time order, are split into a cloud period (training), then a device
period cut into validation and test. Every sample carries the device's `recent` upload as of the
request time of its period, so the generator sees the same lagged input in training as in
deployment. The exact rules (version `PROTOCOL_VERSION`) are in docs/data-protocol.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from device_runtime.errors import MntoolError
from mntool.data.interactions import Interactions

PROTOCOL_VERSION = "ts-v1"
SPLITS = ("train", "valid", "test")
CLOUD, VALID, TEST = 0, 1, 2  # period codes
_STREAMS = {"train": 0, "valid": 1, "test": 2, "valid_rank": 3, "test_rank": 4}  # one RNG stream each


@dataclass(frozen=True)
class ProtocolConfig:
    cloud_frac: float = 0.70  # the earliest 70% of each user's interactions are the cloud period
    valid_frac: float = 0.15  # the next 15% validate (model selection only); the rest (15%) is test
    history_len: int = 30  # L: items before the target the device model reads
    recent_len: int = 30  # R: items the device uploads when it requests parameters
    request_every: int = 10  # K: in the cloud period a device re-requests every K interactions
    min_history: int = 1  # cloud interactions with fewer earlier items make no training sample
    n_negatives: int = 4  # pointwise negatives per positive (1:4)
    n_rank_negatives: int = 99  # ranking candidates per positive besides the positive itself
    seed: int = 0  # negative sampling

    def __post_init__(self) -> None:
        if not (0 < self.cloud_frac < 1 and 0 < self.valid_frac < 1 and self.cloud_frac + self.valid_frac < 1):
            raise MntoolError(
                f"protocol fractions must satisfy 0 < cloud_frac, valid_frac and cloud_frac + valid_frac < 1 "
                f"(got {self.cloud_frac}, {self.valid_frac})"
            )
        for name in ("history_len", "recent_len", "request_every", "n_negatives", "n_rank_negatives"):
            if getattr(self, name) < 1:
                raise MntoolError(f"protocol {name} must be >= 1 (got {getattr(self, name)})")
        if self.min_history < 0:
            raise MntoolError(f"protocol min_history must be >= 0 (got {self.min_history})")


class _Rows:
    """Row-aligned numpy arrays (every ndarray field has one row per sample) plus a split name."""

    split: str
    user: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray):
        """The rows at `index` (an index array or boolean mask), in that order."""
        return dataclasses.replace(
            self,
            **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self) if f.name != "split"},
        )

    def for_users(self, users):
        """The rows of the given user codes; MntoolError when none is left."""
        kept = self.take(np.isin(self.user, np.asarray(users, dtype=np.int64)))
        if len(kept) == 0:
            raise MntoolError(
                f"empty split {self.split!r}: none of the {len(np.atleast_1d(users))} selected users has rows in it"
            )
        return kept


@dataclass(frozen=True)
class SampleSet(_Rows):
    """Pointwise samples: each positive followed by its `n_negatives` negatives (label 0)."""

    split: str
    user: np.ndarray  # (N,) int64 user code
    target: np.ndarray  # (N,) int64 item code being scored
    history: np.ndarray  # (N, L) int64, items before the positive in time order, left-padded, latest last
    recent: np.ndarray  # (N, R) int64, the device's upload at its period's request time, left-padded
    label: np.ndarray  # (N,) float32, 1 positive / 0 negative
    timestamp: np.ndarray  # (N,) int64, time of the positive (negatives share it)

    def __post_init__(self) -> None:
        n = len(self.user)
        assert self.history.ndim == 2 and self.recent.ndim == 2, "history/recent must be (N, L) / (N, R)"
        assert all(len(a) == n for a in (self.target, self.history, self.recent, self.label, self.timestamp))

    @property
    def n_positives(self) -> int:
        return int(self.label.sum())


@dataclass(frozen=True)
class RankingSet(_Rows):
    """Ranking tasks: each positive of a period against never-touched negatives."""

    split: str
    user: np.ndarray  # (P,) int64
    history: np.ndarray  # (P, L) int64
    recent: np.ndarray  # (P, R) int64
    candidates: np.ndarray  # (P, 1 + n_rank_negatives) int64, column 0 is the positive
    timestamp: np.ndarray  # (P,) int64, time of the positive

    def __post_init__(self) -> None:
        n = len(self.user)
        assert self.candidates.ndim == 2 and self.candidates.shape[1] >= 2, "candidates must be (P, C)"
        assert all(len(a) == n for a in (self.history, self.recent, self.candidates, self.timestamp))

    @property
    def target(self) -> np.ndarray:
        return self.candidates[:, 0]


@dataclass(frozen=True)
class DeviceDataset:
    """Everything the cloud trains on and the device period is evaluated on (see module doc)."""

    train: SampleSet
    valid: SampleSet
    test: SampleSet
    valid_rank: RankingSet
    test_rank: RankingSet
    n_users: int  # user codes are 0..n_users-1
    n_items: int  # item codes are 1..n_items; 0 is padding
    item_popularity: np.ndarray  # (n_items + 1,) int64, cloud-period interaction count per item
    device_users: np.ndarray  # (U,) int64, users that have a device period
    valid_request: np.ndarray  # (U, R) int64, each device user's upload for the validation period
    test_request: np.ndarray  # (U, R) int64, each device user's upload for the test period
    user_ids: np.ndarray  # (n_users,) raw user tokens
    item_ids: np.ndarray  # (n_items + 1,) raw item tokens, [0] == ""
    skipped_users: int  # users with too few distinct timestamps to split (they are left out)
    config: ProtocolConfig
    protocol_version: str = PROTOCOL_VERSION

    def split(self, name: str) -> SampleSet:
        if name not in SPLITS:
            raise MntoolError(f"unknown split {name!r} (one of {', '.join(SPLITS)})")
        return getattr(self, name)

    def device_recent(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(users (U,), recent (U, R)): what each device uploaded when it requested parameters
        for the `valid` or `test` period."""
        if split not in ("valid", "test"):
            raise MntoolError(f"devices request parameters for 'valid' or 'test', not {split!r}")
        return self.device_users, self.valid_request if split == "valid" else self.test_request

    def for_users(self, users) -> DeviceDataset:
        """The same dataset restricted to some user codes (popularity stays cloud-wide)."""
        users = np.asarray(users, dtype=np.int64)
        keep = np.isin(self.device_users, users)
        return dataclasses.replace(
            self,
            train=self.train.for_users(users),
            valid=self.valid.for_users(users),
            test=self.test.for_users(users),
            valid_rank=self.valid_rank.for_users(users),
            test_rank=self.test_rank.for_users(users),
            device_users=self.device_users[keep],
            valid_request=self.valid_request[keep],
            test_request=self.test_request[keep],
        )

    def with_shuffled_uploads(self, seed: int = 0) -> DeviceDataset:
        """An experimental control: every upload swapped for a random other one of its period
        (cloud samples: another sample group's; device periods: another device's, in its rows
        too). Uploads keep their distribution but no longer describe the device they come with, so
        whatever a MetaNetwork still gains on this dataset does not come from reading uploads.
        Histories, targets and labels are untouched."""
        rng = np.random.default_rng([seed, 7])
        g = self.config.n_negatives + 1
        groups = self.train.recent[::g]  # one upload per positive and its negatives
        train = dataclasses.replace(self.train, recent=np.repeat(groups[rng.permutation(len(groups))], g, axis=0))
        device_index = np.full(self.n_users, -1, dtype=np.int64)
        device_index[self.device_users] = np.arange(len(self.device_users))
        valid_request = self.valid_request[rng.permutation(len(self.device_users))]
        test_request = self.test_request[rng.permutation(len(self.device_users))]

        def rows(r, request):
            return dataclasses.replace(r, recent=request[device_index[r.user]])

        return dataclasses.replace(
            self,
            train=train,
            valid=rows(self.valid, valid_request),
            test=rows(self.test, test_request),
            valid_rank=rows(self.valid_rank, valid_request),
            test_rank=rows(self.test_rank, test_request),
            valid_request=valid_request,
            test_request=test_request,
        )

    def summary(self) -> dict:
        return {
            "protocol_version": self.protocol_version,
            "users": int(len(self.device_users)),
            "items": self.n_items,
            "skipped_users": self.skipped_users,
            **{f"{s}_samples": len(self.split(s)) for s in SPLITS},
            **{f"{s}_positives": self.split(s).n_positives for s in SPLITS},
            "valid_rank_tasks": len(self.valid_rank),
            "test_rank_tasks": len(self.test_rank),
        }


# ---- building -------------------------------------------------------------------------------
def build_dataset(interactions: Interactions, config: ProtocolConfig = ProtocolConfig()) -> DeviceDataset:
    """Apply the time-shift protocol (docs/data-protocol.md) to `interactions`."""
    # Time order per user; a stable sort keeps same-second interactions in source-file order.
    order = np.lexsort((np.arange(len(interactions)), interactions.timestamp, interactions.user))
    user, item, ts = interactions.user[order], interactions.item[order], interactions.timestamp[order]
    start = np.zeros(interactions.n_users + 1, dtype=np.int64)
    start[1:] = np.cumsum(np.bincount(user, minlength=interactions.n_users))
    pos = np.arange(len(user)) - start[user]  # position within the user's sequence

    cloud_end, valid_end = _period_cuts(ts, start, config)  # per user; -1 where not splittable
    has_device = cloud_end[user] >= 0
    period = np.where(pos < cloud_end[user], CLOUD, np.where(pos < valid_end[user], VALID, TEST))
    period[~has_device] = -1

    # Request time of each interaction's period, as an index into the sorted arrays.
    block_start = start[user] + (pos // config.request_every) * config.request_every
    request = np.select(
        [period == CLOUD, period == VALID], [block_start, start[user] + cloud_end[user]], start[user] + valid_end[user]
    )

    touched = np.zeros((interactions.n_users, interactions.n_items + 1), dtype=bool)
    touched[user, item] = True
    touched[:, 0] = True  # padding is never a candidate
    _check_room(touched, config)

    def rows(mask: np.ndarray) -> tuple[np.ndarray, ...]:
        g = np.flatnonzero(mask)
        history = _window(item, g, pos[g], config.history_len)
        recent = _window(item, request[g], request[g] - start[user[g]], config.recent_len)
        return user[g], item[g], history, recent, ts[g]

    def rng(stream: str) -> np.random.Generator:
        return np.random.default_rng([config.seed, _STREAMS[stream]])

    train = _pointwise("train", rows((period == CLOUD) & (pos >= config.min_history)), touched, config, rng("train"))
    valid = _pointwise("valid", rows(period == VALID), touched, config, rng("valid"))
    test = _pointwise("test", rows(period == TEST), touched, config, rng("test"))
    valid_rank = _ranking("valid", rows(period == VALID), touched, config, rng("valid_rank"))
    test_rank = _ranking("test", rows(period == TEST), touched, config, rng("test_rank"))

    device_users = np.flatnonzero(cloud_end >= 0)
    first = start[device_users]
    return DeviceDataset(
        train=train,
        valid=valid,
        test=test,
        valid_rank=valid_rank,
        test_rank=test_rank,
        n_users=interactions.n_users,
        n_items=interactions.n_items,
        item_popularity=np.bincount(item[period == CLOUD], minlength=interactions.n_items + 1).astype(np.int64),
        device_users=device_users,
        valid_request=_window(item, first + cloud_end[device_users], cloud_end[device_users], config.recent_len),
        test_request=_window(item, first + valid_end[device_users], valid_end[device_users], config.recent_len),
        user_ids=interactions.user_ids,
        item_ids=interactions.item_ids,
        skipped_users=int(np.sum(cloud_end < 0)),
        config=config,
    )


def _period_cuts(ts: np.ndarray, start: np.ndarray, config: ProtocolConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the positions where the validation and the test period begin.

    A cut may only fall where the timestamp strictly increases, so no later period holds an
    interaction as old as one of an earlier period; among those places each cut is the nearest
    to its target fraction (the earlier on a tie). Users with fewer than three distinct
    timestamps cannot be cut and get -1.
    """
    n_users = len(start) - 1
    cloud_end = np.full(n_users, -1, dtype=np.int64)
    valid_end = np.full(n_users, -1, dtype=np.int64)
    new_time = np.ones(len(ts), dtype=bool)
    new_time[1:] = ts[1:] > ts[:-1]
    for u in range(n_users):
        n = start[u + 1] - start[u]
        cuts = np.flatnonzero(new_time[start[u] + 1 : start[u + 1]]) + 1  # positions 1..n-1
        if len(cuts) < 2:
            continue
        c1 = _nearest(cuts[:-1], n * config.cloud_frac)
        cloud_end[u] = c1
        valid_end[u] = _nearest(cuts[cuts > c1], n * (config.cloud_frac + config.valid_frac))
    return cloud_end, valid_end


def _nearest(cuts: np.ndarray, target: float) -> int:
    return int(cuts[np.argmin(np.abs(cuts - target))])


def _window(item: np.ndarray, end: np.ndarray, end_pos: np.ndarray, length: int) -> np.ndarray:
    """For each row, the `length` items of the same user just before sorted index `end`
    (exclusive), left-padded with 0 where the user's sequence starts (`end_pos` = its position)."""
    back = np.arange(length, 0, -1)  # (length,) steps back from `end`, oldest first
    index = end[:, None] - back  # (n, length)
    inside = (end_pos[:, None] - back) >= 0
    return np.where(inside, item[np.maximum(index, 0)], 0)


def _check_room(touched: np.ndarray, config: ProtocolConfig) -> None:
    untouched = touched.shape[1] - touched.sum(axis=1)
    worst = int(np.argmin(untouched))
    if untouched[worst] < config.n_rank_negatives:
        raise MntoolError(
            f"user code {worst} touched all but {untouched[worst]} items; "
            f"cannot sample {config.n_rank_negatives} ranking negatives"
        )


def _sample_negatives(
    rng: np.random.Generator, touched: np.ndarray, users: np.ndarray, count: int, distinct: bool
) -> np.ndarray:
    """(P, count) items each user never touched, uniform, by rejection; `distinct` per row."""
    n_items = touched.shape[1] - 1
    neg = rng.integers(1, n_items + 1, size=(len(users), count))
    active = np.arange(len(users))  # rows that may still hold a rejected entry
    while len(active):
        rows = neg[active]
        bad = touched[users[active, None], rows]
        if distinct:
            bad |= _repeats(rows)
        redo = bad.any(axis=1)
        active, rows, bad = active[redo], rows[redo], bad[redo]
        rows[bad] = rng.integers(1, n_items + 1, size=int(bad.sum()))
        neg[active] = rows
    return neg


def _repeats(a: np.ndarray) -> np.ndarray:
    """Mask of entries equal to an earlier entry of the same row."""
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    repeat_sorted = np.zeros(a.shape, dtype=bool)
    repeat_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    repeat = np.empty_like(repeat_sorted)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    return repeat


def _pointwise(
    split: str, rows: tuple, touched: np.ndarray, config: ProtocolConfig, rng: np.random.Generator
) -> SampleSet:
    user, target, history, recent, ts = rows
    if len(user) == 0:
        raise MntoolError(f"empty split {split!r}: no user has interactions in this period")
    per = 1 + config.n_negatives
    negatives = _sample_negatives(rng, touched, user, config.n_negatives, distinct=False)
    label = np.zeros(per, dtype=np.float32)
    label[0] = 1.0
    return SampleSet(
        split=split,
        user=np.repeat(user, per),
        target=np.concatenate([target[:, None], negatives], axis=1).reshape(-1),
        history=np.repeat(history, per, axis=0),
        recent=np.repeat(recent, per, axis=0),
        label=np.tile(label, len(user)),
        timestamp=np.repeat(ts, per),
    )


def _ranking(
    split: str, rows: tuple, touched: np.ndarray, config: ProtocolConfig, rng: np.random.Generator
) -> RankingSet:
    user, target, history, recent, ts = rows
    if len(user) == 0:
        raise MntoolError(f"empty split {split!r}: no user has interactions in this period")
    negatives = _sample_negatives(rng, touched, user, config.n_rank_negatives, distinct=True)
    return RankingSet(
        split=split,
        user=user,
        history=history,
        recent=recent,
        candidates=np.concatenate([target[:, None], negatives], axis=1),
        timestamp=ts,
    )
