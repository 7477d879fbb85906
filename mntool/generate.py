"""The generation API: a checkpoint plus a device's recent samples -> its adaptive parameters.

This is what `mntool generate`, `mntool serve` and the demo call, for a checkpoint of any task
(`mntool.tasks`): the task checks the upload (recent item ids, or images) and runs its method on
it. For a MetaNetwork checkpoint the (EMA) generator maps the upload to parameters in one forward
pass; a static checkpoint returns its static parameters; the other methods run their own
per-device baseline in the cloud where it needs no labels. Outputs are finite float32 arrays in
PyTorch shapes, keyed by parameter name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from device_runtime.errors import MntoolError
from mntool import tasks
from mntool.tasks import SamplesError
from mntool.train import Checkpoint, load_checkpoint

__all__ = ["Generator", "SamplesError", "generate"]


class Generator:
    """Loaded once, called per device (or per batch of devices)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.task = tasks.get(checkpoint.task)
        self.task.check_generates(checkpoint)
        self.method = checkpoint.config.method
        self.max_samples = self.task.upload_limit(checkpoint)
        self.adaptive = checkpoint.adaptive
        params = dict(checkpoint.model.named_parameters())
        self.shapes = {n: tuple(params[n].shape) for n in self.adaptive}

    @property
    def recent_len(self) -> int:  # the recommender's name for max_samples
        return self.max_samples

    @property
    def n_items(self) -> int:
        return self.checkpoint.n_items

    @classmethod
    def load(cls, ckpt_dir: Path | str) -> Generator:
        return cls(load_checkpoint(ckpt_dir))

    def check_recent(self, recent) -> np.ndarray:
        """A batch of uploads, checked and padded by the task (SamplesError on anything wrong)."""
        return self.task.check_upload(self.checkpoint, recent)

    def generate_batch(self, recent) -> dict[str, np.ndarray]:
        """{name: (B, *shape) float32} for B devices' uploads."""
        params = self.task.generate(self.checkpoint, self.check_recent(recent))
        out = {n: np.ascontiguousarray(p.detach().to(torch.float32).numpy()) for n, p in params.items()}
        for n, a in out.items():
            if not np.all(np.isfinite(a)):
                raise MntoolError(f"generated {n} is not finite; the checkpoint is broken")
        return out

    def generate(self, recent) -> dict[str, np.ndarray]:
        """{name: shape float32} for one device's upload (item ids, or images, most recent last)."""
        return {n: a[0] for n, a in self.generate_batch(self.task.one_upload(recent)).items()}


def generate(checkpoint: Path | str | Generator, recent) -> dict[str, np.ndarray]:
    """One device's adaptive parameters: `generate(ckpt_dir, [item ids])`."""
    gen = checkpoint if isinstance(checkpoint, Generator) else Generator.load(checkpoint)
    return gen.generate(recent)
