"""The recommender's accuracy-latency frontier (docs/frontier.md): for each backbone, device windows
{5, 10, 20, 30} clicks x {static, metanetwork}, test UAUC / NDCG@10 over seeds against the compiled
candidate-form latency of one ranking request (one history, C candidates) on LiteRT and ONNX Runtime,
1 thread, timed interleaved in one run.

Phase 1 trains every cell as a real `mntool train` subprocess (metanetwork_table.train_cell; finished
runs are reused). The MetaNetwork's upload length is the one chosen on validation per backbone in
docs/metanetwork-results.md (SASRec 100, GRU4Rec 30), not re-chosen per window. Phase 2 exports one
candidate-form artifact per (backbone, window) and times them; the latency of a window does not
depend on the seed or on whether a patch is applied (same graph, same shapes), so it is measured
once per window on seed 0's static model. Phase 3 writes the table, the headline and the plot.

    .venv/bin/python benchmarks/frontier.py --out runs/frontier --data ../shared/data/ml-100k --train-only
    .venv/bin/python benchmarks/frontier.py --out runs/frontier --data ../shared/data/ml-100k \\
        --json docs/frontier.json --plot docs/frontier.png
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from metanetwork_table import train_cell

WINDOWS = (5, 10, 20, 30)
UPLOAD = {"sasrec": 100, "gru4rec": 30}  # chosen on validation: docs/metanetwork-results.md
METHODS = ("static", "metanetwork")


def cell_dir(out: Path, window: int, model: str, seed: int, method: str) -> Path:
    return out / f"l{window}" / model / f"seed{seed}" / method


def train_all(out: Path, models, seeds, windows, jobs: int, data: str | None) -> None:
    """Every (seed, backbone, window, method) cell, seed by seed so partial results are complete seeds."""
    cells = [(s, m, w, k) for s in seeds for m in models for w in windows for k in METHODS]

    def one(c):
        s, m, w, k = c
        return train_cell(out / f"l{w}", m, s, k, None, data, w, UPLOAD[m])

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, cells))


def load(out: Path, window: int, model: str, seed: int, method: str) -> dict | None:
    f = cell_dir(out, window, model, seed, method) / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None


# ---- phase 2: compiled latency per ranking request ---------------------------------------------------
RUNTIMES = {"litert": ("tflite", ".tflite"), "onnxruntime": ("onnx", ".onnx")}
LAYOUTS = ("candidates", "rows")


def export_all(out: Path, models, windows) -> dict:
    """One artifact per (backbone, window, target, layout), from seed 0's static model (the
    MetaNetwork's patched artifact is the same graph with other constants); reused if present."""
    from exporters import export
    from mntool.train import load_checkpoint

    arts = {}
    for m in models:
        for w in windows:
            ckpt = None
            for target, suffix in RUNTIMES.values():
                for layout in LAYOUTS:
                    d = out / "artifacts" / f"l{w}" / m / layout
                    art = d / f"model{suffix}"
                    if not art.is_file():
                        ckpt = ckpt or load_checkpoint(cell_dir(out, w, m, 0, "static"))
                        example, form = ckpt.export_inputs(layout=layout)
                        export(ckpt.model, example, ckpt.adaptive, target, d, output_names=("logits",), form=form)
                    arts[m, w, target, layout] = art
    return arts


def time_all(arts: dict, runs: int, rounds: int) -> dict:
    """Per runtime, every artifact (all windows, both forms) timed interleaved in one process, 1
    thread, so that drift on the host hits every window alike and the ratios between windows
    compare like with like; each on one request of generated valid item ids of its window; latency
    per ranking request (a row-form call is one request of 100 rows here)."""
    import numpy as np

    from device_runtime import ranking
    from device_runtime.bench import LatencyStats, time_interleaved
    from device_runtime.ranking import RankingForm
    from device_runtime.runners import RunnerConfig, find_weight_map, open_runner

    out = {}
    for runtime, (target, _) in RUNTIMES.items():
        runners, calls, logits = {}, {}, {}
        try:
            for (m, w, t, layout), art in arts.items():
                if t != target:
                    continue
                wm = find_weight_map(art)
                form = RankingForm.of(wm)
                runner = open_runner(art, weight_map=wm, config=RunnerConfig(threads=1))
                name = f"{m}/{w}/{layout}"
                runners[name] = runner
                rng = np.random.default_rng(w)  # the same request for both forms of a window
                feeds = ranking.request_inputs(
                    form, rng.integers(1, form.n_items + 1, form.history_len), rng.integers(1, form.n_items + 1, 100)
                )
                arrays = runner.prepare(feeds)
                logits[name] = runner.run(feeds)["logits"].reshape(-1)
                for _ in range(20):
                    runner.invoke(arrays)
                calls[name] = lambda r=runner, a=arrays: r.invoke(a)
            for name in logits:  # both forms of a window score its request alike
                if name.endswith("/rows"):
                    other = logits[name.replace("/rows", "/candidates")]
                    assert np.abs(logits[name] - other).max() <= 1e-4, name
            samples = time_interleaved(calls, runs, rounds)
            out[runtime] = {}
            for name, v in samples.items():
                stats = LatencyStats.of(np.asarray(v))
                out[runtime][name] = {"p50_ms": stats.p50_ms, "p99_ms": stats.p99_ms}
        finally:
            for runner in runners.values():
                runner.close()
    return out


