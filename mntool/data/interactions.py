"""The `Interactions` table every reader and generator returns, and the raw-id vocabulary.

Raw user/item tokens (whatever the source file calls them) are mapped to contiguous codes once,
here: users to `0..n_users-1`, items to `1..n_items` with `0` reserved for padding. The raw
tokens stay in `user_ids` / `item_ids` so any code can be mapped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_runtime.errors import MntoolError


@dataclass(frozen=True)
class Interactions:
    """One row per (user, item, time) event; all rows count as positive interactions."""

    user: np.ndarray  # (N,) int64 in 0..n_users-1, an index into user_ids
    item: np.ndarray  # (N,) int64 in 1..n_items, an index into item_ids (0 is padding)
    timestamp: np.ndarray  # (N,) int64, seconds
    rating: np.ndarray  # (N,) float32, kept for reference; the protocol ignores it
    user_ids: np.ndarray  # (n_users,) str, raw user token of each user code
    item_ids: np.ndarray  # (n_items + 1,) str, raw item token of each item code; [0] == ""
    source: str  # where the rows came from (a path, or "synthetic(...)")

    def __post_init__(self) -> None:
        n = len(self.user)
        assert all(len(a) == n for a in (self.item, self.timestamp, self.rating)), "ragged Interactions"
        assert self.item_ids[0] == "", "item code 0 is reserved for padding"

    def __len__(self) -> int:
        return len(self.user)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1


def encode_ids(tokens: np.ndarray, *, first_code: int) -> tuple[np.ndarray, np.ndarray]:
    """Map raw tokens to contiguous int64 codes starting at `first_code`.

    Codes follow numeric order when every token is an integer (so MovieLens item 242 keeps code
    242), string order otherwise. Returns (codes, vocabulary) with vocabulary[code - first_code]
    the raw token.
    """
    vocab, inverse = np.unique(tokens.astype(str), return_inverse=True)
    if all(v.lstrip("-").isdigit() for v in vocab):
        order = np.argsort(vocab.astype(np.int64), kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        vocab, inverse = vocab[order], rank[inverse]
    return inverse.astype(np.int64) + first_code, vocab


def from_raw(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, ratings: np.ndarray, source: str
) -> Interactions:
    """Build `Interactions` from raw token columns (str or int) and numeric columns."""
    if len(users) == 0:
        raise MntoolError(f"{source}: no interactions")
    ts = np.asarray(timestamps, dtype=np.float64)
    if not np.all(np.isfinite(ts)) or np.any(ts != np.floor(ts)):
        raise MntoolError(f"{source}: timestamps must be whole seconds")
    user, user_ids = encode_ids(np.asarray(users), first_code=0)
    item, item_vocab = encode_ids(np.asarray(items), first_code=1)
    return Interactions(
        user=user,
        item=item,
        timestamp=ts.astype(np.int64),
        rating=np.asarray(ratings, dtype=np.float32),
        user_ids=user_ids,
        item_ids=np.concatenate([np.array([""]), item_vocab]),
        source=source,
    )
