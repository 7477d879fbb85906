"""The demo's report: report.json (every figure), report.md (tables a person reads) and its PNGs
(per-user UAUC static vs MetaNetwork; latency distributions per runtime).

Everything here renders a result dict that `mntool.demo.run_demo` assembled; nothing is measured
here. The latency figure is `mntool bench`'s own (`mntool.plots.plot_latency`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from exporters.report import summarize

METRICS = ("auc", "uauc", "ndcg@10", "hr@10")
METRIC_LABELS = {"auc": "AUC", "uauc": "UAUC", "ndcg@10": "NDCG@10", "hr@10": "HR@10"}
TARGET_LABELS = {"tflite": "TFLite (LiteRT)", "onnx": "ONNX Runtime", "coreml": "Core ML", "pytorch": "PyTorch"}
UAUC_PLOT = "uauc_per_user.png"
LATENCY_PLOT = "latency.png"


def artifact_summaries(artifacts: dict[str, dict[str, Path]]) -> dict:
    """{model: {target: exporters.report summary}} of the demo's artifacts."""
    return {
        model: {target: summarize(path).to_dict() for target, path in arts.items()} for model, arts in artifacts.items()
    }


def parity_tolerance(result: dict, model: str) -> float:
    """atol + rtol x the largest |logit| PyTorch scored for `model` (float32 rounding grows with the
    magnitudes: the export proof's rule); plain atol for a report written before rtol existed."""
    p = result["parity"]
    return p["atol"] + p.get("rtol", 0.0) * p.get("scale", {}).get(model, 0.0)


def checks(result: dict) -> list[dict]:
    """What the demo promises, each with whether this run kept it and the figure behind it."""
    out = []
    atol = result["parity"]["atol"]
    for target in ("tflite", "onnx"):
        error, tol = result["parity"]["metanetwork"][target], parity_tolerance(result, "metanetwork")
        out.append(
            {
                "check": f"{TARGET_LABELS[target]} patched models match PyTorch (max abs error <= {atol:g}"
                + (f" + {result['parity']['rtol']:g} max|logit|)" if tol > atol else ")"),
                "ok": error <= tol,
                "detail": f"max abs error {error:.1e} over every scored logit (tolerance {tol:.2e})",
            }
        )
    coreml = result["coreml"]
    out.append(
        {
            "check": "Core ML patched weights read back exactly (coremltools; no Core ML runtime on Linux)",
            "ok": coreml["exact"],
            "detail": f"{coreml['users']} users, max abs error {coreml['max_abs_error']:.1e}",
        }
    )
    m = result["metrics"]
    ahead = {t: (m["static"][t]["uauc"], m["metanetwork"][t]["uauc"]) for t in ("tflite", "onnx")}
    out.append(
        {
            "check": "MetaNetwork ahead of static on the compiled models (UAUC)",
            "ok": all(mn > st for st, mn in ahead.values()),
            "detail": ", ".join(f"{TARGET_LABELS[t]} {st:.4f} -> {mn:.4f}" for t, (st, mn) in ahead.items()),
        }
    )
    return out


# ---- figures ------------------------------------------------------------------------------------
def _users(n: int) -> str:
    return f"{n} user" if n == 1 else f"{n} users"


