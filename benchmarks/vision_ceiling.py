"""What a device's label mix is worth to a static CNN on img-v1 (docs/vision.md, "Where the gain
can come from"): test per-device mean accuracy of a static checkpoint as is, with its logits
shifted by the device's *true* current label mix (an oracle: log mix_new - log cloud prior), and
shifted by the mix the static model itself predicts on the device's unlabelled upload (what a
label-free method can estimate; `--weight` scales the shift). Also the RMS of each adaptive tensor
(what the MetaStabilizer scales a residual by).

    .venv/bin/python benchmarks/vision_ceiling.py runs/vision/lenet/seed0/static --data ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mntool.data.images import ImageProtocolConfig, load_image_dataset
from mntool.train import load_checkpoint
from mntool.vision.metrics import device_mean_accuracy
from mntool.vision.train import score_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--data", default=None)
    ap.add_argument("--weight", type=float, default=1.0)
    args = ap.parse_args()
    ck = load_checkpoint(args.ckpt)
    ds = load_image_dataset(args.data, ImageProtocolConfig(**ck.protocol))
    test = ds.test
    logits = score_images(ck.model, test.images, test.device, None)
    cloud_prior = np.bincount(ds.train.label, minlength=10) / len(ds.train)
    mix_new = np.array([s["mix_new"] for s in ds.styles])
    oracle = logits + np.log(mix_new[test.device] + 1e-3) - np.log(cloud_prior)
    devices, uploads = ds.device_upload("test")
    up = score_images(ck.model, uploads.reshape(-1, 28, 28), np.repeat(devices, uploads.shape[1]), None)
    predicted = torch.softmax(torch.from_numpy(up), -1).numpy().reshape(len(devices), uploads.shape[1], 10).mean(1)
    estimated = logits + args.weight * (np.log(predicted[test.device] + 1e-2) - np.log(cloud_prior))
    params = dict(ck.model.named_parameters())
    out = {
        "checkpoint": args.ckpt,
        "static_rms": {n: float(params[n].detach().pow(2).mean().sqrt()) for n in ck.adaptive},
        "static": device_mean_accuracy(test.device, test.label, logits.argmax(1)),
        "true_mix_shift": device_mean_accuracy(test.device, test.label, oracle.argmax(1)),
        "predicted_mix_shift": device_mean_accuracy(test.device, test.label, estimated.argmax(1)),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
