"""Row form vs candidate form: latency per ranking request of the same recommender compiled both
ways (docs/benchmarking.md, "Row form vs candidate form").

For each backbone (GRU4Rec, SASRec, DIN; MovieLens-100k vocabulary, dim 32) and device window
(`--windows`), the model is exported in the row form (`history (100, L)`, `target (100,)`) and in
the candidate form (`history (1, L)`, `target (1, 100)`), then both are timed interleaved in one
process on the same request (`device_runtime.ranking.time_requests`: LiteRT with XNNPACK and ONNX
Runtime, 1 thread), and their logits compared. Latency does not depend on the trained values, so
the models are freshly initialised (seed 0); the exports are proven as usual.

    .venv/bin/python benchmarks/ranking_forms.py --runs 2000 --json docs/ranking-forms.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from device_runtime import ranking
from device_runtime.ranking import RankingForm
from device_runtime.runners import RunnerConfig, find_weight_map, open_runner
from exporters import export
from mntool.models import BackboneConfig, build_model

ML100K_ITEMS = 1682
CANDIDATES = 100
TARGETS = {"litert": ("tflite", ".tflite"), "onnxruntime": ("onnx", ".onnx")}


def export_both(model_name: str, window: int, work: Path) -> dict[str, dict[str, Path]]:
    torch.manual_seed(0)
    model = build_model(model_name, ML100K_ITEMS, BackboneConfig(max_history=window)).eval()
    g = torch.Generator().manual_seed(0)
    history = torch.randint(1, ML100K_ITEMS + 1, (1, window), generator=g)
    history[:, : window // 3] = 0
    out = {}
    for layout, per_call in (("rows", CANDIDATES), ("candidates", 1)):
        form = RankingForm(layout, per_call, CANDIDATES, window, ML100K_ITEMS)
        shape = (1, CANDIDATES) if layout == "candidates" else (CANDIDATES,)
        example = (history.repeat(per_call, 1), torch.randint(1, ML100K_ITEMS + 1, shape, generator=g))
        for runtime, (target, _) in TARGETS.items():
            art = export(
                model,
                example,
                model.adaptive_names(),
                target,
                work / f"{model_name}-{window}-{layout}",
                output_names=("logits",),
                form=form.to_dict(),
            )
            out.setdefault(runtime, {})[layout] = art
    return out


def measure(models, windows, runs: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            for w in windows:
                arts = export_both(m, w, Path(tmp))
                rng = np.random.default_rng(1)
                history = rng.integers(1, ML100K_ITEMS + 1, w)
                candidates = rng.integers(1, ML100K_ITEMS + 1, CANDIDATES)
                for runtime, by_layout in arts.items():
                    runners = {}
                    for layout, art in by_layout.items():
                        wm = find_weight_map(art)
                        runners[layout] = (
                            open_runner(art, weight_map=wm, config=RunnerConfig(threads=1)),
                            RankingForm.of(wm),
                        )
                    try:
                        timed = ranking.time_requests(runners, history, candidates, runs=runs, rounds=20)
                    finally:
                        for r, _ in runners.values():
                            r.close()
                    f = timed["forms"]
                    row = {
                        "model": m,
                        "window": w,
                        "runtime": runtime,
                        "rows_p50_ms": f["rows"]["latency"].p50_ms,
                        "candidates_p50_ms": f["candidates"]["latency"].p50_ms,
                        "rows_p99_ms": f["rows"]["latency"].p99_ms,
                        "candidates_p99_ms": f["candidates"]["latency"].p99_ms,
                        "max_abs_difference": timed["max_abs_difference"],
                    }
                    row["ratio"] = row["candidates_p50_ms"] / row["rows_p50_ms"]
                    rows.append(row)
                    print(
                        f"{m:8s} L={w:<3d} {runtime:12s} rows {row['rows_p50_ms'] * 1e3:8.1f} us  candidates "
                        f"{row['candidates_p50_ms'] * 1e3:7.1f} us  ratio {row['ratio']:.3f}  "
                        f"max |diff| {row['max_abs_difference']:.1e}",
                        flush=True,
                    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gru4rec", "sasrec", "din"])
    ap.add_argument("--windows", nargs="+", type=int, default=[10, 30])
    ap.add_argument("--runs", type=int, default=2000, help="timed requests per artifact")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.models, args.windows, args.runs)
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
