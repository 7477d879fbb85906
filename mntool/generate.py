"""The generation API: a checkpoint plus a device's recent samples -> its adaptive parameters.

This is what `mntool generate`, `mntool serve` and the demo call. For a MetaNetwork checkpoint
the (EMA) generator maps the upload to parameters in one forward pass; a static checkpoint
returns its static parameters; a finetune checkpoint runs the per-device fine-tuning baseline
in the cloud. Inputs are checked (shape, integer ids inside the vocabulary) and outputs are
finite float32 arrays in PyTorch shapes, keyed by parameter name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from device_runtime.errors import MntoolError
from mntool.train import Checkpoint, finetune_device_params, generate_device_params, load_checkpoint


class SamplesError(MntoolError):
    """Recent samples of the wrong shape, type or vocabulary."""


class Generator:
    """Loaded once, called per device (or per batch of devices)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.method = checkpoint.config.method
        self.n_items = checkpoint.n_items
        self.recent_len = int(checkpoint.protocol["recent_len"])
        self.adaptive = checkpoint.adaptive
        params = dict(checkpoint.model.named_parameters())
        self.shapes = {n: tuple(params[n].shape) for n in self.adaptive}

    @classmethod
    def load(cls, ckpt_dir: Path | str) -> Generator:
        return cls(load_checkpoint(ckpt_dir))

    def check_recent(self, recent) -> np.ndarray:
        """(B, R) int64 from a list / array of item ids per device, most recent last; shorter
        uploads are left-padded with 0."""
        arr = np.asarray(recent)
        if arr.dtype == object or arr.ndim not in (1, 2):
            raise SamplesError(
                f"recent samples must be a list of item ids or a (devices, items) array, got shape {arr.shape}"
            )
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            if not (
                np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
            ):
                raise SamplesError(f"recent samples must be integer item ids, got {arr.dtype}")
        arr = arr.astype(np.int64)
        arr = arr[None, :] if arr.ndim == 1 else arr
        if arr.shape[1] > self.recent_len:
            raise SamplesError(f"{arr.shape[1]} recent samples per device; this model takes at most {self.recent_len}")
        if arr.size and (arr.min() < 0 or arr.max() > self.n_items):
            bad = arr[(arr < 0) | (arr > self.n_items)][0]
            raise SamplesError(f"item id {bad} is outside the vocabulary 1..{self.n_items} (0 = padding)")
        if arr.shape[1] < self.recent_len:
            arr = np.concatenate([np.zeros((arr.shape[0], self.recent_len - arr.shape[1]), np.int64), arr], axis=1)
        return arr

    def generate_batch(self, recent) -> dict[str, np.ndarray]:
        """{name: (B, *shape) float32} for B devices' uploads (B, <=R)."""
        batch = self.check_recent(recent)
        users = np.arange(len(batch))
        if self.method == "metanetwork":
            params = generate_device_params(self.checkpoint.meta, users, batch).params
        elif self.method == "finetune":
            params = finetune_device_params(
                self.checkpoint.model,
                users,
                batch,
                self.checkpoint.config.finetune,
                seed=0,
                history_len=int(self.checkpoint.protocol["history_len"]),
            ).params
        else:
            static = dict(self.checkpoint.model.named_parameters())
            params = {n: static[n].detach().unsqueeze(0).expand(len(batch), *self.shapes[n]) for n in self.adaptive}
        out = {n: np.ascontiguousarray(p.detach().to(torch.float32).numpy()) for n, p in params.items()}
        for n, a in out.items():
            if not np.all(np.isfinite(a)):
                raise MntoolError(f"generated {n} is not finite; the checkpoint is broken")
        return out

    def generate(self, recent) -> dict[str, np.ndarray]:
        """{name: shape float32} for one device's upload (a list of item ids, most recent last)."""
        arr = np.asarray(recent)
        if arr.ndim != 1:
            raise SamplesError(f"one device's recent samples are a 1-D list of item ids, got shape {arr.shape}")
        return {
            n: a[0] for n, a in self.generate_batch(arr[None, :] if arr.size else np.zeros((1, 0), np.int64)).items()
        }


def generate(checkpoint: Path | str | Generator, recent) -> dict[str, np.ndarray]:
    """One device's adaptive parameters: `generate(ckpt_dir, [item ids])`."""
    gen = checkpoint if isinstance(checkpoint, Generator) else Generator.load(checkpoint)
    return gen.generate(recent)
