"""The ranking form of a compiled recommender: how one ranking request (one user's history and the C
candidates to order) goes into an artifact, and how a request's scores come out.

Two layouts, declared by the exporting caller in the weight map's `form` (docs/weight-map.md):
- `candidates` (the default for recommenders since issue 19): inputs `history (H, L)` and
  `target (H, C)`, output `logits (H, C)`: each history is encoded once per call, whatever C is.
  A call serves H requests.
- `rows`: inputs `history (B, L)` and `target (B,)`, one row per candidate, output `logits (B,)`:
  the history is re-encoded for every candidate. A request of C candidates takes C / B calls.

`score` feeds either layout from the same arrays (histories (N, L), candidates (N, K)), padding the
last call, so callers (the demo, the fleet example, benchmarks) never branch on the layout.
Numpy only: this runs on the device side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from device_runtime.errors import MntoolError
from device_runtime.weight_map import WeightMap

KIND = "ranking"
LAYOUTS = ("candidates", "rows")


class RankingFormError(MntoolError):
    """An artifact's declared ranking form is malformed, or inputs do not fit it."""


@dataclass(frozen=True)
class RankingForm:
    """`layout`; `per_call`: histories per call (candidates) or rows per call (rows); `candidates`:
    the candidates of one ranking request; `history_len`: clicks per history; `n_items`: valid item
    ids are 1..n_items (0 pads a history)."""

    layout: str
    per_call: int
    candidates: int
    history_len: int
    n_items: int

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise RankingFormError(f"ranking layout {self.layout!r} is not one of {LAYOUTS}")
        for name in ("per_call", "candidates", "history_len", "n_items"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RankingFormError(f"ranking form {name} must be an integer >= 1, got {value!r}")

    # ---- the weight map's `form` ------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> RankingForm:
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise RankingFormError(f"not a ranking form: {d!r}")
        try:
            return cls(**{k: v for k, v in d.items() if k != "kind"})
        except TypeError as err:
            raise RankingFormError(f"malformed ranking form: {err}") from None

    @classmethod
    def of(cls, weight_map: WeightMap | None) -> RankingForm | None:
        """The ranking form a weight map declares, or None (not a recommender, or exported before
        forms were recorded)."""
        if weight_map is None or not weight_map.form or weight_map.form.get("kind") != KIND:
            return None
        return cls.from_dict(weight_map.form)

    # ---- what a call is worth -----------------------------------------------------------------
    @property
    def calls_per_request(self) -> float:
        """Calls of the artifact per ranking request of `candidates` candidates."""
        if self.layout == "candidates":
            return 1.0 / self.per_call
        return self.candidates / self.per_call

    def describe(self) -> str:
        if self.layout == "candidates":
            return f"candidate form, {self.per_call} history x {self.candidates} candidates per call"
        return f"row form, {self.per_call} rows per call ({self.calls_per_request:g} per request of {self.candidates})"

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.layout == "candidates":
            return {"history": (self.per_call, self.history_len), "target": (self.per_call, self.candidates)}
        return {"history": (self.per_call, self.history_len), "target": (self.per_call,)}


def score(runner, form: RankingForm, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Logits (N, K) of `candidates` (N, K) for `history` (N, L) through a compiled artifact of
    ranking form `form` (any K: a request's candidates are split over calls, the last call padded
    by repeating its last history / candidate; padding is dropped)."""
    history = np.asarray(history)
    candidates = np.asarray(candidates)
    if history.ndim != 2 or candidates.ndim != 2 or len(history) != len(candidates):
        raise RankingFormError(
            f"score needs history (N, L) and candidates (N, K), got {history.shape} and {candidates.shape}"
        )
    if history.shape[1] != form.history_len:
        raise RankingFormError(f"histories of {history.shape[1]} clicks; the artifact reads {form.history_len}")
    n, k = candidates.shape
    out = np.empty((n, k), dtype=np.float32)
    if n == 0 or k == 0:
        return out
    if form.layout == "rows":
        flat_h = np.repeat(history, k, axis=0)
        out[:] = _score_rows(runner, form.per_call, flat_h, candidates.reshape(-1)).reshape(n, k)
        return out
    H, C = form.per_call, form.candidates
    for i in range(0, n, H):
        h = _pad_rows(history[i : i + H], H)
        m = min(H, n - i)
        for j in range(0, k, C):
            c = candidates[i : i + H, j : j + C]
            w = c.shape[1]
            if w < C:
                c = np.concatenate([c, np.repeat(c[:, -1:], C - w, axis=1)], axis=1)
            logits = runner.run({"history": h, "target": _pad_rows(c, H)})["logits"].reshape(H, C)
            out[i : i + m, j : j + w] = logits[:m, :w]
    return out


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    return a if len(a) == rows else np.concatenate([a, np.repeat(a[-1:], rows - len(a), axis=0)])


def _score_rows(runner, batch: int, history: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = np.empty(len(target), dtype=np.float32)
    for i in range(0, len(target), batch):
        h, t = history[i : i + batch], target[i : i + batch]
        n = len(t)
        out[i : i + n] = runner.run({"history": _pad_rows(h, batch), "target": _pad_rows(t, batch)})["logits"].reshape(
            -1
        )[:n]
    return out


def request_inputs(form: RankingForm, history: np.ndarray, candidates: np.ndarray) -> dict[str, np.ndarray]:
    """The feeds of one call serving the ranking request (history (L,), candidates (C,)) in `form`
    (candidate layout: the request repeated over the call's histories; rows: one row per candidate,
    a row-form call holding exactly one request)."""
    history, candidates = np.asarray(history), np.asarray(candidates)
    if candidates.shape != (form.candidates,) or history.shape != (form.history_len,):
        raise RankingFormError(
            f"a request of history {history.shape} and candidates {candidates.shape} does not fit "
            f"{form.describe()} (history ({form.history_len},), {form.candidates} candidates)"
        )
    if form.layout == "candidates":
        return {"history": np.tile(history, (form.per_call, 1)), "target": np.tile(candidates, (form.per_call, 1))}
    if form.per_call != form.candidates:
        raise RankingFormError(f"timing a request needs a row form of one request per call, not {form.describe()}")
    return {"history": np.tile(history, (form.per_call, 1)), "target": candidates}


def time_requests(
    runners: dict, history: np.ndarray, candidates: np.ndarray, runs: int, warmup: int = 20, rounds: int = 10
) -> dict:
    """Latency per ranking request of artifacts that score the same request in different forms
    (`runners`: name -> (runner, RankingForm)), timed interleaved in one process so that drift on
    a shared host hits each alike. Returns per name: the form, `LatencyStats` per request (a call
    that serves several requests counts its share), and the request's logits; plus
    `max_abs_difference` between every runner's logits and the first's."""
    from device_runtime.bench import LatencyStats, time_interleaved

    calls, logits, share = {}, {}, {}
    for name, (runner, form) in runners.items():
        arrays = runner.prepare(request_inputs(form, history, candidates))
        out = runner.run(request_inputs(form, history, candidates))["logits"].reshape(-1)[: form.candidates]
        logits[name] = out
        share[name] = min(form.calls_per_request, 1.0) if form.layout == "candidates" else 1.0
        for _ in range(warmup):
            runner.invoke(arrays)
        calls[name] = lambda r=runner, a=arrays: r.invoke(a)
    samples = time_interleaved(calls, runs, rounds)
    first = next(iter(logits.values()))
    return {
        "forms": {
            name: {
                "form": form.to_dict(),
                "latency": LatencyStats.of(np.asarray(samples[name]) * share[name]),
                "logits": logits[name],
            }
            for name, (_, form) in runners.items()
        },
        "max_abs_difference": float(max(np.abs(v.astype(np.float64) - first).max() for v in logits.values())),
    }
