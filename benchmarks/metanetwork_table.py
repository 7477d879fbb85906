"""The MetaNetwork results table: {backbone} x {static, finetune, metanetwork, no stabilizer} x
{AUC, UAUC, NDCG@10, HR@10} on the MovieLens-100k device (test) period, mean +- std over seeds,
plus the stabilizer figures (oscillation, steps to 95% of the UAUC gain) and per-device cost.

Every cell is a real `mntool train` run (a subprocess, one thread each, `--jobs` at a time);
finished runs are reused, so the script can be interrupted and resumed. Selection is on the
validation period only (mntool.train); the test period is scored once per run.

    .venv/bin/python benchmarks/metanetwork_table.py --out runs/table --jobs 2
    .venv/bin/python benchmarks/metanetwork_table.py --out runs/table --report-only --doc docs/metanetwork.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

STATIC = "{static}"  # stands for the static cell's checkpoint of the same backbone and seed
METHODS = {  # cell name -> extra `mntool train` arguments
    "static": ["--method", "static"],
    "finetune": ["--method", "finetune", "--init", STATIC],
    "metanetwork": ["--method", "metanetwork"],  # backbone and generator together, from scratch
    "metanetwork w/o stabilizer": ["--method", "metanetwork", "--no-stabilizer"],
    # controls: what the uploads buy, and what patching a deployed static model (frozen backbone) buys
    "metanetwork, shuffled uploads": ["--method", "metanetwork", "--shuffled-uploads"],
    "metanetwork, frozen backbone": ["--method", "metanetwork", "--init", STATIC],
}
CONTROL = "metanetwork, shuffled uploads"
METRICS = ("auc", "uauc", "ndcg@10", "hr@10")


def run_dir(out: Path, model: str, seed: int, method: str) -> Path:
    return out / model / f"seed{seed}" / method.replace(",", "").replace(" ", "-").replace("/", "")


def train_cell(
    out: Path,
    model: str,
    seed: int,
    method: str,
    epochs: int | None,
    data: str | None,
    history_len: int,
    recent_len: int,
) -> Path:
    target = run_dir(out, model, seed, method)
    if (target / "metrics.json").is_file():
        return target
    cmd = [
        sys.executable,
        "-m",
        "mntool.cli.main",
        "train",
        "--model",
        model,
        "--seed",
        str(seed),
        "--out",
        str(target),
        "--history-len",
        str(history_len),
        "--recent-len",
        str(recent_len),
        "--quiet",
        *(str(run_dir(out, model, seed, "static")) if a == STATIC else a for a in METHODS[method]),
    ]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if data:
        cmd += ["--data", data]
    seconds = run_one_thread(cmd)
    print(f"  {model:8s} seed {seed} {method:28s} {seconds:6.0f} s", flush=True)
    return target


def run_one_thread(cmd: list[str]) -> float:
    """Run a training command with one math thread (grids run `--jobs` of them side by side);
    its wall seconds, or exit with its stderr's tail if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def run_grid(
    out: Path,
    models: list[str],
    seeds: list[int],
    methods: list[str],
    jobs: int,
    epochs: int | None,
    data: str | None,
    history_len: int,
    recent_len: int,
) -> None:
    # statics first (finetune and the frozen-backbone cells start from them), then the rest in parallel
    with ThreadPoolExecutor(jobs) as pool:
        list(
            pool.map(
                lambda ms: train_cell(out, ms[0], ms[1], "static", epochs, data, history_len, recent_len),
                [(m, s) for m in models for s in seeds],
            )
        )
        rest = [(m, s, k) for m in models for s in seeds for k in methods if k != "static"]
        list(pool.map(lambda msk: train_cell(out, *msk, epochs, data, history_len, recent_len), rest))


def load(out: Path, model: str, seed: int, method: str) -> dict | None:
    f = run_dir(out, model, seed, method) / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None


def mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "–"
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def _paired_row(out: Path, model: str, seeds: list[int], base: str, method: str) -> str | None:
    """One row of paired differences `method - base` (same backbone and seed) on the test period:
    mean ± std over seeds of ΔUAUC and ΔNDCG@10, and whether the mean exceeds both the std of the
    differences and the base's own seed std."""
    pairs = [(load(out, model, s, base), load(out, model, s, method)) for s in seeds]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    cells, verdicts = [], []
    for metric in ("uauc", "ndcg@10"):
        diff = np.array([b["test"][metric] - a["test"][metric] for a, b in pairs])
        base_std = np.std([a["test"][metric] for a, _ in pairs], ddof=1) if len(pairs) > 1 else 0.0
        diff_std = diff.std(ddof=1) if len(diff) > 1 else 0.0
        cells.append(f"{diff.mean():+.4f} ± {diff_std:.4f}")
        verdicts.append("yes" if len(diff) > 1 and diff.mean() > max(diff_std, base_std) else "no")
    name = method if base == "static" else f"{method} - {base}"
    return f"| {model} | {name} (n={len(pairs)}) | {cells[0]} | {cells[1]} | {verdicts[0]} | {verdicts[1]} |"


