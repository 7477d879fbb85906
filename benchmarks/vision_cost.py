"""Per-device personalisation cost of each image method (docs/vision.md): what it takes to turn
one device's upload into its adaptive tensors, one device at a time, 1 thread, PyTorch on this
host, all methods in the same run (so their ratios hold even where the machine is noisy).

- bn-adapt: one forward pass over the upload (statistics), then the affine rewrite;
- tent: that, then `tent_steps` entropy steps (what a phone would run: TENT is on-device);
- finetune: `finetune_steps` cross-entropy steps on the K labelled images (on-device too);
- metanetwork: the generator's forward pass on the upload (in the cloud; zero on the phone).

    .venv/bin/python benchmarks/vision_cost.py --runs runs/vision/lenet/seed0 --data ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mntool.data.images import ImageProtocolConfig, load_image_dataset
from mntool.train import load_checkpoint
from mntool.vision import adapt
from mntool.vision.train import generate_params

CELLS = {"bn-adapt": "bn-adapt", "tent": "tent", "finetune": "finetune-K-labels", "metanetwork": "metanetwork"}


def per_device_ms(fn, uploads: np.ndarray, labels: np.ndarray, devices: int) -> list[float]:
    out = []
    for d in range(devices):
        t0 = time.perf_counter()
        fn(uploads[d : d + 1], labels[d : d + 1])
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="one seed's directory of vision_table.py runs")
    ap.add_argument("--data", default=None)
    ap.add_argument("--devices", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cks = {m: load_checkpoint(args.runs / d) for m, d in CELLS.items()}
    ds = load_image_dataset(args.data, ImageProtocolConfig(**cks["metanetwork"].protocol))
    _, uploads = ds.device_upload("test")
    labels = ds.device_upload_labels("test")
    a = {m: ck.config.adapt for m, ck in cks.items()}
    fns = {
        "bn-adapt": lambda u, y: adapt.bn_stats_params(cks["bn-adapt"].model, u, a["bn-adapt"].bn_prior),
        "tent": lambda u, y: adapt.tent_params(
            cks["tent"].model, u, a["tent"].bn_prior, a["tent"].tent_steps, a["tent"].tent_lr
        ),
        "finetune": lambda u, y: adapt.finetune_params(
            cks["finetune"].model, u, y, a["finetune"].finetune_steps, a["finetune"].finetune_lr
        ),
        "metanetwork": lambda u, y: generate_params(cks["metanetwork"].meta, u),
    }
    for fn in fns.values():  # warm up every path once
        fn(uploads[:1], labels[:1])
    result = {"model": cks["metanetwork"].config.model, "devices": args.devices, "threads": 1, "methods": {}}
    for m, fn in fns.items():
        ms = per_device_ms(fn, uploads, labels, args.devices)
        result["methods"][m] = {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))}
    gen = result["methods"]["metanetwork"]["median_ms"]
    for r in result["methods"].values():
        r["x_generation"] = r["median_ms"] / gen
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