def plot_user_uauc(per_user: dict, path: Path) -> Path:
    """Per-user UAUC, static vs MetaNetwork (compiled TFLite outputs), with the diagonal; and the
    distribution of per-user gains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    static, mn = np.asarray(per_user["uauc_static"]), np.asarray(per_user["uauc_metanetwork"])
    gain = mn - static
    better, worse = int((gain > 0).sum()), int((gain < 0).sum())
    plt.rcParams.update({"font.size": 11})
    fig, (scatter, hist) = plt.subplots(1, 2, figsize=(13, 5.8), gridspec_kw={"width_ratios": [1.15, 1]})

    low = min(static.min(), mn.min())
    low = max(0.0, np.floor(low * 20) / 20 - 0.02)
    scatter.plot([low, 1], [low, 1], color="black", lw=1, ls="--", label="no change (y = x)")
    scatter.scatter(
        static[gain > 0],
        mn[gain > 0],
        s=18,
        alpha=0.7,
        color="tab:green",
        label=f"MetaNetwork better ({_users(better)})",
    )
    scatter.scatter(
        static[gain < 0], mn[gain < 0], s=18, alpha=0.7, color="tab:red", label=f"static better ({_users(worse)})"
    )
    ties = gain == 0
    if ties.any():
        scatter.scatter(
            static[ties], mn[ties], s=18, alpha=0.7, color="tab:gray", label=f"equal ({_users(int(ties.sum()))})"
        )
    scatter.scatter(
        [static.mean()],
        [mn.mean()],
        marker="X",
        s=160,
        color="tab:blue",
        edgecolor="white",
        zorder=3,
        label=f"mean: {static.mean():.4f} -> {mn.mean():.4f}",
    )
    scatter.set_xlim(low, 1.005)
    scatter.set_ylim(low, 1.005)
    scatter.set_aspect("equal")
    scatter.set_xlabel("static model: user's AUC on the test period")
    scatter.set_ylabel("MetaNetwork (patched model): user's AUC")
    scatter.set_title("Each point is one device user")
    scatter.legend(loc="lower right", fontsize=9)
    scatter.grid(alpha=0.3)

    reach = max(abs(gain).max(), 0.01)  # a readable axis even when (almost) nothing changed
    counts = hist.hist(gain[gain != 0], bins=np.linspace(-reach, reach, 31), color="tab:blue", alpha=0.75)[0]
    hist.axvline(0, color="black", lw=1, ls="--", label=f"unchanged: {_users(int(ties.sum()))} (not binned)")
    hist.axvline(gain.mean(), color="tab:orange", lw=2, label=f"mean gain {gain.mean():+.4f}")
    hist.axvline(np.median(gain), color="tab:purple", lw=2, ls=":", label=f"median gain {np.median(gain):+.4f}")
    hist.set_xlabel("per-user AUC gain (MetaNetwork - static)")
    hist.set_ylabel("number of users")
    hist.set_ylim(0, max(1.0, 1.1 * counts.max(initial=0)))
    hist.xaxis.set_major_locator(MaxNLocator(7))
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    hist.set_title("Distribution of per-user gains")
    hist.legend(fontsize=9)
    hist.grid(alpha=0.3)

    fig.suptitle(
        f"Per-user UAUC on the compiled TFLite models: static vs MetaNetwork-patched ({len(static)} users)", fontsize=13
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bench_latency(
    bench: dict, path: Path, batch: int, request: str = "ranking request", unit: str = "candidate"
) -> Path:
    """Steady-state latency distributions per runtime, unpatched and patched (mntool bench's figure);
    one `request` of `batch` `unit`s per call."""
    from mntool.plots import plot_latency, report_series

    reports = list(bench.values())
    r = reports[0]
    title = (
        f"Steady-state latency of one {request} ({batch} {unit}{'s' if batch != 1 else ''} per call), "
        f"{r.config['runner']['threads']} thread, {r.host.get('cpu', 'this host')} ({r.latency.runs} runs per variant)"
    )
    return plot_latency(report_series(reports), path, title)


# ---- markdown -----------------------------------------------------------------------------------
def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def _ms(value: float) -> str:
    return f"{value * 1e3:.0f} µs" if value < 1 else f"{value:.2f} ms"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def metrics_table(result: dict) -> str:
    m = result["metrics"]
    rows = []
    for model, label in (("static", "static"), ("metanetwork", "MetaNetwork (patched per user)")):
        for target in ("tflite", "onnx", "pytorch"):
            bold = "**" if target == "tflite" else ""
            rows.append(
                [f"{bold}{label}{bold}", TARGET_LABELS[target]]
                + [f"{bold}{m[model][target][k]:.4f}{bold}" for k in METRICS]
            )
    rows.append(
        ["MetaNetwork backbone, unpatched", "PyTorch"]
        + [f"{m['metanetwork_unpatched']['pytorch'][k]:.4f}" for k in METRICS]
    )
    rows.append(
        ["**gain** (MetaNetwork - static)", "TFLite (LiteRT)"]
        + [f"**{m['metanetwork']['tflite'][k] - m['static']['tflite'][k]:+.4f}**" for k in METRICS]
    )
    return _table(["model", "scored by", *(METRIC_LABELS[k] for k in METRICS)], rows)


def population_table(result: dict) -> str:
    t = result["training"]
    rows = [
        [name, *(f"{t[key]['test'][k]:.4f}" for k in METRICS)]
        for key, name in (("static", "static"), ("metanetwork", "MetaNetwork"))
    ]
    rows.append(["popularity (sanity floor)", *(f"{t['static']['popularity']['test'][k]:.4f}" for k in METRICS)])
    return _table(["model (PyTorch, every device user)", *(METRIC_LABELS[k] for k in METRICS)], rows)


def parity_table(result: dict) -> str:
    p, atol = result["parity"], result["parity"]["atol"]
    rows = []
    for model, label in (("static", "static"), ("metanetwork", "MetaNetwork, patched per user")):
        for target in ("tflite", "onnx"):
            e, tol = p[model][target], parity_tolerance(result, model)
            rows.append([label, TARGET_LABELS[target], f"{e:.2e}", "ok" if e <= tol else f"**FAILS** (> {tol:.2e})"])
    c = result["coreml"]
    rows.append(
        [
            "MetaNetwork, patched per user",
            "Core ML (read-back)",
            f"{c['max_abs_error']:.2e} (weights)",
            "ok: bit-exact" if c["exact"] else "**FAILS**",
        ]
    )
    rule = f"within {atol:g}" + (f" + {p['rtol']:g} max abs logit" if p.get("rtol") else "")
    return _table(["model", "target", "max abs error vs PyTorch", rule], rows)


def size_table(result: dict) -> str:
    rows = []
    for target, s in result["artifacts"]["metanetwork"].items():
        patch = result["patch_bytes"][target]
        rows.append(
            [
                TARGET_LABELS[target],
                _kib(s["total_bytes"]),
                f"{s['adaptive_tensors']} ({_kib(s['adaptive_bytes'])})",
                f"{patch:,} B",
                f"{100 * patch / s['total_bytes']:.1f}%",
            ]
        )
    return _table(["target", "artifact (all files)", "adaptive tensors", "patch (signed)", "patch / artifact"], rows)


def forms_table(result: dict) -> str:
    """The same MetaNetwork model compiled in the row form and in the candidate form: latency per
    ranking request, timed interleaved in one process, and how far apart their logits are."""
    rows = [
        [
            TARGET_LABELS[target],
            _ms(f["rows_p50_ms"]),
            _ms(f["candidates_p50_ms"]),
            f"{f['ratio']:.2f}x ({1 / f['ratio']:.1f}x faster)",
            _ms(f["rows_p99_ms"]),
            _ms(f["candidates_p99_ms"]),
            f"{f['max_abs_difference']:.1e}",
        ]
        for target, f in result["forms"].items()
    ]
    return _table(
        [
            "runtime",
            "row form p50",
            "candidate form p50",
            "candidate / row",
            "row form p99",
            "candidate form p99",
            "max |logit difference|",
        ],
        rows,
    )


def latency_table(result: dict) -> str:
    rows = []
    for target, b in result["bench"].items():
        p = b["patches"][0]
        L = b["latency"]
        rows.append(
            [
                f"{TARGET_LABELS[target]} {b['runtime_version']}",
                _ms(b["load_file_ms"]),
                _ms(b["load_memory_ms"]),
                _ms(b["first_inference_ms"]),
                _ms(L["p50_ms"]),
                _ms(L["p90_ms"]),
                _ms(L["p99_ms"]),
                _ms(p["apply_ms"]),
                _ms(p["swap_ms"]),
                f"{p['p50_ratio']:.2f}x",
            ]
        )
    return _table(
        [
            "runtime",
            "load (file)",
            "load (memory)",
            "first inference",
            "p50",
            "p90",
            "p99",
            "patch apply",
            "swap",
            "patched p50 / unpatched",
        ],
        rows,
    )


def stage_table(result: dict) -> str:
    rows = [
        [
            s["stage"],
            f"{s['seconds']:.1f} s",
            f"reused (built in {s['reused_seconds']:.0f} s)" if s["cached"] else "ran",
            s["note"],
        ]
        for s in result["stages"]
    ]
    return _table(["stage", "time", "", "note"], rows)


def duration(result: dict) -> str:
    """How long this run took, and how long it would have without reusing an earlier run's work."""
    reused = sum(s["reused_seconds"] for s in result["stages"])
    took = f"{result['seconds'] / 60:.1f} min"
    return (
        took if not reused else f"{took}; {(result['seconds'] + reused) / 60:.1f} min with nothing reused, see Stages"
    )


def unpatched_note(result: dict) -> str:
    """What the per-user patches add on top of the MetaNetwork artifact as shipped."""
    m = result["metrics"]
    shipped, patched, static = (
        m["metanetwork_unpatched"]["pytorch"]["uauc"],
        m["metanetwork"]["pytorch"]["uauc"],
        m["static"]["pytorch"]["uauc"],
    )
    note = (
        f"The unpatched row is the MetaNetwork artifact as shipped, before any patch: UAUC {shipped:.4f} against "
        f"{static:.4f} for static. The per-user patches move it by {patched - shipped:+.4f} to {patched:.4f} "
        "(PyTorch figures)"
    )
    if patched > static:
        share = (patched - shipped) / (patched - static)
        note += f", {share:.0%} of MetaNetwork's UAUC gain over static"
        if abs(shipped - static) >= 5e-5:
            note += "; the rest comes from the MetaNetwork backbone differing from the static one"
    return note + "."


def render_markdown(result: dict) -> str:
    sample, data = result["sample"], result["data"]
    bench = result["bench"]
    host = next(iter(bench.values()))["host"]
    personalise = result["personalise"]
    training = result["training"]
    ok = all(c["ok"] for c in result["checks"])
    mode = "quick (smoke-test settings, not representative)" if result["quick"] else "full"
    epochs = {k: len(v["train"]["epochs"]) for k, v in training.items()}
    example = {t: Path(p).name for t, p in result["example_patches"].items()}
    lines = [
        "# mntool demo report",
        "",
        f"MovieLens-100k, SASRec device model, {mode} run of `mntool demo` on {result['created']} "
        f"({duration(result)}; {host.get('cpu', 'unknown CPU')}, {host.get('cpu_count')} CPUs). "
        "The cloud trained a static model and a MetaNetwork; the device model was compiled to TFLite, ONNX and Core ML "
        "with its adaptive layers (the scoring head) as swappable buffers; for each sampled device user the MetaNetwork "
        "generated head parameters from the user's upload for the test period, the cloud packed them into a signed patch, "
        "and the device side verified the patch and wrote it into the compiled model, which then scored the user's "
        "held-out interactions. Every figure below comes from those compiled models unless it says PyTorch.",
        "",
        (
            f"The device model reads the user's last {data['protocol']['history_len']} clicks per inference; the upload the "
            f"MetaNetwork reads is the user's last {data['protocol']['recent_len']} items before the test period, so the cloud "
            "adapts a cheap on-device model with context it does not read itself (at equal windows MetaNetwork ties a "
            "converged static model: docs/metanetwork.md)."
        ),
        "",
        f"Host: {host.get('cpu', 'unknown CPU')}, {host.get('cpu_count')} CPUs, load average {result['load_average_at_start']:.1f} "
        "at the start"
        + (
            " (other jobs were running: every time below includes their interference)"
            if result["load_average_at_start"] > 0.5 * host.get("cpu_count", 1)
            else ""
        )
        + ". "
        + "Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + ".",
        "",
        "## At a glance",
        "",
        *[f"- {'✅' if c['ok'] else '❌'} {c['check']}: {c['detail']}" for c in result["checks"]],
        "",
        "All checks passed." if ok else "**Some checks failed** (see above).",
        "",
        f"## Metrics on the test period ({sample['users']} sampled device users, compiled models)",
        "",
        f"{sample['users']} of {sample['of']} device users (seed {sample['seed']}): {sample['pointwise_rows']:,} pointwise rows "
        f"(1 positive : {data['protocol']['n_negatives']} negatives, for AUC/UAUC) and "
        f"{sample['ranking_tasks']:,} ranking tasks (the positive among {sample['candidates']} candidates, for NDCG@10/HR@10). "
        "Static scores come from the static artifact; MetaNetwork scores from the MetaNetwork artifact patched with each "
        "user's own generated parameters. The PyTorch rows score the same rows with the same parameters.",
        "",
        metrics_table(result),
        "",
        unpatched_note(result),
        "",
        f"![Per-user UAUC, static vs MetaNetwork]({UAUC_PLOT})",
        "",
        f"For context, the same models on every device user ({data['users']}), PyTorch, from training "
        f"(static {epochs['static']} epoch(s), MetaNetwork {epochs['metanetwork']} epoch(s)):",
        "",
        population_table(result),
        "",
        "## Parity: compiled vs PyTorch",
        "",
        "Max abs difference between the logits of the compiled model and PyTorch's, over every pointwise row and every "
        "ranking candidate of the sampled users (patched models: each user's own patch). The bar is 1e-5 plus 1e-6 "
        "times the largest |logit| PyTorch scored (float32 rounding grows with the magnitudes a runtime sums, in its "
        "own order; the export-time proof uses the same rule); a misplaced patch errs by orders of magnitude more.",
        "",
        parity_table(result),
        "",
        "Core ML models cannot run on Linux (prediction needs macOS), so each user's patched Core ML package was read back "
        "with coremltools' own blob reader instead: the package loads and every adaptive const holds exactly the generated "
        "values. Core ML metrics and latency need a Mac.",
        "",
        "## Patches vs artifacts",
        "",
        size_table(result),
        "",
        f"Per device: generating its parameters took {personalise['generate_ms_per_device']:.2f} ms (batched over the "
        f"sample), building and signing a patch {_ms(personalise['build_patch_ms'])}, verifying and applying it in memory "
        f"{_ms(personalise['apply_ms'])}, opening a runner on the patched model {_ms(personalise['open_ms'])} (medians).",
        "",
        "## Latency, load and swap per runtime",
        "",
        f"`device_runtime.bench` on the MetaNetwork artifacts, each in a fresh process, 1 thread, on one real ranking "
        f"request ({sample['candidates']} candidates, one call in the candidate form), with the first sampled user's patch "
        f"({', '.join(example[t] for t in bench)}). Swap = patch bytes in hand -> verified, applied, new "
        f"interpreter/session, first output. Host load average during the run: "
        f"{host.get('load_average_1min', float('nan')):.1f} on {host.get('cpu_count')} CPUs.",
        "",
        latency_table(result),
        "",
        f"![Latency distributions]({LATENCY_PLOT})",
        "",
        "## Row form vs candidate form",
        "",
        "A device ranks a feed: one history, many candidates. The demo's artifacts take one ranking request per call "
        f"in the **candidate form** (history (1, {data['protocol']['history_len']}), target (1, {sample['candidates']}) "
        f"-> logits (1, {sample['candidates']})): the history is encoded once. The **row form** (history "
        f"({sample['candidates']}, {data['protocol']['history_len']}), target ({sample['candidates']},)) re-encodes it "
        "for every candidate. The same MetaNetwork model in both forms, on the same real request, timed interleaved in "
        f"one process (1 thread, {next(iter(result['forms'].values()))['runs']} runs each; "
        "`device_runtime.ranking.time_requests`):",
        "",
        forms_table(result),
        "",
        "Pointwise rows (a positive and its negatives, sharing one history) are scored as a short request, the "
        "candidates padded to the artifact's count and the padding dropped. Export either form with "
        "`mntool export CKPT` (candidate form) or `mntool export CKPT --rows`.",
        "",
        "## Stages",
        "",
        stage_table(result),
        "",
        "## Reproduce",
        "",
        "```",
        "make demo                                   # or: .venv/bin/mntool demo --out demo-out",
        "mntool demo --out demo-out --fresh          # retrain and re-export (the verified data cache stays)",
        f"mntool patch-weights demo-out/artifacts/metanetwork/model.tflite demo-out/patches/{example.get('tflite', '')} \\",
        "    --verify-key demo-out/keys/demo.pub -o patched.tflite      # a key: only a patch it signed is accepted",
        "mntool bench demo-out/artifacts/metanetwork/model.onnx --patch demo-out/patches/" + example.get("onnx", ""),
        "```",
        "",
        "Every figure is also in `report.json`.",
        "",
    ]
    return "\n".join(lines)


def write_report(result: dict, bench: dict, out: Path) -> list[Path]:
    """report.json, report.md and the PNGs in `out`; returns their paths."""
    out = Path(out)
    paths = [
        plot_user_uauc(result["per_user"], out / UAUC_PLOT),
        plot_bench_latency(bench, out / LATENCY_PLOT, result["sample"]["candidates"]),
    ]
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(result))
    return [out / "report.md", out / "report.json", *paths]
