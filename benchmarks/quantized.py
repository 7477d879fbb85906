"""Quantised variants of a trained recommender, in candidate form: size, patch, latency, accuracy.

For CHECKPOINT (`mntool train --out`), every (target, precision) the targets declare
(`exporters.targets`; ExecuTorch exports float32 only) is exported in the candidate form of one
ranking request, history (1, L) and target (1, C) with C = 100 (the protocol's positive and 99
ranking negatives): one call scores a request, the history encoded once. Per variant:

- artifact bytes, adaptive bytes, and the bytes of one patch (unsigned; built from fresh values
  with `mntool.patches.build_patch`);
- latency p50 per call (LiteRT with XNNPACK, ONNX Runtime; 1 thread): each target's float32,
  float16 and int8 artifacts and an empty call are timed interleaved in one run
  (`device_runtime.bench.time_interleaved`), so the ratios compare runs that shared the host's
  conditions; the ratio subtracts the timer's own overhead;
- accuracy on the MovieLens test period: UAUC over the pointwise groups and NDCG@10 over the
  ranking tasks, every score computed by the compiled runner (a group's 5 targets padded to the
  artifact's C candidates with its first target; candidates are scored independently), and the
  change against the float32 artifact of the same target. Static: the checkpoint's own head. A
  MetaNetwork checkpoint also scores each device with its generated head, patched into the
  artifact through the production path (`build_patch`, then the device's `apply_patch_bytes`).

Core ML: size and patch bytes only; coremltools cannot predict off macOS (its proof is a
read-back there). Usage (docs/quantization.md has the table):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantized.py CHECKPOINT --data ../shared/data/ml-100k \\
        [--save figures.json] [--json] [--users N] [--runs 2000 --rounds 20]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import torch

from device_runtime import weight_map as weight_maps
from device_runtime.bench import empty_call, time_interleaved
from device_runtime.patch import apply_patch_bytes
from device_runtime.runners import RunnerConfig, open_runner
from exporters import export
from exporters.prepare import static_values
from exporters.proof import fresh_values
from exporters.quiet import quiet
from exporters.report import summarize
from exporters.targets import declarations
from mntool.metrics import evaluate
from mntool.patches import build_patch

CANDIDATES = 100  # one ranking request: the positive and the protocol's 99 ranking negatives
TIMED = ("litert", "onnxruntime")  # runtimes that predict here


def candidate_inputs(ckpt, candidates: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `Checkpoint.example_inputs`, with target (1, candidates): one ranking request."""
    g = torch.Generator().manual_seed(seed)
    L = ckpt.protocol["history_len"]
    history = torch.randint(1, ckpt.n_items + 1, (1, L), generator=g)
    history[:, : L // 3] = 0  # some left padding, as real histories have
    return history, torch.randint(1, ckpt.n_items + 1, (1, candidates), generator=g)


def variants() -> list[tuple[str, str]]:
    """Every (target, precision) of the targets with a quantised precision (ExecuTorch has none)."""
    return [
        (d.name, p) for d in declarations() if d.converter_available() and len(d.precisions) > 1 for p in d.precisions
    ]


# ---- accuracy through the compiled runner ---------------------------------------------------------
class TestPeriod:
    """The test period's pointwise groups and ranking tasks, as candidate-form requests."""

    def __init__(self, dataset, users: int | None):
        from mntool.train import grouped_rows

        rows, rank = dataset.split("test"), dataset.test_rank
        group = dataset.config.n_negatives + 1
        self.rows_user, self.label = rows.user, rows.label
        self.history, self.targets, _ = grouped_rows(rows, np.arange(len(rows)), group)
        self.group_user = rows.user[::group]
        self.rank_user, self.rank_history, self.candidates = rank.user, rank.history, rank.candidates
        keep = np.unique(self.group_user)
        if users is not None:  # the first `users` devices (a quicker, smaller figure)
            keep = keep[:users]
            g, r = np.isin(self.group_user, keep), np.isin(self.rank_user, keep)
            self.history, self.targets, self.group_user = self.history[g], self.targets[g], self.group_user[g]
            self.rank_user, self.rank_history, self.candidates = (
                self.rank_user[r],
                self.rank_history[r],
                self.candidates[r],
            )
            row = np.repeat(g, group)
            self.rows_user, self.label = self.rows_user[row], self.label[row]
        self.users = keep

    def score(self, run: Callable[[np.ndarray, np.ndarray], np.ndarray], width: int, user=None) -> tuple:
        """(group scores (G, group), rank scores (P, C)) for every device, or only `user`'s."""
        g = slice(None) if user is None else self.group_user == user
        r = slice(None) if user is None else self.rank_user == user
        groups = []
        for history, targets in zip(self.history[g], self.targets[g]):
            padded = np.concatenate([targets, np.full(width - len(targets), targets[0])])
            groups.append(run(history[None], padded[None])[0, : len(targets)])
        ranks = [run(h[None], c[None])[0] for h, c in zip(self.rank_history[r], self.candidates[r])]
        return np.array(groups).reshape(-1, self.targets.shape[1]), np.array(ranks).reshape(
            -1, self.candidates.shape[1]
        )

    def metrics(self, groups: np.ndarray, ranks: np.ndarray) -> dict:
        m = evaluate(self.rows_user, self.label, groups.reshape(-1), self.rank_user, ranks)
        return {"uauc": m["uauc"], "ndcg@10": m["ndcg@10"]}


def runner_call(runner) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    (out,) = [s.name for s in runner.outputs]
    return lambda h, t: runner.run({"history": h, "target": t})[out]


def compiled_metrics(artifact: Path, period: TestPeriod, width: int, device_heads: dict | None) -> dict:
    """UAUC / NDCG@10 scored by the compiled artifact: its own (static) head, and with
    `device_heads` (user -> {name: array}) each device's head patched in first."""
    wm = weight_maps.load(artifact)
    with quiet(), open_runner(artifact, weight_map=wm, config=RunnerConfig(threads=1)) as runner:
        out = {"static": period.metrics(*period.score(runner_call(runner), width))}
    if device_heads is None:
        return out
    files = weight_maps.read_artifact_files(artifact, wm.files)
    groups, ranks = {}, {}
    for user in period.users:
        patch = build_patch(wm, device_heads[int(user)])
        patched = apply_patch_bytes(files, patch, wm, check_artifact=False)
        with quiet(), open_runner(artifact, weight_map=wm, files=patched, config=RunnerConfig(threads=1)) as runner:
            groups[user], ranks[user] = period.score(runner_call(runner), width, user)
    # back in the period's row order (rows of a device are not contiguous in every split)
    g = np.zeros((len(period.group_user), period.targets.shape[1]))
    r = np.zeros((len(period.rank_user), period.candidates.shape[1]))
    for user in period.users:
        g[period.group_user == user], r[period.rank_user == user] = groups[user], ranks[user]
    out["metanetwork"] = period.metrics(g, r)
    return out


def pytorch_metrics(ckpt, period: TestPeriod, width: int, device_heads: dict | None) -> dict:
    """The same figures from PyTorch (float32, the checkpoint's model), for reference."""
    from exporters.prepare import run_model

    def run_with(values):
        return lambda h, t: run_model(ckpt.model, (torch.from_numpy(h), torch.from_numpy(t)), values)[0].numpy()

    out = {"static": period.metrics(*period.score(run_with(None), width))}
    if device_heads is not None:
        g = np.zeros((len(period.group_user), period.targets.shape[1]))
        r = np.zeros((len(period.rank_user), period.candidates.shape[1]))
        for user in period.users:
            values = {**static_values(ckpt.model, ckpt.adaptive), **device_heads[int(user)]}
            g[period.group_user == user], r[period.rank_user == user] = period.score(run_with(values), width, user)
        out["metanetwork"] = period.metrics(g, r)
    return out


def generated_heads(ckpt, dataset, period: TestPeriod) -> dict | None:
    """user -> the generator's head for the test period (what `mntool generate` patches in)."""
    if ckpt.meta is None:
        return None
    from mntool.train import generate_device_params

    users, recent = dataset.device_recent("test")
    params = generate_device_params(ckpt.meta, users, recent)
    index = {int(u): i for i, u in enumerate(users)}
    return {
        int(u): {n: p[index[int(u)]].numpy().astype(np.float32) for n, p in params.params.items()} for u in period.users
    }


# ---- latency ---------------------------------------------------------------------------------------
def latency(artifacts: dict[str, Path], example: tuple, runs: int, rounds: int) -> dict[str, dict]:
    """p50 per call (us) of each precision of one target, interleaved with an empty call."""
    feeds = {"history": example[0].numpy(), "target": example[1].numpy()}
    calls, runners = {}, []
    for precision, artifact in artifacts.items():
        with quiet():
            runner = open_runner(artifact, weight_map=weight_maps.load(artifact), config=RunnerConfig(threads=1))
        runners.append(runner)
        arrays = runner.prepare(feeds)
        calls[precision] = lambda runner=runner, arrays=arrays: runner.invoke(arrays)
    calls["timer"] = empty_call
    for call in calls.values():
        for _ in range(50):
            call()
    samples = time_interleaved(calls, runs, rounds)
    for runner in runners:
        runner.close()
    p50 = {name: statistics.median(s) * 1000 for name, s in samples.items()}
    base = p50["float32"] - p50["timer"]
    return {
        p: {"p50_us": p50[p], "timer_us": p50["timer"], "vs_float32": (p50[p] - p50["timer"]) / base} for p in artifacts
    }


# ---- the run ---------------------------------------------------------------------------------------
def run(checkpoint: Path, data: Path | None, out: Path, runs: int, rounds: int, users: int | None) -> dict:
    from mntool.data.datasets import load_dataset
    from mntool.train import load_checkpoint

    torch.set_num_threads(1)
    ckpt = load_checkpoint(checkpoint)
    example = candidate_inputs(ckpt, CANDIDATES)
    dataset = load_dataset(data, ckpt.protocol)
    period = TestPeriod(dataset, users)
    heads = generated_heads(ckpt, dataset, period)
    rows, artifacts = [], {}
    for target, precision in variants():
        t0 = time.perf_counter()
        artifact = export(
            ckpt.model, example, ckpt.adaptive, target, out / f"{target}-{precision}", precision=precision
        )
        summary, wm = summarize(artifact), weight_maps.load(artifact)
        patch = build_patch(wm, fresh_values(static_values(ckpt.model, ckpt.adaptive), seed=1))
        row = {
            "target": target,
            "precision": precision,
            "export_s": time.perf_counter() - t0,
            "artifact_bytes": summary.total_bytes,
            "adaptive_bytes": summary.adaptive_bytes,
            "adaptive_dtype": sorted({t.dtype for t in wm.tensors}),
            "patch_bytes": len(patch),
            "proof": summary.proof,
            "quantization": wm.extra.get("quantization"),
        }
        if summary.proof and summary.proof["method"] == "run":
            row["accuracy"] = compiled_metrics(artifact, period, CANDIDATES, heads)
        rows.append(row)
        artifacts.setdefault(target, {})[precision] = artifact
        click.echo(f"exported {target} {precision} ({row['export_s']:.1f} s)", err=True)
    for target, by_precision in artifacts.items():
        if weight_maps.load(by_precision["float32"]).extra["proof"]["method"] != "run":
            continue  # no runtime here (Core ML off macOS)
        figures = latency(by_precision, example, runs, rounds)
        for row in rows:
            if row["target"] == target:
                row["latency"] = figures[row["precision"]]
    for row in rows:
        f32 = next(r for r in rows if r["target"] == row["target"] and r["precision"] == "float32")
        row["artifact_vs_float32"] = row["artifact_bytes"] / f32["artifact_bytes"]
        if "accuracy" in row:
            row["accuracy_change"] = {
                method: {k: v - f32["accuracy"][method][k] for k, v in figures.items()}
                for method, figures in row["accuracy"].items()
            }
    return {
        "checkpoint": str(checkpoint),
        "model": ckpt.config.model,
        "method": ckpt.config.method,
        "history_len": ckpt.protocol["history_len"],
        "candidates": CANDIDATES,
        "test_devices": len(period.users),
        "pytorch": pytorch_metrics(ckpt, period, CANDIDATES, heads),
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "python": sys.version.split()[0],
            "runs": runs,
            "rounds": rounds,
        },
        "variants": rows,
    }


