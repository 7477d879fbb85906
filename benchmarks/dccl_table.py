"""The DCCL table (docs/dccl.md): static, finetune, MetaPatch, MetaNetwork, MetaNetwork-generated
metapatch, static + MoMoDistill (per teacher) and the best personalisation on the MoMoDistill model,
x {UAUC, NDCG@10} x {all, head, tail users}, on the MovieLens-100k test period, 3 seeds, with
paired differences to static, per-device cost and patch bytes.

Every cell is a real `mntool train` run (a subprocess, one thread, `--jobs` at a time), started
as soon as the cells it reads (its --init / --teacher) have finished; finished runs are reused, so
the script can be interrupted and resumed. Every choice is made on the validation period: the
MoMoDistill teacher and the personalisation method applied to the distilled model are the ones
with the best mean validation UAUC over seeds. The test period is only reported.

    .venv/bin/python benchmarks/dccl_table.py --out runs/dccl --data ../shared/data/ml-100k --jobs 2
    .venv/bin/python benchmarks/dccl_table.py --out runs/dccl --data ../shared/data/ml-100k --report-only --doc docs/dccl.md
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from metanetwork_table import run_one_thread

from device_runtime import weight_map

# cell name -> `mntool train` arguments; "{cell}" stands for that cell's checkpoint (same backbone, seed)
CELLS = {
    "static": ["--method", "static"],
    "metanetwork": ["--method", "metanetwork"],  # backbone and generator together, from the static initial weights
    "metapatch": ["--method", "metapatch", "--init", "{static}"],
    "finetune": ["--method", "finetune", "--init", "{static}"],
    "metanetwork-metapatch": ["--method", "metanetwork", "--init", "{metapatch}"],  # generated z
    "momodistill/metanetwork": ["--method", "momodistill", "--teacher", "{metanetwork}"],
    "momodistill/metapatch": ["--method", "momodistill", "--teacher", "{metapatch}"],
    "momodistill/static": ["--method", "momodistill", "--teacher", "{static}"],  # self-distillation control
    # the same teachers, every row weighted 1 (pooled weights) instead of every device equally
    "momodistill/metanetwork-rows": [
        "--method",
        "momodistill",
        "--teacher",
        "{metanetwork}",
        "--distill-weighting",
        "rows",
    ],
}
CONTROL = "momodistill/static"
TEACHERS = [c for c in CELLS if c.startswith("momodistill/")]
DISTILLED = ["momodistill/metanetwork", "momodistill/metapatch"]  # candidates for "the MoMoDistill model"
# personalisations that apply to a given cloud model (joint MetaNetwork trains its own backbone: not one)
PERSONALISE = {
    "finetune": ["--method", "finetune", "--init", "{cloud}"],
    "metapatch": ["--method", "metapatch", "--init", "{cloud}"],
    "metanetwork-metapatch": ["--method", "metanetwork", "--init", "{cloud+metapatch}"],
}
ROWS = [  # table rows: (label, cell)
    ("static", "static"),
    ("finetune", "finetune"),
    ("metapatch", "metapatch"),
    ("metanetwork", "metanetwork"),
    ("metanetwork-generated metapatch", "metanetwork-metapatch"),
    ("static + MoMoDistill (MetaNetwork teachers)", "momodistill/metanetwork"),
    ("static + MoMoDistill (MetaPatch teachers)", "momodistill/metapatch"),
    ("static + MoMoDistill (MetaNetwork teachers, row weights)", "momodistill/metanetwork-rows"),
    ("static + self-distillation (control: static teacher)", CONTROL),
]
BUCKETS = ("all", "head", "tail")
# what one device receives depends on the method, not on which cloud model it personalises: bytes are
# measured on these cells and looked up by `bytes_cell`
MEASURED = ("static", "finetune", "metapatch", "metanetwork", "metanetwork-metapatch", "momodistill/metapatch")


def bytes_cell(cell: str) -> str:
    """The measured cell whose bytes stand for `cell` (a re-personalisation: its method's; a
    distilled model: any distilled model's artifact)."""
    if "+" in cell:
        return cell.split("+", 1)[1]
    return "momodistill/metapatch" if cell.startswith("momodistill/") else cell


METRICS = ("uauc", "ndcg@10")


def cell_dir(out: Path, model: str, seed: int, cell: str) -> Path:
    return out / model / f"seed{seed}" / re.sub(r"[^a-z0-9+-]", "-", cell.replace("/", "--"))


def deps(args: list[str]) -> list[str]:
    return [a[1:-1] for a in args if a.startswith("{") and a.endswith("}")]


def train_cell(
    out: Path, model: str, seed: int, cell: str, args: list[str], data: str | None, history_len: int
) -> Path:
    target = cell_dir(out, model, seed, cell)
    if (target / "metrics.json").is_file():
        return target
    resolved = [str(cell_dir(out, model, seed, a[1:-1])) if a.startswith("{") else a for a in args]
    cmd = [sys.executable, "-m", "mntool.cli.main", "train", "--model", model, "--seed", str(seed)]
    cmd += ["--history-len", str(history_len), "--out", str(target), "--quiet", *resolved]
    if data:
        cmd += ["--data", data]
    print(f"  {model:8s} seed {seed} {cell:40s} {run_one_thread(cmd):6.0f} s", flush=True)
    return target


def run_cells(out: Path, cells: dict[str, list[str]], models, seeds, jobs: int, data, history_len: int) -> None:
    """Train every (model, seed, cell), each once its dependencies have finished, `jobs` at a time."""
    todo = [(m, s, c) for c in cells for s in seeds for m in models]
    done = {(m, s, c) for m, s, c in todo if (cell_dir(out, m, s, c) / "metrics.json").is_file()}
    done |= {
        (m, s, c) for m in models for s in seeds for c in CELLS if (cell_dir(out, m, s, c) / "metrics.json").is_file()
    }
    running: dict = {}
    with ThreadPoolExecutor(jobs) as pool:
        while True:
            for key in todo:
                m, s, c = key
                if key in done or key in running.values() or len(running) >= jobs:
                    continue
                if all((m, s, d) in done for d in deps(cells[c])):
                    running[pool.submit(train_cell, out, m, s, c, cells[c], data, history_len)] = key
            if not running:
                missing = [k for k in todo if k not in done]
                if missing:
                    raise SystemExit(f"cells whose inputs never finished: {missing}")
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()
                done.add(running.pop(f))


def load(out: Path, model: str, seed: int, cell: str) -> dict | None:
    f = cell_dir(out, model, seed, cell) / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None


def valid_uauc(out: Path, model: str, seeds, cell: str) -> float:
    runs = [load(out, model, s, cell) for s in seeds]
    return float(np.mean([r["valid"]["uauc"] for r in runs])) if all(runs) else float("-inf")


def choices(out: Path, model: str, seeds) -> tuple[str, str]:
    """(distilled cell, personalisation) with the best mean validation UAUC over seeds."""
    distilled = max(DISTILLED, key=lambda c: valid_uauc(out, model, seeds, c))
    method = max(PERSONALISE, key=lambda p: valid_uauc(out, model, seeds, p))
    return distilled, method


def repersonalised_cells(distilled: str, method: str) -> dict[str, list[str]]:
    """The cells that put `method` on the distilled model `distilled` (metanetwork-metapatch needs
    a metapatch cloud phase on it first)."""
    name = f"{distilled}+{method}"
    args = [a.replace("{cloud}", "{" + distilled + "}") for a in PERSONALISE[method]]
    cells = {}
    if "{cloud+metapatch}" in args:
        cells[f"{distilled}+metapatch"] = ["--method", "metapatch", "--init", "{" + distilled + "}"]
        args = [a.replace("{cloud+metapatch}", "{" + f"{distilled}+metapatch" + "}") for a in args]
    cells[name] = args
    return cells


def bucket(metrics: dict, split: str, b: str) -> dict:
    return metrics[split] if b == "all" else metrics[split][b]


def mean_std(values, digits: int = 4) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def paired(
    out: Path, model: str, seeds, cell: str, split: str, b: str, metric: str, base: str = "static"
) -> tuple[float, float, float]:
    """(mean, std) over seeds of cell - base on (split, bucket, metric), and base's seed std."""
    pairs = [(load(out, model, s, base), load(out, model, s, cell)) for s in seeds]
    diff = np.array([bucket(c, split, b)[metric] - bucket(a, split, b)[metric] for a, c in pairs])
    base = np.array([bucket(a, split, b)[metric] for a, _ in pairs])
    return float(diff.mean()), float(diff.std(ddof=1)), float(base.std(ddof=1))


def diff_row(out: Path, model: str, seeds, label: str, cell: str, base: str) -> str:
    """A table row of paired test differences cell - base, bold where the mean exceeds both the std
    of the differences and the base's own seed std."""
    cells = []
    for m in METRICS:
        for b in BUCKETS:
            d, sd, base_sd = paired(out, model, seeds, cell, "test", b, m, base)
            text = f"{d:+.4f} ± {sd:.4f}"
            cells.append(f"**{text}**" if abs(d) > max(sd, base_sd) else text)
    return f"| {label} | " + " | ".join(cells) + " |"


def report(out: Path, models, seeds, patch_bytes: dict | None) -> str:
    head = "| method | " + " | ".join(
        f"{m.upper() if m == 'uauc' else 'NDCG@10'} {b}" for m in METRICS for b in BUCKETS
    )
    lines = []
    for model in models:
        distilled, method = choices(out, model, seeds)
        rows = ROWS + [(f"best personalisation on MoMoDistill: {method} on {distilled}", f"{distilled}+{method}")]
        present = [(label, c) for label, c in rows if all(load(out, model, s, c) for s in seeds)]
        lines += [
            f"### {model}",
            "",
            f"Test period, mean ± std over seeds {', '.join(map(str, seeds))} (head / tail: the most / least active "
            "third of the device users by cloud-period activity, 315 / 314 users):",
            "",
            head + " |",
            "|---|" + "---|" * (len(METRICS) * len(BUCKETS)),
        ]
        for label, c in present:
            runs = [load(out, model, s, c) for s in seeds]
            cells = [mean_std([bucket(r, "test", b)[m] for r in runs]) for m in METRICS for b in BUCKETS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Paired difference to static of the same seed (test), mean ± std over seeds; **bold** where the mean "
            "exceeds both the std of the differences and static's own seed std:",
            "",
            head.replace("method", "method - static") + " |",
            "|---|" + "---|" * (len(METRICS) * len(BUCKETS)),
        ]
        lines += [diff_row(out, model, seeds, label, c, "static") for label, c in present[1:]]
        distilled_rows = [(label, c) for label, c in present if c.startswith("momodistill/") and c != CONTROL]
        if distilled_rows and all(load(out, model, s, CONTROL) for s in seeds):
            lines += [
                "",
                "What the personalised teachers add over distilling the static model into itself (the control: same "
                "loss, weights and student, the static model as every device's teacher), paired by seed, same test:",
                "",
                head.replace("method", "MoMoDistill - self-distillation") + " |",
                "|---|" + "---|" * (len(METRICS) * len(BUCKETS)),
            ]
            lines += [diff_row(out, model, seeds, label, c, CONTROL) for label, c in distilled_rows]
        lines += [
            "",
            f"Chosen on validation UAUC (all users, mean over seeds): the MoMoDistill model `{distilled}`, the "
            f"personalisation `{method}`. The figures chosen on:",
            "",
            "| cell | validation UAUC |",
            "|---|---|",
        ]
        lines += [f"| {c} | {valid_uauc(out, model, seeds, c):.4f} |" for c in [*DISTILLED, *PERSONALISE]]
        lines += [
            "",
            "Per-device cost (the test period's personalisation of all devices, batched, divided by their number; "
            "one thread, with the other grid job running beside it) and the bytes a device receives: a personalised "
            "method's patch per refresh (unsigned, `mntool generate` on seed "
            f"{seeds[0]}'s compiled model), a cloud model's whole artifact once per version (every file of it):",
            "",
            "| method | s / device | gradient steps / device | adaptive values | bytes to a device (ONNX, TFLite) "
            "| cloud training s (this cell) |",
            "|---|---|---|---|---|---|",
        ]
        for label, c in present:
            runs = [load(out, model, s, c) for s in seeds]
            sec = [r["test"].get("personalise_seconds_per_device") for r in runs]
            steps = runs[0]["test"].get("personalise_steps")
            sec_cell = f"{np.mean(sec) * 1e3:.2f} ms" if sec[0] is not None else "0 (one model)"
            pb = (patch_bytes or {}).get(model, {}).get(bytes_cell(c))
            pb_cell = ", ".join(f"{v:,}" for v in pb.values()) if pb else "–"
            steps_cell = "–" if steps is None else str(steps)
            cloud = [cloud_seconds(r) for r in runs]
            lines.append(
                f"| {label} | {sec_cell} | {steps_cell} | {runs[0]['adaptive_values']:,} | {pb_cell} | "
                f"{mean_std(cloud, 0)} |"
            )
        lines.append("")
    return "\n".join(lines)


def cloud_seconds(metrics: dict) -> float:
    """Wall seconds of a cell's cloud training: its epochs (with their validation passes) and, for
    MoMoDistill, scoring the cloud period with the teacher's device models."""
    train = metrics.get("train") or {}
    return sum(e["seconds"] for e in train.get("epochs", [])) + train.get("distill", {}).get("seconds", 0.0)


def measure_patch_bytes(out: Path, models, seed: int, data: str | None) -> dict:
    """Bytes one device receives per method (seed `seed`): a `mntool generate` patch of the
    personalised methods' compiled models (ONNX, TFLite; one device's 30-item upload), and for a
    cloud model (static, MoMoDistill) nothing per device: the whole artifact once per version."""
    result: dict = {}
    recent = list(range(1, 31))
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "recent.json"
        samples.write_text(json.dumps({"items": recent}))
        for model in models:
            result[model] = {}
            for c in MEASURED:
                ckpt = cell_dir(out, model, seed, c)
                if not (ckpt / "metrics.json").is_file():
                    continue
                sizes = {}
                for target, name in (("onnx", "model.onnx"), ("tflite", "model.tflite")):
                    art = Path(tmp) / model / c.replace("/", "--") / target
                    mn = [sys.executable, "-m", "mntool.cli.main"]
                    subprocess.run(
                        [*mn, "export", str(ckpt), "--target", target, "--out", str(art), "--quiet"], check=True
                    )
                    method = json.loads((ckpt / "config.json").read_text())["train"]["method"]
                    if method in ("static", "momodistill"):  # a new artifact, once per version: all its files
                        root = weight_map.artifact_root(art / name)
                        sizes[target] = sum((root / f).stat().st_size for f in weight_map.load(art / name).files)
                        continue
                    patch = Path(tmp) / f"{model}-{c.replace('/', '--')}.{target}.mnpatch"
                    subprocess.run(
                        [*mn, "generate", str(ckpt), str(art / name), "--samples", str(samples), "-o", str(patch)],
                        check=True,
                        capture_output=True,
                    )
                    sizes[target] = patch.stat().st_size
                result[model][c] = sizes
                print(f"  {model} {c}: {sizes}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/dccl"))
    ap.add_argument("--models", nargs="+", default=["sasrec", "gru4rec"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    ap.add_argument("--history-len", type=int, default=10, help="clicks the device model reads")
    ap.add_argument("--data", help="MovieLens directory [default: the fetched cache]")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--doc", type=Path, help="replace the table block of this markdown file (docs/dccl.md)")
    args = ap.parse_args()
    if not args.report_only:
        run_cells(args.out, CELLS, args.models, args.seeds, args.jobs, args.data, args.history_len)
        extra = {}
        for model in args.models:
            extra.update(repersonalised_cells(*choices(args.out, model, args.seeds)))
        run_cells(args.out, {**CELLS, **extra}, args.models, args.seeds, args.jobs, args.data, args.history_len)
    sizes_file = args.out / "patch-bytes.json"
    if not sizes_file.is_file() and not args.report_only:
        sizes_file.write_text(
            json.dumps(measure_patch_bytes(args.out, args.models, args.seeds[0], args.data), indent=2)
        )
    sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else None
    table = report(args.out, args.models, args.seeds, sizes)
    print(table)
    if args.doc:
        command = shlex.join(
            [".venv/bin/python", "benchmarks/dccl_table.py", *(a for a in sys.argv[1:] if a != "--report-only")]
        )
        block = (
            f"<!-- dccl-table:begin (written by benchmarks/dccl_table.py) -->\n```\n{command}\n```\n\n{table}"
            "<!-- dccl-table:end -->"
        )
        text = args.doc.read_text()
        pattern = re.compile(r"<!-- dccl-table:begin.*?<!-- dccl-table:end -->", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{args.doc} has no <!-- dccl-table:begin --> ... <!-- dccl-table:end --> block")
        args.doc.write_text(pattern.sub(lambda _: block, text))


if __name__ == "__main__":
    main()
