"""What each part of the MetaStabilizer buys: the gated, RMS-bounded residual alone, the EMA
generator alone, both (`mntool train --method metanetwork`) and neither (`--no-stabilizer`),
each a real `mntool.train.train` run of the default method (backbone and generator together, from
scratch), beside the MetaNetwork table's cells (so it reuses them), 3 seeds, selection on
validation only.

    .venv/bin/python benchmarks/stabilizer_parts.py --table runs/table-l10 --model sasrec --history-len 10
    .venv/bin/python benchmarks/stabilizer_parts.py --table runs/table-l10 --model gru4rec --history-len 10

Prints oscillation of validation loss, steps to 95% of the UAUC gain, and test UAUC / NDCG@10,
mean +- std over seeds. The "both" and "neither" rows are read from the table's own cells.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

PARTS = {"gate only": {"gate": True, "ema": False}, "EMA only": {"gate": False, "ema": True}}


def run_part(
    table: Path, model: str, seed: int, part: str, history_len: int, recent_len: int, data: Path | None
) -> Path:
    out = table / model / f"seed{seed}" / f"stabilizer-{part.replace(' ', '-')}"
    if (out / "metrics.json").is_file():
        return out
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    from mntool.data import ProtocolConfig
    from mntool.data.datasets import load_dataset
    from mntool.meta import MetaConfig
    from mntool.models import BackboneConfig
    from mntool.train import TrainConfig, train

    torch.set_num_threads(1)
    dataset = load_dataset(data, ProtocolConfig(history_len=history_len, recent_len=recent_len))
    cfg = TrainConfig(
        model=model,
        method="metanetwork",
        seed=seed,
        meta=MetaConfig(**PARTS[part]),
        backbone=BackboneConfig(max_history=history_len),
    )  # as `mntool train --history-len` builds it
    train(dataset, cfg, out, progress=False, log=lambda s: None)
    return out


def summary(dirs: list[Path], static: list[Path]) -> str:
    ms = [json.loads((d / "metrics.json").read_text()) for d in dirs]
    st = [json.loads((d / "metrics.json").read_text()) for d in static]
    osc = [m["train"]["oscillation"] for m in ms]
    steps = [m["train"]["steps_to_95pct_gain"] for m in ms if m["train"]["steps_to_95pct_gain"] is not None]
    d_uauc = [m["test"]["uauc"] - s["test"]["uauc"] for m, s in zip(ms, st)]
    d_ndcg = [m["test"]["ndcg@10"] - s["test"]["ndcg@10"] for m, s in zip(ms, st)]

    def f(v, digits=4):
        return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.{digits}f}" if v else "–"

    return (
        f"{f(osc)} | {f(steps, 0)} | {f([m['test']['uauc'] for m in ms])} | {f([m['test']['ndcg@10'] for m in ms])} | "
        f"{f(d_uauc)} | {f(d_ndcg)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--table", type=Path, default=Path("runs/table-l10"), help="metanetwork_table.py --out of the same windows"
    )
    ap.add_argument("--model", default="sasrec")
    ap.add_argument("--history-len", type=int, default=10)
    ap.add_argument("--recent-len", type=int, default=30, help="items a device uploads (the table's --recent-len)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--data", type=Path, help="MovieLens directory [default: the fetched cache]")
    args = ap.parse_args()
    jobs = [(part, seed) for part in PARTS for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        list(
            pool.map(
                run_part,
                *zip(*[(args.table, args.model, s, p, args.history_len, args.recent_len, args.data) for p, s in jobs]),
            )
        )
    seed_dirs = [args.table / args.model / f"seed{s}" for s in args.seeds]
    static = [d / "static" for d in seed_dirs]
    print(
        f"{args.model}, device model reading {args.history_len} clicks, uploads of {args.recent_len}, seeds {args.seeds}"
    )
    print(
        "| stabilizer | oscillation (val loss) | steps to 95% of UAUC gain | test UAUC | test NDCG@10 | ΔUAUC vs static | ΔNDCG@10 vs static |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = {
        "gate + EMA (default)": "metanetwork",
        **{p: f"stabilizer-{p.replace(' ', '-')}" for p in PARTS},
        "none (--no-stabilizer)": "metanetwork-wo-stabilizer",
    }
    for name, cell in rows.items():
        dirs = [d / cell for d in seed_dirs]
        if all((d / "metrics.json").is_file() for d in dirs):
            print(f"| {name} | {summary(dirs, static)} |")


if __name__ == "__main__":
    main()