def count_all(out: Path, arts: dict, runs: int) -> dict:
    """Instructions per ranking request on the emulated arm64 device (`device_runtime.qemu.bench`:
    Cortex-A76 under qemu-aarch64, `mntool device setup qemu-arm64` first), every candidate-form
    artifact and the row form on LiteRT; cached in OUT/arm64.json (counts do not depend on host
    load, so this may run beside other jobs)."""
    from device_runtime import qemu
    from device_runtime.ranking import RankingForm
    from device_runtime.runners import find_weight_map

    cache = out / "arm64.json"
    counts = json.loads(cache.read_text()) if cache.is_file() else {}
    for (m, w, target, layout), art in arts.items():
        key = f"{target}/{m}/{w}/{layout}"
        if key in counts or (layout == "rows" and target != "tflite"):
            continue
        report = qemu.bench(art, [], config=qemu.QemuBenchConfig(runs=runs))
        form = RankingForm.of(find_weight_map(art))
        counts[key] = {
            "instructions_per_request": report["unpatched"]["instructions_per_inference"] * form.calls_per_request,
            "spread": report["unpatched"]["spread"],
            "max_abs_error_vs_host": report["unpatched"]["max_abs_error_vs_host"],
            "emulator": report["emulator"],
        }
        cache.write_text(json.dumps(counts, indent=2) + "\n")
        print(f"  arm64 {key}: {counts[key]['instructions_per_request']:,.0f} instructions per request", flush=True)
    return counts


# ---- phase 3: table, headline, plot ----------------------------------------------------------------
def summarise(out: Path, models, seeds, windows, latency: dict | None) -> dict:
    import numpy as np

    counts = json.loads((out / "arm64.json").read_text()) if (out / "arm64.json").is_file() else {}

    rows = []
    for m in models:
        for w in windows:
            row = {"model": m, "window": w, "upload": UPLOAD[m]}
            for k in METHODS:
                runs = [r for r in (load(out, w, m, s, k) for s in seeds) if r is not None]
                for metric in ("uauc", "ndcg@10"):
                    v = np.array([r["test"][metric] for r in runs])
                    row[f"{k}_{metric}"] = float(v.mean()) if len(v) else None
                    row[f"{k}_{metric}_std"] = float(v.std(ddof=1)) if len(v) > 1 else None
                row[f"{k}_seeds"] = len(runs)
            if latency:
                for runtime in RUNTIMES:
                    for layout in LAYOUTS:
                        row[f"{runtime}_{layout}_p50_ms"] = latency[runtime][f"{m}/{w}/{layout}"]["p50_ms"]
            for key, name in (
                ("tflite/{}/{}/candidates", "arm64_litert"),
                ("onnx/{}/{}/candidates", "arm64_ort"),
                ("tflite/{}/{}/rows", "arm64_litert_rows"),
            ):
                c = counts.get(key.format(m, w))
                row[f"{name}_instructions"] = c["instructions_per_request"] if c else None
            rows.append(row)
    headline = {}
    for m in models:
        mine = {r["window"]: r for r in rows if r["model"] == m}
        ref = mine.get(max(windows))
        if not ref or ref["static_uauc"] is None:
            continue
        ref_std = ref["static_uauc_std"] or 0.0
        h = {
            "reference": f"static, {max(windows)} clicks",
            "reference_uauc": ref["static_uauc"],
            "reference_std": ref_std,
        }
        # "matches": MetaNetwork's mean test UAUC >= the reference's mean (strict), or within the
        # reference's own seed std (loose); both reported, the strict one is the headline
        for rule, bar in (("strict", ref["static_uauc"]), ("within_std", ref["static_uauc"] - ref_std)):
            match = [
                w
                for w in sorted(mine)
                if mine[w]["metanetwork_uauc"] is not None and mine[w]["metanetwork_uauc"] >= bar
            ]
            h[rule] = _ratios(mine, ref, match[0], latency) if match else None
        headline[m] = h
    return {"rows": rows, "headline": headline}


