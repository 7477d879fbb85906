"""The latency figure of `mntool bench`, the demo report and benchmarks/compare.py: per-run
latency distributions (violins) beside every timed run in measurement order (`plot_latency`), and
the series and title it is drawn from for `device_runtime.bench` reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_runtime.bench import BenchReport


def report_series(reports: list[BenchReport]) -> list[tuple[str, np.ndarray]]:
    """(label, per-run latencies in ms) for each runtime and variant of the reports."""
    series = []
    for r in reports:
        name = f"{r.runtime}\n{Path(r.artifact).name}"
        series.append((f"{name}\nunpatched", np.asarray(r.samples_ms)))
        series += [(f"{name}\n+ {Path(p.patch).name}", np.asarray(p.samples_ms)) for p in r.patches]
    return series


def report_title(reports: list[BenchReport]) -> str:
    r = reports[0]
    profile = f", profile {r.profile['profile']}" if r.profile else ""
    return (
        f"Steady-state latency, batch 1, {r.config['runner']['threads']} thread(s){profile} on "
        f"{r.host.get('cpu', 'this host')} ({r.latency.runs} runs per variant)"
    )


def plot_latency(series: list[tuple[str, np.ndarray]], path: Path, title: str) -> Path:
    """Latency distribution per labelled series (left) and every timed run in measurement order
    (right, same axis), with p50 and p99 marked. When the series differ by more than 5x the axis
    is logarithmic, and the violins are estimated on log latency so their shape stays true."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_us = max(np.median(s) for _, s in series) < 1.0
    scale, unit = (1e3, "µs") if use_us else (1.0, "ms")
    colors = plt.get_cmap("tab10").colors * 3
    data = [np.asarray(s) * scale for _, s in series]
    medians = [np.median(d) for d in data]
    log_scale = max(medians) / min(medians) > 5
    f = np.log10 if log_scale else (lambda v: np.asarray(v, dtype=float))  # plotted coordinate
    top = 1.3 * max(np.percentile(d, 99) for d in data)  # rare host stalls go above the axis, counted
    bottom = 0.8 * min(d.min() for d in data) if log_scale else 0.0

    fig, (dist, trace) = plt.subplots(
        1,
        2,
        figsize=(max(13, 1.1 * len(series) + 8), 5.6),
        gridspec_kw={"width_ratios": [max(1.1, 0.2 * len(series)), 1]},
    )
    positions = np.arange(1, len(series) + 1)
    parts = dist.violinplot(
        [f(np.clip(d, None, top)) for d in data], positions=positions, showextrema=False, widths=0.8
    )
    for body, color in zip(parts["bodies"], colors):
        body.set_facecolor(color)
        body.set_alpha(0.35)
    for x, d in zip(positions, data):
        p50, p99 = np.percentile(d, [50, 99])
        dist.hlines(f(p50), x - 0.3, x + 0.3, color="black", lw=2, label="p50" if x == 1 else None)
        dist.scatter([x], [f(p99)], marker="v", color="black", zorder=3, label="p99" if x == 1 else None)
        dist.annotate(f"p50 {p50:.1f}\np99 {p99:.1f}", (x + 0.32, f(p50)), fontsize=7, va="center")
        above = int((d > top).sum())
        if above:
            dist.annotate(f"{above} above", (x, f(top)), fontsize=7, ha="center", va="top", color="dimgray")
    dist.set_xticks(positions, [label for label, _ in series], fontsize=7)
    dist.set_title("distribution")
    dist.legend(loc="upper left", fontsize=8)
    dist.set_xlim(0.4, len(series) + 0.9)

    for (label, _), d, color in zip(series, data, colors):
        trace.plot(np.arange(len(d)), f(d), ".", ms=2, color=color, alpha=0.6, label=label.replace("\n", " "))
    trace.set_xlabel("timed run, in measurement order")
    trace.set_title("every timed run (same axis)")
    trace.legend(fontsize=7, markerscale=4, loc="upper right")

    ticks = [m * 10.0**k for k in range(-3, 7) for m in (1, 2, 5) if bottom <= m * 10.0**k <= top]
    for ax in (dist, trace):
        ax.set_ylim(f(bottom) if log_scale else bottom, f(top))
        ax.set_ylabel(f"latency per inference ({unit}{', log scale' if log_scale else ''})")
        if log_scale:
            ax.set_yticks(f(ticks), [f"{t:g}" for t in ticks])
        ax.grid(alpha=0.3)

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