def table(result: dict) -> str:
    methods = ["static"] + (["metanetwork"] if result["method"] == "metanetwork" else [])
    head = "| target | precision | artifact (KiB) | vs float32 | adaptive (KiB, dtype) | patch (B) | p50 (us) | vs float32 "
    rule = "|---|---|---:|---:|---:|---:|---:|---:"
    for m in methods:
        head += f"| UAUC {m} (change) | NDCG@10 {m} (change) "
        rule += "|---:|---:"
    head += "| proof max err / tolerance |"
    rule += "|---|"
    lines = [head, rule]
    for r in result["variants"]:
        lat = r.get("latency")
        cells = [
            r["target"],
            r["precision"],
            f"{r['artifact_bytes'] / 1024:.1f}",
            f"{r['artifact_vs_float32']:.2f}x",
            f"{r['adaptive_bytes'] / 1024:.1f} ({'/'.join(r['adaptive_dtype'])})",
            f"{r['patch_bytes']}",
            f"{lat['p50_us']:.1f}" if lat else "n/a",
            f"{lat['vs_float32']:.2f}x" if lat else "n/a",
        ]
        for m in methods:
            if "accuracy" in r:
                a, d = r["accuracy"][m], r["accuracy_change"][m]
                cells += [f"{a['uauc']:.4f} ({d['uauc']:+.4f})", f"{a['ndcg@10']:.4f} ({d['ndcg@10']:+.4f})"]
            else:
                cells += ["n/a (no Core ML runtime here)", "n/a"]
        p = r["proof"]
        cells.append(
            f"{p['max_abs_error']:.1e} / {p['tolerance']:.1e}" if p["method"] == "run" else "read-back (exact)"
        )
        lines.append("| " + " | ".join(cells) + " |")
    torch_line = "; ".join(
        f"{m}: UAUC {v['uauc']:.4f}, NDCG@10 {v['ndcg@10']:.4f}" for m, v in result["pytorch"].items()
    )
    lines.append("")
    lines.append(
        f"{result['model']} {result['method']}, L={result['history_len']}, candidate form (1, {result['candidates']}), "
        f"{result['test_devices']} test devices; PyTorch float32: {torch_line}; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in result['host']['load_average_at_end'])} on {result['host']['cpus']} CPUs."
    )
    return "\n".join(lines)


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), help="MovieLens-100k files.")
@click.option("--runs", default=2000, show_default=True, help="Timed calls per variant.")
@click.option("--rounds", default=20, show_default=True, help="Interleaving rounds for the latency figures.")
@click.option("--users", type=click.IntRange(min=1), help="Score only the first N test devices (quicker).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Keep the artifacts here.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of a table.")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures (JSON) here.")
def main(checkpoint, data, runs, rounds, users, out, as_json, save) -> None:
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(checkpoint, data, Path(tmp), runs, rounds, users)
    else:
        result = run(checkpoint, data, out, runs, rounds, users)
    if save is not None:
        save.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result, indent=2) if as_json else table(result))


if __name__ == "__main__":
    main()
