"""The image encoder MetaNetwork reads a device's upload through: a set of K unlabelled images
(B, K, 28, 28) uint8 -> a condition vector (B, cond_dim).

Each image goes through a small CNN of the generator's own (cloud side, never shipped); the set is
pooled two ways, mean and standard deviation over the K images, so both what the device sees most
(its label mix) and how its images vary (its style) can drive the parameters, then a small MLP.
Pooling makes it indifferent to the order and, within limits, the number of images uploaded.

With a `probe` (the device model itself, read with its static parameters and no gradient), the
encoder also reads the model's mean predicted class distribution over the upload: an estimate of
the device's current label mix that 900 training uploads could not teach a fresh CNN (measured in
docs/vision.md). The probe is held by reference: the EMA copy of the generator shares it and the
checkpoint does not store it twice.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mntool.vision.models import PIXEL_MEAN, PIXEL_STD


class _Shared:
    """A module held by reference: deep copies (the EMA generator) share it, state_dict skips it."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo):
        return self


class ImageSetEncoder(nn.Module):
    def __init__(self, cond_dim: int, width: int = 32, probe: nn.Module | None = None, n_classes: int = 10):
        super().__init__()
        self._probe = _Shared(probe) if probe is not None else None
        extra = n_classes if probe is not None else 0
        self.embed = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, stride=2, padding=1),  # 28 -> 14
            nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1),  # 14 -> 7
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # 7 -> 4
            nn.ReLU(),
        )
        self.mlp = nn.Sequential(
            nn.Linear(4 * width + extra, cond_dim), nn.ReLU(), nn.Linear(cond_dim, cond_dim), nn.LayerNorm(cond_dim)
        )

    def forward(self, upload: torch.Tensor) -> torch.Tensor:
        assert upload.dim() == 4 and upload.shape[2:] == (28, 28), (
            f"expected uploads (B, K, 28, 28), got {tuple(upload.shape)}"
        )
        B, K = upload.shape[:2]
        x = upload.to(torch.float32)
        if upload.dtype == torch.uint8:
            x = x / 255.0
        images = x.reshape(B * K, 1, 28, 28)
        e = self.embed((images - PIXEL_MEAN) / PIXEL_STD).mean(dim=(2, 3)).reshape(B, K, -1)  # (B, K, 2w)
        std = e.var(dim=1, unbiased=False).add(1e-6).sqrt() if K > 1 else torch.zeros_like(e[:, 0])
        pooled = [e.mean(dim=1), std]
        if self._probe is not None:
            pooled.append(self._predicted_mix(images).reshape(B, K, -1).mean(dim=1))
        return self.mlp(torch.cat(pooled, dim=-1))

    def _predicted_mix(self, images: torch.Tensor) -> torch.Tensor:
        """The probe's class probabilities per image, static parameters, BatchNorm in eval mode."""
        model = self._probe.module
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return torch.softmax(model.final_logits(model(images)), dim=-1)
        finally:
            model.train(was_training)