def report(out: Path, models: list[str], seeds: list[int]) -> str:
    lines = [
        "| backbone | method | " + " | ".join(m.upper() if m != "uauc" else "UAUC" for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    extra = [
        "",
        "| backbone | method | oscillation (val loss) | steps to 95% of UAUC gain | best epoch | samples/s (1 thread) |",
        "|---|---|---|---|---|---|",
    ]
    paired = [
        "",
        "Difference to the static model of the same seed (finetune and the frozen-backbone MetaNetwork start "
        "from it; the other MetaNetworks start from the same initial weights), test period, mean ± std over seeds, "
        "and whether the mean difference exceeds both that std and the static model's seed std:",
        "",
        "| backbone | method | ΔUAUC | ΔNDCG@10 | UAUC beats | NDCG@10 beats |",
        "|---|---|---|---|---|---|",
    ]
    control_rows = []
    control = [
        "",
        "What the uploads themselves buy: the MetaNetwork against its shuffled-uploads control of the same "
        "seed (same training, every device reading another device's upload), same columns:",
        "",
        "| backbone | comparison | ΔUAUC | ΔNDCG@10 | UAUC beats | NDCG@10 beats |",
        "|---|---|---|---|---|---|",
    ]
    cost = ["", "| backbone | finetune s/device | metanetwork s/device | ratio |", "|---|---|---|---|"]
    for model in models:
        pop = None
        for method in METHODS:
            runs = [r for r in (load(out, model, s, method) for s in seeds) if r is not None]
            if not runs:
                continue
            pop = runs[0]["popularity"]["test"]
            cells = [mean_std([r["test"][m] for r in runs]) for m in METRICS]
            lines.append(f"| {model} | {method} (n={len(runs)}) | " + " | ".join(cells) + " |")
            train = [r["train"] for r in runs if r.get("train")]
            if train:
                osc = mean_std([t["oscillation"] for t in train])
                steps = [t["steps_to_95pct_gain"] for t in train if t["steps_to_95pct_gain"] is not None]
                extra.append(
                    f"| {model} | {method} | {osc} | {mean_std(steps, 0) if steps else '–'} | "
                    f"{mean_std([t['best_epoch'] for t in train], 1)} | {mean_std([t['samples_per_s'] for t in train], 0)} |"
                )
        for method in [m for m in METHODS if m != "static"]:
            row = _paired_row(out, model, seeds, "static", method)
            if row:
                paired.append(row)
        row = _paired_row(out, model, seeds, CONTROL, "metanetwork")
        if row:
            control_rows.append(row)
        if pop:
            lines.append(f"| {model} | popularity floor | " + " | ".join(f"{pop[m]:.4f}" for m in METRICS) + " |")
        ft = [
            r["test"].get("personalise_seconds_per_device")
            for r in (load(out, model, s, "finetune") for s in seeds)
            if r
        ]
        mn = [
            r["test"].get("personalise_seconds_per_device")
            for r in (load(out, model, s, "metanetwork") for s in seeds)
            if r
        ]
        if ft and mn:
            cost.append(f"| {model} | {np.mean(ft):.2e} | {np.mean(mn):.2e} | {np.mean(ft) / np.mean(mn):.0f}x |")
    return "\n".join(lines + paired + (control + control_rows if control_rows else []) + extra + cost) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/table"))
    ap.add_argument("--models", nargs="+", default=["gru4rec", "sasrec", "din"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        metavar="METHOD",
        help=f"cells to train (static always): {', '.join(METHODS)}",
    )
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    ap.add_argument("--epochs", type=int, help="override the maximum epochs")
    ap.add_argument(
        "--history-len", type=int, default=30, help="clicks the device model reads (mntool train --history-len)"
    )
    ap.add_argument("--recent-len", type=int, default=30, help="items a device uploads (mntool train --recent-len)")
    ap.add_argument("--data", help="MovieLens directory [default: the fetched cache]")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--doc", type=Path, help="also write the tables into this markdown file")
    args = ap.parse_args()
    if not args.report_only:
        run_grid(
            args.out,
            args.models,
            args.seeds,
            args.methods,
            args.jobs,
            args.epochs,
            args.data,
            args.history_len,
            args.recent_len,
        )
    table = report(args.out, args.models, args.seeds)
    print(table)
    if args.doc:
        command = shlex.join(
            [".venv/bin/python", "benchmarks/metanetwork_table.py", *(a for a in sys.argv[1:] if a != "--report-only")]
        )
        args.doc.write_text(
            f"# MetaNetwork table: device model reads {args.history_len} clicks, devices upload {args.recent_len} items\n\n"
            f"MovieLens-100k test period (protocol ts-v1), seeds {', '.join(map(str, args.seeds))}; every cell a real "
            "`mntool train` run selected on validation only. Written by\n\n"
            f"```\n{command}\n```\n\n(finished runs under `{args.out}` are reused; `--report-only` rewrites this page "
            "from them). What the columns mean and how to read them: [metanetwork-results.md](metanetwork-results.md).\n\n"
            + table
        )


if __name__ == "__main__":
    main()