def _ratios(mine: dict, ref: dict, w: int, latency) -> dict:
    """The window-`w` MetaNetwork against the reference static model: UAUC and cost ratios."""
    h = {"window": w, "uauc": mine[w]["metanetwork_uauc"]}
    if latency:
        for runtime in RUNTIMES:
            small = mine[w][f"{runtime}_candidates_p50_ms"]
            h[f"{runtime}_ratio"] = small / ref[f"{runtime}_candidates_p50_ms"]
            h[f"{runtime}_ratio_vs_reference_rows"] = small / ref[f"{runtime}_rows_p50_ms"]
    for name in ("arm64_litert", "arm64_ort"):
        a, b = mine[w][f"{name}_instructions"], ref[f"{name}_instructions"]
        h[f"{name}_ratio"] = a / b if a and b else None
    return h


def markdown(summary: dict, latency_known: bool) -> str:
    def ms(v):
        return "–" if v is None else (f"{v * 1e3:.0f} µs" if v < 1 else f"{v:.2f} ms")

    def cell(r, k, metric):
        if r[f"{k}_{metric}"] is None:
            return "–"
        std = r[f"{k}_{metric}_std"]
        return f"{r[f'{k}_{metric}']:.4f}" + (f" ± {std:.4f}" if std is not None else "")

    head = "| backbone | clicks | static UAUC | MetaNetwork UAUC | static NDCG@10 | MetaNetwork NDCG@10 | seeds |"
    sep = "|---|---|---|---|---|---|---|"
    if latency_known:
        head += " LiteRT p50 (candidate / row form) | ORT p50 (candidate / row form) |"
        sep += "---|---|"
    if any(r["arm64_litert_instructions"] for r in summary["rows"]):
        head += " arm64 LiteRT instructions (candidate / row form) | arm64 ORT instructions (candidate form) |"
        sep += "---|---|"
    lines = [head, sep]
    for r in summary["rows"]:
        line = (
            f"| {r['model']} | {r['window']} | {cell(r, 'static', 'uauc')} | {cell(r, 'metanetwork', 'uauc')} | "
            f"{cell(r, 'static', 'ndcg@10')} | {cell(r, 'metanetwork', 'ndcg@10')} | "
            f"{r['static_seeds']}/{r['metanetwork_seeds']} |"
        )
        if latency_known:
            line += "".join(f" {ms(r[f'{rt}_candidates_p50_ms'])} / {ms(r[f'{rt}_rows_p50_ms'])} |" for rt in RUNTIMES)
        if any(r["arm64_litert_instructions"] for r in summary["rows"]):
            line += (
                f" {_k(r['arm64_litert_instructions'])} / {_k(r['arm64_litert_rows_instructions'])} |"
                f" {_k(r['arm64_ort_instructions'])} |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def _k(n) -> str:
    return "–" if not n else f"{n / 1e6:.2f} M"


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in summary["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in summary["rows"] if r["model"] == m]
        for k, style in (("static", "o--"), ("metanetwork", "s-")):
            x = [r["litert_candidates_p50_ms"] * 1e3 for r in rows]
            y = [r[f"{k}_uauc"] for r in rows]
            e = [r[f"{k}_uauc_std"] or 0 for r in rows]
            ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=k)
            for r, xi, yi in zip(rows, x, y):
                ax.annotate(f"{r['window']}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ref = summary["headline"].get(m, {}).get("reference_uauc")
        if ref:
            ax.axhline(ref, color="grey", lw=0.8, ls=":", label="static, 30 clicks")
        ax.set_xlabel("LiteRT p50 per ranking request, 100 candidates (µs, 1 thread)")
        ax.set_ylabel("test UAUC (mean ± std over seeds)")
        ax.set_title(f"{m}: device window (clicks) vs accuracy and latency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"))
    ap.add_argument("--models", nargs="+", default=list(UPLOAD), choices=list(UPLOAD))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--windows", nargs="+", type=int, default=list(WINDOWS))
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    ap.add_argument("--data", help="MovieLens directory [default: the fetched cache]")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument(
        "--report-only", action="store_true", help="no training and no timing: the table from finished runs"
    )
    ap.add_argument("--runs", type=int, default=2000, help="timed requests per artifact")
    ap.add_argument("--arm64-only", action="store_true", help="only export and count instructions (emulated arm64)")
    ap.add_argument("--json", type=Path, help="write the summary (and latencies) here")
    ap.add_argument("--plot", type=Path, help="write the frontier plot here")
    args = ap.parse_args()
    if args.arm64_only:
        count_all(args.out, export_all(args.out, args.models, args.windows), runs=10)
        return
    if not args.report_only:
        train_all(args.out, args.models, args.seeds, args.windows, args.jobs, args.data)
    if args.train_only:
        return
    latency = None
    if not args.report_only:
        import torch

        torch.set_num_threads(1)
        latency = time_all(export_all(args.out, args.models, args.windows), args.runs, rounds=20)
    summary = summarise(args.out, args.models, args.seeds, args.windows, latency)
    summary["latency"] = latency
    print(markdown(summary, latency is not None))
    print(json.dumps(summary["headline"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot and latency is not None:
        plot(summary, args.plot)


if __name__ == "__main__":
    main()
