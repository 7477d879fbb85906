"""Training throughput and per-device personalisation cost, as ratios measured in one run.

- Training: samples/s of a static and a MetaNetwork training step for each backbone, on real
  MovieLens-100k batches (the trainer's own batching), 2 threads, measured in interleaved rounds so
  machine noise hits all alike; ratio = MetaNetwork step time / static step time. "MetaNetwork" is
  `mntool train --method metanetwork` (backbone and generator trained together); "frozen" is the
  generator alone on a frozen backbone (`--init`, the patch for a deployed static model).
- Per device: generating one device's adaptive parameters (MetaNetwork) vs fine-tuning the same
  adaptive layers on that device's labelled recent samples (the `finetune` baseline), one device
  at a time, median over devices.

    .venv/bin/python benchmarks/train_cost.py [--steps 30] [--rounds 5] [--devices 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mntool import train
from mntool.data import ProtocolConfig
from mntool.data.datasets import load_dataset
from mntool.models import BackboneConfig, build_model
from mntool.train import (
    TrainConfig,
    build_metanetwork,
    finetune_device_params,
    generate_device_params,
    group_batches,
    metanetwork_optimizer,
)


def training_steps(dataset, model_name: str, steps: int, rounds: int) -> dict:
    cfg = TrainConfig(model=model_name, backbone=BackboneConfig(max_history=dataset.config.history_len))
    torch.manual_seed(0)
    static = build_model(model_name, dataset.n_items, cfg.backbone).train()
    meta = build_metanetwork(
        build_model(model_name, dataset.n_items, cfg.backbone), cfg, dataset.config.recent_len
    ).train()
    frozen = build_metanetwork(
        build_model(model_name, dataset.n_items, cfg.backbone), cfg, dataset.config.recent_len
    ).train()
    opt_s = torch.optim.Adam(static.parameters(), lr=cfg.lr)
    opt_m = metanetwork_optimizer(meta, cfg)  # exactly what `mntool train --method metanetwork` steps
    opt_f = metanetwork_optimizer(frozen, replace(cfg, meta_train_backbone=False))
    rows, group = dataset.train, dataset.config.n_negatives + 1
    batches = list(group_batches(rows, cfg.batch_size, group, np.random.default_rng(0)))[:steps]

    def static_step(idx):
        train.static_step(static, opt_s, rows, idx, group)

    def meta_step(idx):
        train.metanetwork_step(meta, opt_m, rows, idx, group)

    def frozen_step(idx):
        train.metanetwork_step(frozen, opt_f, rows, idx, group)

    step_fns = {"static": static_step, "metanetwork": meta_step, "frozen": frozen_step}
    times = {name: [] for name in step_fns}
    for fn in step_fns.values():  # warm-up
        for idx in batches[:3]:
            fn(idx)
    for _ in range(rounds):
        for name, fn in step_fns.items():
            t0 = time.perf_counter()
            for idx in batches:
                fn(idx)
            times[name].append(time.perf_counter() - t0)
    n_rows = sum(len(b) for b in batches)
    sps = {k: n_rows / statistics.median(v) for k, v in times.items()}
    return {
        "static_samples_per_s": sps["static"],
        "metanetwork_samples_per_s": sps["metanetwork"],
        "step_time_ratio": sps["static"] / sps["metanetwork"],
        "frozen_samples_per_s": sps["frozen"],
        "frozen_step_time_ratio": sps["static"] / sps["frozen"],
    }


def personalisation_cost(dataset, model_name: str, devices: int) -> dict:
    cfg = TrainConfig(model=model_name, backbone=BackboneConfig(max_history=dataset.config.history_len))
    torch.manual_seed(0)
    model = build_model(model_name, dataset.n_items, cfg.backbone).eval()
    meta = build_metanetwork(model, cfg, dataset.config.recent_len).eval()
    users, recent = dataset.device_recent("test")
    gen, ft = [], []
    for i in range(devices):
        u, r = users[i : i + 1], recent[i : i + 1]
        t0 = time.perf_counter()
        generate_device_params(meta, u, r)
        gen.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        finetune_device_params(
            model, u, r, cfg.finetune, seed=i, history_len=dataset.config.history_len, devices_per_batch=1
        )
        ft.append(time.perf_counter() - t0)
    g, f = statistics.median(gen), statistics.median(ft)
    return {
        "generate_ms_per_device": g * 1e3,
        "finetune_ms_per_device": f * 1e3,
        "finetune_over_generate": f / g,
        "finetune_steps": cfg.finetune.steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gru4rec", "sasrec", "din"])
    ap.add_argument("--steps", type=int, default=30, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--devices", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--history-len", type=int, default=30, help="clicks the device model reads (mntool train --history-len)"
    )
    ap.add_argument("--recent-len", type=int, default=30, help="items a device uploads (mntool train --recent-len)")
    ap.add_argument("--data", type=Path, help="MovieLens directory [default: the fetched cache]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data, ProtocolConfig(history_len=args.history_len, recent_len=args.recent_len))
    results = {
        m: {**training_steps(dataset, m, args.steps, args.rounds), **personalisation_cost(dataset, m, args.devices)}
        for m in args.models
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"threads={args.threads}, history {args.history_len}, uploads {args.recent_len}, {args.steps} steps x {args.rounds} rounds, "
        f"batch {TrainConfig().batch_size} rows"
    )
    print(
        "| backbone | static samples/s | MetaNetwork samples/s | MN/static step time | frozen-backbone MN samples/s | "
        "frozen/static step time | generate ms/device | finetune ms/device | finetune/generate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m, r in results.items():
        print(
            f"| {m} | {r['static_samples_per_s']:,.0f} | {r['metanetwork_samples_per_s']:,.0f} | {r['step_time_ratio']:.2f}x | "
            f"{r['frozen_samples_per_s']:,.0f} | {r['frozen_step_time_ratio']:.2f}x | "
            f"{r['generate_ms_per_device']:.2f} | {r['finetune_ms_per_device']:.1f} | {r['finetune_over_generate']:.0f}x |"
        )


if __name__ == "__main__":
    main()
