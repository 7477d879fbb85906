"""PersEPhonEE on the compiled model (docs/early-exits.md): per-device accuracy against mean LiteRT
latency per input for early-exit CNNs personalised four ways, all on the same devices, the same
staged artifact and the same run.

Per seed it needs `mntool train` runs under RUNS/<model>/seed<s>/: `static`, `exits` (--init static)
and `metanetwork` (--init exits); `benchmarks/early_exit_runs.sh` makes them. For every device (img-v1, 100
devices) and method it installs the method's adaptive tensors in the compiled staged artifact through
the production patch path, runs the device's own stream of 64 test images through the staged runner
(LiteRT, 1 thread, stopping at the first confident exit) at every threshold of the grid, and times
every input; the full static network (one file, every layer) is timed on the same images, interleaved,
as the reference. Methods:

- `static exits`: the cloud-trained exits, no personalisation;
- `persephonee-n<N>`: the device trains its early-exit heads (numpy, `device_runtime.exit_trainer`)
  on its 64 validation-period images, N labelled per class present, the rest pseudo-labelled by the
  final exit above a confidence threshold; written through the weight map as a local signed patch;
- `metanetwork`: the cloud generates every adaptive tensor (BatchNorm affines, exits, head) from
  the device's unlabelled upload (32 images); a signed staged patch; no on-device training;
- `both-n<N>`: the generated tensors, then the device trains its exits on top.

    .venv/bin/python benchmarks/early_exits.py --runs runs/ee --data ../shared/data/mnist --model lenet --seeds 0 1 2 \\
        --out runs/ee-bench
    .venv/bin/python benchmarks/early_exits.py --out runs/ee-bench --model lenet --report-only \\
        --json docs/early-exits.json --plot docs/early-exits-pareto.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.01)  # 1.01: never exit early
LABELS_PER_CLASS = (0, 1, 5)


# ---- one seed: everything measured -------------------------------------------------------------
def run_seed(args, seed: int) -> dict:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    import exporters
    from device_runtime import exit_trainer, staged
    from device_runtime.exit_policy import choose_thresholds
    from device_runtime.patch import TrustPolicy
    from device_runtime.runners import RunnerConfig, find_weight_map, open_runner
    from mntool.data.images import ImageProtocolConfig, load_image_dataset
    from mntool.patches import build_staged_patches
    from mntool.train import load_checkpoint
    from mntool.vision.adapt import images_tensor
    from mntool.vision.train import generate_params

    torch.set_num_threads(1)
    root = args.runs / args.model / f"seed{seed}"
    static_ck, exits_ck, mn_ck = (load_checkpoint(root / m) for m in ("static", "exits", "metanetwork"))
    net, mn = exits_ck.model.eval(), mn_ck.meta.eval()
    ds = load_image_dataset(args.data, ImageProtocolConfig(**exits_ck.protocol))
    work = args.out / args.model / f"seed{seed}"
    shutil.rmtree(work / "artifacts", ignore_errors=True)
    example = exits_ck.example_inputs()
    t0 = time.perf_counter()
    stages_dir = exporters.export_staged(net, example, "tflite", work / "artifacts", name="exits")
    full = exporters.export(static_ck.model, example, static_ck.adaptive, "tflite", work / "artifacts", name="full")
    export_s = time.perf_counter() - t0
    cloud_key, device_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    cloud_public = cloud_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    static_params = {n: p.detach().numpy() for n, p in net.named_parameters() if n in net.adaptive_names()}
    _, test_uploads = ds.device_upload("test")
    t0 = time.perf_counter()
    generated = {n: v.numpy() for n, v in generate_params(mn, test_uploads).items()}
    generate_ms = 1e3 * (time.perf_counter() - t0) / len(test_uploads)
    valid, test = ds.valid, ds.test
    train_cfg = exit_trainer.ExitTrainConfig()
    methods = ["static exits"] + [f"persephonee-n{n}" for n in args.labels] + ["metanetwork"]
    methods += [f"both-n{n}" for n in args.labels if n in args.both]
    full_runner = open_runner(full, weight_map=find_weight_map(full), config=RunnerConfig(threads=1))
    image_macs = _forward_macs(net)
    stage_us, full_us = _stage_costs(stages_dir, full_runner, images_tensor(ds.test.images[:200]).numpy())
    chosen = [m for m in methods if m in args.per_device]
    methods += [f"{m}, τ per device" for m in chosen]
    out = {m: {"correct": [], "exit": [], "ms": [], "all_logits": [], "device": []} for m in methods}
    ref = {"correct": [], "ms": [], "device": []}
    costs = {m: [] for m in methods}
    parity = 0.0

    def full_pass(images, labels, d, score: bool) -> None:
        for img, y in zip(images, labels, strict=True):
            arrays = full_runner.prepare({"images": img[None]})
            s = time.perf_counter()
            logits = full_runner.invoke(arrays)[0]
            ref["ms"].append(1e3 * (time.perf_counter() - s))
            if score:
                ref["correct"].append(int(np.argmax(logits) == y))
                ref["device"].append(int(d))

    devices = ds.devices[: args.devices] if args.devices else ds.devices
    for d in devices:
        v_rows, t_rows = valid.device == d, test.device == d
        v_images = images_tensor(valid.images[v_rows]).numpy()
        t_images = images_tensor(test.images[t_rows]).numpy()
        t_labels = test.label[t_rows]
        # the full static network, the reference, timed on the device's own stream before and after
        # the methods (so a change of load during the device's runs hits both sides)
        full_pass(t_images, t_labels, d, score=True)
        for m in [m for m in methods if "per device" not in m]:
            base = (
                static_params
                if m == "static exits" or m.startswith("persephonee")
                else {n: v[d] for n, v in generated.items()}
            )
            patches = build_staged_patches(stages_dir, base, cloud_key, device_id=f"device-{d}")
            policy = TrustPolicy(verify_key=cloud_public, device_id=f"device-{d}")
            staged.apply_staged_patches(stages_dir, patches, policy=policy)
            known = np.full(int(v_rows.sum()), -1)
            if "-n" in m:
                n_labels = int(m.rsplit("-n", 1)[1])
                cost, known = _train_on_device(
                    stages_dir, net, base, v_images, valid.label[v_rows], n_labels, train_cfg, device_key, seed
                )
                cost["forward_macs"] = image_macs * len(v_images)  # every stage over the local images
                costs[m].append(cost)
            runner = staged.StagedRunner(stages_dir, threads=1)
            every = runner.run_all(t_images)  # every exit's logits, for the sweep and parity
            all_logits = np.stack([e["logits"] for e in every], axis=1)  # (64, E, 10)
            if m in ("static exits", "metanetwork") and d < 4:  # compiled == PyTorch with the same tensors
                with torch.no_grad():
                    net_params = {n: torch.from_numpy(np.asarray(v)) for n, v in base.items()}
                    ref_logits = torch.func.functional_call(net, net_params, (torch.from_numpy(t_images),)).numpy()
                parity = max(parity, float(np.abs(ref_logits - all_logits).max()))
            prepared = [runner.prepare(img[None])[0][0] for img in t_images]
            for tau in args.grid:
                th = runner.thresholds(tau)
                for x, y in zip(prepared, t_labels, strict=True):
                    s = time.perf_counter()
                    logits, k = runner.classify_prepared(x, th)
                    out[m]["ms"].append(1e3 * (time.perf_counter() - s))
                    out[m]["exit"].append(k)
                    out[m]["correct"].append(int(np.argmax(logits) == y))
            out[m]["all_logits"].append(all_logits)
            out[m]["device"].append(np.full(len(t_labels), d))
            if m in chosen:  # the device picks its thresholds on its own recent images, then streams
                v_every = runner.run_all(v_images)
                agree = np.where(known >= 0, known, v_every[-1]["logits"].argmax(-1))  # labels, else the final exit
                th = choose_thresholds(
                    [e["logits"] for e in v_every], agree, stage_us, target_accuracy=args.target, grid=args.grid[:-1]
                )
                o = out[f"{m}, τ per device"]
                for x, y in zip(prepared, t_labels, strict=True):
                    s = time.perf_counter()
                    logits, k = runner.classify_prepared(x, runner.thresholds(th))
                    o["ms"].append(1e3 * (time.perf_counter() - s))
                    o["exit"].append(k)
                    o["correct"].append(int(np.argmax(logits) == y))
                o["all_logits"].append(all_logits)
                o["device"].append(np.full(len(t_labels), d))
                o.setdefault("thresholds", []).append(list(th))
            runner.close()
        full_pass(t_images, t_labels, d, score=False)
    full_runner.close()
    result = _summarise(args, seed, out, ref, costs, parity, generate_ms, export_s, test)
    result["stage_us"] = list(stage_us)
    result["full_invoke_us"] = full_us
    for m in chosen:
        result["methods"][f"{m}, τ per device"]["thresholds"] = out[f"{m}, τ per device"]["thresholds"]
    return result


def _stage_costs(stages_dir, full_runner, images: np.ndarray, rounds: int = 5) -> tuple[tuple[float, ...], float]:
    """Median µs of each stage alone and of the full network on the same real inputs (LiteRT, 1
    thread, invoke only), interleaved round by round so that a change of load hits all of them:
    what a device's threshold choice weighs exits by, and the runtime-only ratio's reference."""
    from device_runtime import staged

    runner = staged.StagedRunner(stages_dir, threads=1)
    inputs = [[runner.prepare(img[None])[0][0] for img in images]]
    for k in range(runner.n_exits - 1):
        inputs.append([runner.invoke(k, x)[runner._stages[k].features] for x in inputs[-1]])
    full_inputs = [full_runner.prepare({"images": img[None]}) for img in images]
    times = [[] for _ in range(runner.n_exits + 1)]
    for _ in range(rounds):
        for k in range(runner.n_exits):
            for x in inputs[k]:
                s = time.perf_counter()
                runner.invoke(k, x)
                times[k].append(1e6 * (time.perf_counter() - s))
        for arrays in full_inputs:
            s = time.perf_counter()
            full_runner.invoke(arrays)
            times[-1].append(1e6 * (time.perf_counter() - s))
    runner.close()
    return tuple(float(np.median(t)) for t in times[:-1]), float(np.median(times[-1]))


def _train_on_device(stages_dir, net, base, images, labels, n_labels, cfg, key, seed) -> dict:
    """PersEPhonEE's device step: label N images per class present, run the compiled stages over the
    device's local images, train every early exit's head on its embeddings, write it (local patch)."""
    from device_runtime import exit_trainer, staged

    rng = np.random.default_rng(seed)
    known = np.full(len(labels), -1)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        pick = rng.permutation(rows)[:n_labels]
        known[pick] = c
    t0 = time.perf_counter()
    runner = staged.StagedRunner(stages_dir, threads=1)
    every = runner.run_all(images)
    runner.close()
    forward_ms = 1e3 * (time.perf_counter() - t0)
    manifest = staged.load_staged(stages_dir)
    train_ms, macs, write_ms = 0.0, 0, 0.0
    for k in range(net.n_exits - 1):
        wn, bn = net.exit_names(k)
        W, b, stats = exit_trainer.train_exit_head(
            base[wn], base[bn], every[k]["embedding"], known, every[-1]["logits"], cfg
        )
        train_ms += stats.wall_ms
        macs += stats.macs
        t0 = time.perf_counter()
        exit_trainer.write_exit_head(manifest.artifact(manifest.exits[k].stage), wn, bn, W, b, key=key)
        write_ms += 1e3 * (time.perf_counter() - t0)
    return {
        "forward_ms": forward_ms,
        "train_ms": train_ms,
        "write_ms": write_ms,
        "macs": macs,
        "labelled": int((known >= 0).sum()),
    }, known


def _summarise(args, seed, out, ref, costs, parity, generate_ms, export_s, t_labels_all) -> dict:
    full_ms = float(np.mean(ref["ms"]))
    dev = np.asarray(ref["device"])
    full_acc = _device_mean(np.asarray(ref["correct"]), dev)
    result = {
        "seed": seed,
        "model": args.model,
        "grid": list(args.grid),
        "full": {
            "device_mean_accuracy": full_acc,
            "mean_ms": full_ms,
            "p50_ms": float(np.median(ref["ms"])),
            "p99_ms": float(np.percentile(ref["ms"], 99)),
        },
        "parity_max_abs": parity,
        "generate_ms_per_device": generate_ms,
        "export_s": export_s,
        "methods": {},
    }
    for m, o in out.items():
        # rows were appended device by device, tau by tau, image by image
        devices = np.concatenate(o["device"])
        per_dev = [np.asarray(x) for x in (o["correct"], o["exit"], o["ms"])]
        n_dev = len(o["device"])
        grid = args.grid if "per device" not in m else ["per device"]
        shaped = [a.reshape(n_dev, len(grid), -1) for a in per_dev]
        correct, exits, ms = shaped
        dev_ids = devices.reshape(n_dev, -1)[:, 0]
        sweep = []
        for i, tau in enumerate(grid):
            c, e, t = correct[:, i], exits[:, i], ms[:, i]
            paths = {}
            for k in np.unique(e):
                paths[str(int(k))] = {
                    "p50_ms": float(np.median(t[e == k])),
                    "p99_ms": float(np.percentile(t[e == k], 99)),
                }
            n_exits = int(np.concatenate(o["all_logits"]).shape[1])
            sweep.append(
                {
                    "threshold": tau,
                    "device_mean_accuracy": float(np.mean(c.mean(axis=1))),
                    "mean_ms": float(t.mean()),
                    "ratio_to_full": float(t.mean() / full_ms),
                    "exit_rates": [float((e == k).mean()) for k in range(n_exits)],
                    "paths": paths,
                }
            )
        logits = np.concatenate(o["all_logits"])
        exit_acc = []
        labels = t_labels_all.label[np.isin(t_labels_all.device, dev_ids)]
        for k in range(logits.shape[1]):
            hit = (logits[:, k].argmax(-1) == labels).reshape(n_dev, -1).mean(axis=1)
            exit_acc.append(float(hit.mean()))
        result["methods"][m] = {
            "sweep": sweep,
            "exit_device_mean_accuracy": exit_acc,
            "cost": _cost_summary(costs.get(m, [])),
        }
    return result


def _device_mean(correct: np.ndarray, device: np.ndarray) -> float:
    return float(np.mean([correct[device == d].mean() for d in np.unique(device)]))


def _cost_summary(rows: list[dict]) -> dict:
    if not rows:
        return {}
    return {k: float(np.median([r[k] for r in rows])) for k in rows[0]}


def finetune_cost(args, seed: int, devices: int = 10) -> dict:
    """Per-device cost of fine-tuning the whole network (PyTorch, 1 thread) on the same local data and
    the same number of steps as the exit trainer: PersEPhonEE's training-cost comparison."""
    import torch

    from device_runtime.exit_trainer import ExitTrainConfig
    from mntool.data.images import ImageProtocolConfig, load_image_dataset
    from mntool.train import load_checkpoint
    from mntool.vision.adapt import images_tensor

    torch.set_num_threads(1)
    ck = load_checkpoint(args.runs / args.model / f"seed{seed}" / "exits")
    ds = load_image_dataset(args.data, ImageProtocolConfig(**ck.protocol))
    steps = ExitTrainConfig().steps
    out = []
    for d in ds.devices[:devices]:
        rows = ds.valid.device == d
        x, y = images_tensor(ds.valid.images[rows]), torch.from_numpy(ds.valid.label[rows])
        net = type(ck.model)(type(ck.model.backbone)(ck.model.backbone.config))
        net.load_state_dict(ck.model.state_dict())
        net.eval()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = net.loss(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out.append(1e3 * (time.perf_counter() - t0))
    macs = 3 * _forward_macs(ck.model) * int(rows.sum()) * steps  # forward + backward ~ 3x forward
    return {
        "whole_network_finetune_ms": float(np.median(out)),
        "whole_network_finetune_macs": macs,
        "steps": steps,
        "rows": int(rows.sum()),
    }


def _forward_macs(net) -> int:
    """Multiply-accumulates of one image through every convolution and linear layer of `net`."""
    import torch

    total = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.weight[0].numel()  # (cin / groups) * kh * kw
            total.append(output.numel() * k)
        elif isinstance(module, torch.nn.Linear):
            total.append(output.numel() * module.in_features)

    handles = [
        m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        net(torch.zeros(1, 1, 28, 28))
    for h in handles:
        h.remove()
    return int(sum(total))


# ---- report ------------------------------------------------------------------------------------
def report(args) -> dict:
    """Aggregate the seeds' result.json: per method, the curve (mean over seeds per threshold), the
    latency ratio at the full network's accuracy, accuracy at latency budgets, exit rates, costs."""
    paths = sorted((args.out / args.model).glob("seed*/result.json"))
    if not paths:
        sys.exit(f"no results under {args.out / args.model}; run without --report-only first")
    results = [json.loads(p.read_text()) for p in paths]
    summary = {
        "model": args.model,
        "seeds": [r["seed"] for r in results],
        "grid": results[0]["grid"],
        "full": {
            "device_mean_accuracy": _mean_std([r["full"]["device_mean_accuracy"] for r in results]),
            "mean_us": _mean_std([1e3 * r["full"]["mean_ms"] for r in results]),
            "p50_us": _mean_std([1e3 * r["full"]["p50_ms"] for r in results]),
            "p99_us": _mean_std([1e3 * r["full"]["p99_ms"] for r in results]),
        },
        "parity_max_abs": max(r["parity_max_abs"] for r in results),
        "generate_ms_per_device": _mean_std([r["generate_ms_per_device"] for r in results]),
        "finetune_cost": [r.get("finetune_cost") for r in results],
        "stage_us": [r["stage_us"] for r in results],
        "full_invoke_us": [r["full_invoke_us"] for r in results],
        "methods": {},
    }
    for m in results[0]["methods"]:
        per_seed = []
        for r in results:
            sweep = r["methods"][m]["sweep"]
            acc = np.array([x["device_mean_accuracy"] for x in sweep])
            ratio = np.array([x["ratio_to_full"] for x in sweep])
            # the runtimes' own share: each stage alone (invoke only) weighted by the measured exit rates
            path_us = np.cumsum(r["stage_us"])
            runtime_ratio = np.array([np.dot(x["exit_rates"], path_us) for x in sweep]) / r["full_invoke_us"]
            ok = acc >= r["full"]["device_mean_accuracy"]
            at_budget = {str(b): (float(acc[ratio <= b].max()) if (ratio <= b).any() else None) for b in args.budgets}
            best = int(np.argmin(np.where(ok, ratio, np.inf))) if ok.any() else None
            per_seed.append(
                {
                    "ratio_at_full_accuracy": float(ratio[best]) if best is not None else None,
                    "runtime_ratio_at_full_accuracy": float(runtime_ratio[best]) if best is not None else None,
                    "threshold_at_full_accuracy": sweep[best]["threshold"] if best is not None else None,
                    "exit_rates_at_full_accuracy": sweep[best]["exit_rates"] if best is not None else None,
                    "accuracy_at_budget": at_budget,
                    "max_accuracy": float(acc.max()),
                    "acc": acc,
                    "ratio": ratio,
                    "us": np.array([1e3 * x["mean_ms"] for x in sweep]),
                    "rates": np.array([x["exit_rates"] for x in sweep]),
                    "paths": sweep[best if best is not None else int(np.argmax(acc))]["paths"],
                }
            )
        reached = [x["ratio_at_full_accuracy"] for x in per_seed]
        summary["methods"][m] = {
            "exit_device_mean_accuracy": np.mean(
                [r["methods"][m]["exit_device_mean_accuracy"] for r in results], axis=0
            ).tolist(),
            "exit_device_mean_accuracy_std": np.std(
                [r["methods"][m]["exit_device_mean_accuracy"] for r in results], axis=0
            ).tolist(),
            "ratio_at_full_accuracy": reached,
            "runtime_ratio_at_full_accuracy": [x["runtime_ratio_at_full_accuracy"] for x in per_seed],
            "threshold_at_full_accuracy": [x["threshold_at_full_accuracy"] for x in per_seed],
            "exit_rates_at_full_accuracy": [x["exit_rates_at_full_accuracy"] for x in per_seed],
            "accuracy_at_budget": {
                b: [x["accuracy_at_budget"][b] for x in per_seed] for b in per_seed[0]["accuracy_at_budget"]
            },
            "max_accuracy": _mean_std([x["max_accuracy"] for x in per_seed]),
            "curve": {
                "accuracy": np.mean([x["acc"] for x in per_seed], axis=0).tolist(),
                "ratio_to_full": np.mean([x["ratio"] for x in per_seed], axis=0).tolist(),
                "mean_us": np.mean([x["us"] for x in per_seed], axis=0).tolist(),
                "exit_rates": np.mean([x["rates"] for x in per_seed], axis=0).tolist(),
            },
            "cost": [r["methods"][m]["cost"] for r in results],
            "paths": [x["paths"] for x in per_seed],
        }
    return summary


def _mean_std(values) -> list[float]:
    v = np.asarray(values, dtype=float)
    return [float(v.mean()), float(v.std())]


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def markdown(summary: dict) -> str:
    """The docs table: one row per method."""
    full = summary["full"]
    lines = [
        f"**{summary['model']}**, seeds {', '.join(map(str, summary['seeds']))}: full static network "
        f"{100 * full['device_mean_accuracy'][0]:.2f} ± {100 * full['device_mean_accuracy'][1]:.2f} % per-device mean "
        f"accuracy, {full['mean_us'][0]:.1f} µs mean per input (p50 {full['p50_us'][0]:.1f}, "
        f"p99 {full['p99_us'][0]:.1f}); compiled vs PyTorch max |Δlogit| {summary['parity_max_abs']:.1e}",
        "",
        "| method | exit accuracies (%) | latency at the full network's accuracy (x full: streamed, per seed; runtime-only, mean) "
        "| accuracy (%) at ≤ 0.6x / ≤ 0.8x / ≤ 1.0x (equal) latency, mean | best accuracy (%) "
        "| exit rates at the full net's accuracy "
        "| on-device ms / device |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, v in summary["methods"].items():
        exits = " / ".join(f"{100 * a:.1f}" for a in v["exit_device_mean_accuracy"])
        reached = ", ".join("not reached" if r is None else f"{r:.2f}x" for r in v["ratio_at_full_accuracy"])
        runtime = [r for r in v["runtime_ratio_at_full_accuracy"] if r is not None]
        if runtime:
            reached += f"; {np.mean(runtime):.2f}x"
        budget = []
        for b in ("0.6", "0.8", "1.0"):
            vals = [x for x in v["accuracy_at_budget"].get(b, []) if x is not None]
            budget.append(f"{100 * np.mean(vals):.2f}" if len(vals) == len(summary["seeds"]) else "—")
        rates = [r for r in v["exit_rates_at_full_accuracy"] if r is not None]
        rates_s = " / ".join(f"{100 * x:.0f}%" for x in np.mean(rates, axis=0)) if rates else "—"
        costs = [c for c in v["cost"] if c]
        cost_s = "0 (cloud)" if m in ("static exits", "metanetwork") else "—"
        if costs:
            cost_s = f"{np.mean([c['forward_ms'] + c['train_ms'] + c['write_ms'] for c in costs]):.1f}"
        lines.append(
            f"| {m} | {exits} | {reached} | {' / '.join(budget)} "
            f"| {100 * v['max_accuracy'][0]:.2f} ± {100 * v['max_accuracy'][1]:.2f} | {rates_s} | {cost_s} |"
        )
    lines += ["", _path_table(summary), "", _cost_table(summary)]
    return "\n".join(lines) + "\n"


def _path_table(summary: dict) -> str:
    """Per-stage latency alone and per exit path (stages 0..k) as the stream measured it."""
    stage = np.mean(summary["stage_us"], axis=0)
    lines = [
        "Each stage alone (median µs over 200 test images x 5 rounds, mean over seeds): "
        + ", ".join(f"stage {k} {t:.1f}" for k, t in enumerate(stage))
        + f"; the full network {np.mean(summary['full_invoke_us']):.1f} (same rounds). Per exit path in the stream "
        "(p50 / p99 µs, seed "
        f"{summary['seeds'][0]}, at the threshold where each method first reaches the full network's accuracy, "
        "else its most accurate one):",
        "",
        "| method | " + " | ".join(f"exit {k}" for k in range(len(stage))) + " |",
        "|---|" + "---|" * len(stage),
    ]
    for m, v in summary["methods"].items():
        paths = v["paths"][0]
        cells = [
            f"{1e3 * paths[str(k)]['p50_ms']:.1f} / {1e3 * paths[str(k)]['p99_ms']:.1f}" if str(k) in paths else "—"
            for k in range(len(stage))
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cost_table(summary: dict) -> str:
    """Per-device personalisation cost on the device against fine-tuning the whole network."""
    ft = [f for f in summary["finetune_cost"] if f]
    ft_ms = np.mean([f["whole_network_finetune_ms"] for f in ft])
    ft_macs = np.mean([f["whole_network_finetune_macs"] for f in ft])
    lines = [
        f"Per-device cost (median over devices, mean over seeds). Reference: fine-tuning the whole network "
        f"on the same {ft[0]['rows']} images for the same {ft[0]['steps']} Adam steps, PyTorch, 1 thread: "
        f"**{ft_ms:.0f} ms, {ft_macs / 1e9:.1f} GMAC** per device. MetaNetwork's generation runs in the cloud: "
        f"{summary['generate_ms_per_device'][0]:.1f} ms per device there, 0 on the phone.",
        "",
        "| method | compiled forward over the 64 images (ms) | exit-head training, numpy (ms) | write (local patch, ms) "
        "| total (ms) | x cheaper than whole-network fine-tuning (time / MACs) |",
        "|---|---|---|---|---|---|",
    ]
    for m, v in summary["methods"].items():
        costs = [c for c in v["cost"] if c]
        if not costs or "per device" in m:
            continue
        f, t, w = (np.mean([c[k] for c in costs]) for k in ("forward_ms", "train_ms", "write_ms"))
        macs = np.mean([c["macs"] + c["forward_macs"] for c in costs])
        lines.append(
            f"| {m} | {f:.1f} | {t:.1f} | {w:.1f} | {f + t + w:.1f} | {ft_ms / (f + t + w):.0f}x / {ft_macs / macs:.0f}x |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    """Accuracy against mean latency per input (x the full network), one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for m, v in summary["methods"].items():
        c = v["curve"]
        single = len(c["accuracy"]) == 1  # thresholds each device chose: one point
        ax.plot(
            c["ratio_to_full"],
            100 * np.asarray(c["accuracy"]),
            marker="D" if single else "o",
            ms=7 if single else 3,
            ls="none" if single else "-",
            label=m,
        )
    full = summary["full"]["device_mean_accuracy"][0]
    ax.axhline(100 * full, color="k", lw=0.8, ls="--")
    ax.plot([1.0], [100 * full], "k*", ms=12, label="full static network")
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("mean LiteRT latency per input / full static network's (same run, 1 thread)")
    ax.set_ylabel("per-device mean accuracy (%)")
    ax.set_title(
        f"Early exits on {summary['model']}: threshold sweep, mean of seeds {', '.join(map(str, summary['seeds']))}"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/ee"))
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ee-bench"))
    ap.add_argument("--devices", type=int, default=0, help="first N devices only (0: all)")
    ap.add_argument("--labels", type=int, nargs="+", default=list(LABELS_PER_CLASS))
    ap.add_argument("--both", type=int, nargs="+", default=[0, 5], help="label counts of the 'both' method")
    ap.add_argument("--grid", type=float, nargs="+", default=list(GRID))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.8, 1.0], help="latency budgets (x full)")
    ap.add_argument(
        "--per-device",
        nargs="+",
        default=["persephonee-n5", "metanetwork", "both-n5"],
        help="methods also run with thresholds each device chooses on its own recent images",
    )
    ap.add_argument(
        "--target",
        type=float,
        default=0.97,
        help="per-device choice: agreement with the device's labels / final exit to reach",
    )
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if not args.report_only:
        for seed in args.seeds:
            result = run_seed(args, seed)
            result["finetune_cost"] = finetune_cost(args, seed)
            path = args.out / args.model / f"seed{seed}" / "result.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"seed {seed}: {path}")
    summary = report(args)
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        print(f"plot: {plot(summary, args.plot)}")


if __name__ == "__main__":
    main()
