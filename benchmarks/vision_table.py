"""The vision results table (docs/vision.md): {lenet, mobilenet} x {static, bn-adapt, tent, finetune,
metanetwork and its controls} on the per-device MNIST protocol (img-v1), test period, mean +- std
over seeds, paired differences to static (per seed, then mean +- std). (Each run's batched
personalisation time is in the JSON; the per-device cost figures come from vision_cost.py.)

Every cell is a real `mntool train --task mnist` run (a subprocess, one at a time: this machine has
two cores); finished runs are reused, so the script can be interrupted and resumed. Selection
(epochs, the baselines' hyperparameters) is on the validation period only; the test period is
scored once per run.

    .venv/bin/python benchmarks/vision_table.py --out runs/vision --seeds 0 1 2
    .venv/bin/python benchmarks/vision_table.py --out runs/vision --report-only --json docs/vision-table.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STATIC = "{static}"  # the static cell's checkpoint of the same model and seed
METHODS = {  # cell name -> extra `mntool train` arguments
    "static": ["--method", "static"],
    "bn-adapt": ["--method", "bn-adapt", "--init", STATIC],
    "tent": ["--method", "tent", "--init", STATIC],
    "finetune (K labels)": ["--method", "finetune", "--init", STATIC],
    "metanetwork": ["--method", "metanetwork", "--init", STATIC],  # generator on the deployed static model
    "metanetwork w/o stabilizer": ["--method", "metanetwork", "--init", STATIC, "--no-stabilizer"],
    "metanetwork, shuffled uploads": ["--method", "metanetwork", "--init", STATIC, "--shuffled-uploads"],
    "metanetwork, joint backbone": ["--method", "metanetwork"],  # backbone and generator from scratch
}
PAIRED_TO = ("static", "bn-adapt")  # per-seed differences to these cells
METRICS = ("device_mean_accuracy", "accuracy", "macro_f1", "nll", "ece")
LABELS = {"device_mean_accuracy": "dev-mean acc", "accuracy": "acc", "macro_f1": "macro-F1", "nll": "NLL", "ece": "ECE"}


def run_dir(out: Path, model: str, seed: int, method: str) -> Path:
    return out / model / f"seed{seed}" / method.replace(",", "").replace(" ", "-").replace("(", "").replace(")", "")


def train_cell(out: Path, model: str, seed: int, method: str, epochs: int, data: str | None) -> Path:
    target = run_dir(out, model, seed, method)
    if (target / "metrics.json").is_file():
        return target
    args = [a.replace(STATIC, str(run_dir(out, model, seed, "static"))) for a in METHODS[method]]
    cmd = [sys.executable, "-m", "mntool.cli.main", "train", "--task", "mnist", "--model", model, "--seed", str(seed)]
    cmd += args + ["--epochs", str(epochs), "--out", str(target), "--quiet"] + (["--data", data] if data else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"{model} seed {seed} {method}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return target


def collect(out: Path, models, seeds) -> dict:
    """{model: {method: {seed: metrics.json}}} for the finished cells."""
    found: dict = {}
    for model in models:
        for method in METHODS:
            for seed in seeds:
                f = run_dir(out, model, seed, method) / "metrics.json"
                if f.is_file():
                    found.setdefault(model, {}).setdefault(method, {})[seed] = json.loads(f.read_text())
    return found


def summarise(found: dict) -> dict:
    """Mean/std over seeds per cell, and paired differences to static over the seeds both have."""
    table: dict = {}
    for model, methods in found.items():
        for method, runs in methods.items():
            seeds = sorted(runs)
            cell = {"seeds": seeds}
            for m in METRICS:
                v = np.array([runs[s]["test"][m] for s in seeds])
                cell[m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
                for ref in PAIRED_TO:
                    base = methods.get(ref, {})
                    paired = [s for s in seeds if s in base]
                    if method != ref and paired:
                        d = np.array([runs[s]["test"][m] - base[s]["test"][m] for s in paired])
                        cell[m][f"diff_to_{ref}"] = {
                            "mean": float(d.mean()),
                            "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                            "seeds": paired,
                        }
            cost = [runs[s]["test"].get("personalise_ms_per_device") for s in seeds]
            if all(c is not None for c in cost):
                cell["personalise_ms_per_device"] = float(np.mean(cost))
            table.setdefault(model, {})[method] = cell
    return table


def markdown(table: dict) -> str:
    lines = []
    for model, cells in table.items():
        lines += [
            f"**{model}** (test period; mean ± std over the seeds listed; Δ: per-seed difference to the static "
            "model of the same seed, mean ± std)",
            "",
            "| method | seeds | dev-mean acc | Δ to static (paired) | Δ to bn-adapt (paired) | acc | macro-F1 | NLL | ECE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, c in cells.items():
            diffs = []
            for ref in PAIRED_TO:
                d = c["device_mean_accuracy"].get(f"diff_to_{ref}")
                diffs.append(f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} pt" if d else "—")
            row = [
                f"{100 * c[m]['mean']:.2f} ± {100 * c[m]['std']:.2f}"
                for m in ("device_mean_accuracy", "accuracy", "macro_f1")
            ]
            row += [f"{c[m]['mean']:.3f} ± {c[m]['std']:.3f}" for m in ("nll", "ece")]
            seeds = ",".join(map(str, c["seeds"]))
            lines.append(f"| {method} | {seeds} | {row[0]} | {diffs[0]} | {diffs[1]} | " + " | ".join(row[1:]) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/vision"))
    ap.add_argument("--models", nargs="+", default=["lenet", "mobilenet"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="cells to run (names as in the table)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--data", default=None, help="MNIST directory [default: the fetched cache]")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the summary as JSON here")
    args = ap.parse_args()
    if not args.report_only:
        for model in args.models:
            for seed in args.seeds:
                for method in ["static"] + [m for m in args.methods if m != "static"]:
                    train_cell(args.out, model, seed, method, args.epochs, args.data)
    table = summarise(collect(args.out, args.models, args.seeds))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    print(markdown(table))


if __name__ == "__main__":
    main()
