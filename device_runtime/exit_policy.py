"""When to leave an early-exit network (PersEPhonEE): per device, confidence thresholds on the
early exits that trade accuracy for latency, chosen on the device's own rows. Numpy only.

A row leaves at the first early exit whose maximum softmax probability is >= that exit's
threshold, else at the last exit (which always answers). Leaving at exit k costs the latency of
stages 0..k (`stage_costs[k]` is stage k's own latency, e.g. from `mntool bench` on this device).

    per_exit = [logits_exit0, logits_exit1, logits_final]      # each (N, C), the same N rows
    t = choose_thresholds(per_exit, labels, stage_costs, target_accuracy=0.95)
    simulate(per_exit, labels, t, stage_costs)  # {"accuracy": ..., "exit_rates": [...], "mean_cost": ...}

Labels follow the exit trainer's convention: -1 marks an unlabelled row, which counts towards exit
rates and cost but not accuracy (pseudo-labels from the final exit make every row count).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from device_runtime.errors import MntoolError

NEVER = math.inf  # a threshold no probability reaches: that exit never answers
# candidate thresholds: 0 (always leave), coarse steps, then fine ones where confident exits live
DEFAULT_GRID: tuple[float, ...] = (
    0.0,
    *(round(0.3 + 0.05 * i, 2) for i in range(12)),  # 0.3 .. 0.85
    *(round(0.86 + 0.01 * i, 2) for i in range(14)),  # 0.86 .. 0.99
    0.995,
    0.999,
    0.9999,
    1.0,
)
MAX_COMBINATIONS = 200_000  # per-exit search: refuse grids whose product over exits is larger
_CHUNK = 4096  # candidate threshold vectors simulated at once (bounds memory to chunk x N x exits)


class ExitPolicyError(MntoolError):
    """Inconsistent logits, labels, thresholds or costs, or an ill-posed threshold search."""


def confidence(logits) -> np.ndarray | float:
    """The largest softmax probability along the last axis, float64 (stable: 1 / sum exp(l - max l));
    a float for one vector. Unchecked: the hot path of an early exit (the staged runner, the trainer)."""
    if type(logits) is np.ndarray and logits.ndim == 1:  # the hot path: one decision
        return _confidence(logits.tolist())
    z = np.asarray(logits)
    if z.ndim == 1:
        return _confidence(z.tolist())
    rows = z.reshape(-1, z.shape[-1]).tolist()  # row by row, so a batch and one decision agree to the bit
    return np.array([_confidence(r) for r in rows], dtype=np.float64).reshape(z.shape[:-1])


def _confidence(values: list[float]) -> float:
    """One row, in plain Python floats: 3x faster than numpy on 10 logits (an exit decision's hot path)."""
    top = max(values)
    return 1.0 / sum([math.exp(v - top) for v in values])


def max_softmax(logits) -> np.ndarray:
    """(N,) maximum softmax probability of each row of `logits` (N, C), in float64 (stable)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ExitPolicyError(f"logits must be (rows, classes), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ExitPolicyError("logits hold NaN or Inf")
    if z.shape[0] == 0:
        return np.zeros(0)
    return confidence(z)


def _exits(per_exit_logits) -> list[np.ndarray]:
    exits = [np.asarray(e) for e in per_exit_logits]
    if not exits:
        raise ExitPolicyError("need the logits of at least one exit")
    if any(e.ndim != 2 for e in exits) or len({e.shape for e in exits}) != 1:
        raise ExitPolicyError(
            f"every exit's logits must be (rows, classes) of one shape, got {[e.shape for e in exits]}"
        )
    return exits


def _thresholds(thresholds, n_early: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(n_early, float(t))
    if t.shape != (n_early,):
        raise ExitPolicyError(f"give one threshold per early exit ({n_early}) or one for all, got shape {t.shape}")
    if np.isnan(t).any():
        raise ExitPolicyError("thresholds hold NaN")
    return t


def _costs(stage_costs, n_exits: int) -> np.ndarray:
    c = np.asarray(stage_costs, dtype=np.float64)
    if c.shape != (n_exits,) or not np.isfinite(c).all() or (c < 0).any():
        raise ExitPolicyError(f"stage_costs must be {n_exits} finite non-negative latencies, got {stage_costs!r}")
    return np.cumsum(c)  # exiting at k runs stages 0..k


def _labels(labels, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise ExitPolicyError(f"labels must be ({n},) integers (-1 = unlabelled), got {y.dtype} {y.shape}")
    if ((y < -1) | (y >= n_classes)).any():
        raise ExitPolicyError(f"labels must lie in [-1, {n_classes})")
    return y.astype(np.int64)


def _first_exit(confidence: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """confidence (N, E-1), thresholds (..., E-1) -> (..., N) index of the first early exit whose
    confidence reaches its threshold, else E-1 (the last exit)."""
    hits = confidence >= thresholds[..., None, :]  # (..., N, E-1)
    n_early = confidence.shape[1]
    return np.where(hits.any(axis=-1), hits.argmax(axis=-1), n_early)


def exit_index(per_exit_logits: Sequence, thresholds) -> np.ndarray:
    """(N,) int64: for each row, the first early exit whose max softmax is >= its threshold, else
    the last exit. `per_exit_logits`: E arrays (N, C), the last the final exit; `thresholds`: E-1
    values (one per early exit; >1 or inf: never leave there), or one value for all."""
    exits = _exits(per_exit_logits)
    t = _thresholds(thresholds, len(exits) - 1)
    if len(exits) == 1:
        return np.zeros(exits[0].shape[0], np.int64)
    confidence = np.stack([max_softmax(e) for e in exits[:-1]], axis=1)
    return _first_exit(confidence, t).astype(np.int64)


def simulate(per_exit_logits: Sequence, labels, thresholds, stage_costs) -> dict:
    """What `thresholds` would do on these rows: {"accuracy": correct / labelled rows (nan when
    none is labelled), "exit_rates": share of rows leaving at each exit (E floats), "mean_cost":
    mean over rows of the summed cost of the stages each row runs}."""
    exits = _exits(per_exit_logits)
    n, n_classes = exits[0].shape
    y = _labels(labels, n, n_classes)
    cum = _costs(stage_costs, len(exits))
    k = exit_index(exits, thresholds)
    predictions = np.stack([e.argmax(axis=1) for e in exits], axis=1)  # (N, E)
    correct = predictions[np.arange(n), k] == y
    labelled = y >= 0
    return {
        "accuracy": float(correct[labelled].mean()) if labelled.any() else math.nan,
        "exit_rates": [float(r) for r in np.bincount(k, minlength=len(exits)) / max(n, 1)],
        "mean_cost": float(cum[k].mean()) if n else 0.0,
    }


def choose_thresholds(
    per_exit_logits: Sequence,
    labels,
    stage_costs,
    *,
    target_accuracy: float | None = None,
    latency_budget: float | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    per_exit: bool = False,
) -> tuple[float, ...]:
    """Thresholds (E-1 floats, one per early exit) for this device's rows; give exactly one goal.

    - `target_accuracy`: the cheapest (lowest mean cost) thresholds whose simulated accuracy on
      the labelled rows is >= the target; ties go to the more accurate, then the higher thresholds.
      If none reaches it, the most accurate (then cheapest) candidate.
    - `latency_budget`: the most accurate thresholds whose mean cost is <= the budget; ties go to
      the cheaper, then the higher thresholds. If none fits, the cheapest candidate.

    Candidates: one threshold shared by every early exit, from `grid` (values in [0, 1]) plus
    `NEVER` (inf: always run to the last exit); with `per_exit`, every combination of grid values
    per exit (at most MAX_COMBINATIONS). Simulated exactly as `simulate` does. Labels: -1 marks
    an unlabelled row (counted in cost, not accuracy); at least one row must be labelled.
    """
    if (target_accuracy is None) == (latency_budget is None):
        raise ExitPolicyError("give exactly one of target_accuracy and latency_budget")
    goal = target_accuracy if target_accuracy is not None else latency_budget
    if not isinstance(goal, (int, float, np.floating, np.integer)) or not math.isfinite(goal):
        raise ExitPolicyError(f"the goal must be a finite number, got {goal!r}")
    exits = _exits(per_exit_logits)
    n, n_classes = exits[0].shape
    y = _labels(labels, n, n_classes)
    cum = _costs(stage_costs, len(exits))
    n_early = len(exits) - 1
    if n_early == 0:
        return ()
    labelled = y >= 0
    if not labelled.any():
        raise ExitPolicyError("choosing thresholds needs labelled (or pseudo-labelled) rows")
    values = np.asarray(sorted(set(float(g) for g in grid)), dtype=np.float64)
    if values.size == 0 or np.isnan(values).any() or (values < 0).any() or (values > 1).any():
        raise ExitPolicyError("grid must hold thresholds in [0, 1]")
    values = np.append(values, NEVER)
    if per_exit:
        if values.size**n_early > MAX_COMBINATIONS:
            raise ExitPolicyError(
                f"{values.size} grid values over {n_early} exits make {values.size**n_early} combinations "
                f"(at most {MAX_COMBINATIONS}): use a coarser grid"
            )
        candidates = np.array(list(itertools.product(values, repeat=n_early)), dtype=np.float64)
    else:
        candidates = np.repeat(values[:, None], n_early, axis=1)

    confidence = np.stack([max_softmax(e) for e in exits[:-1]], axis=1)  # (N, E-1)
    correct = np.stack([e.argmax(axis=1) == y for e in exits], axis=1)  # (N, E)
    accuracy = np.empty(len(candidates))
    cost = np.empty(len(candidates))
    rows = np.arange(n)
    for lo in range(0, len(candidates), _CHUNK):
        k = _first_exit(confidence, candidates[lo : lo + _CHUNK])  # (chunk, N)
        accuracy[lo : lo + _CHUNK] = correct[rows, k][:, labelled].mean(axis=1)
        cost[lo : lo + _CHUNK] = cum[k].mean(axis=1)

    height = candidates.sum(axis=1)  # last tie-break: the more conservative (higher) thresholds
    if target_accuracy is not None:
        ok = accuracy >= target_accuracy - 1e-12
        # np.lexsort sorts by the last key first
        order = np.lexsort((-height, -accuracy, cost)) if ok.any() else np.lexsort((-height, cost, -accuracy))
    else:
        ok = cost <= latency_budget + 1e-12 * max(1.0, abs(latency_budget))
        order = np.lexsort((-height, cost, -accuracy)) if ok.any() else np.lexsort((-height, -accuracy, cost))
    if ok.any():
        order = order[ok[order]]
    return tuple(float(t) for t in candidates[order[0]])
