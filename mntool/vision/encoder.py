"""The image encoder MetaNetwork reads a device's upload through: a set of K unlabelled images
(B, K, 28, 28) uint8 -> a condition vector (B, cond_dim).

Each image goes through a small CNN of the generator's own (cloud side, never shipped); the set is
pooled two ways, mean and standard deviation over the K images, so both what the device sees most
(its label mix) and how its images vary (its style) can drive the parameters, then a small MLP.
Pooling makes it indifferent to the order and, within limits, the number of images uploaded.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mntool.vision.models import PIXEL_MEAN, PIXEL_STD


class ImageSetEncoder(nn.Module):
    def __init__(self, cond_dim: int, width: int = 32):
        super().__init__()
        self.embed = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, stride=2, padding=1),  # 28 -> 14
            nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1),  # 14 -> 7
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # 7 -> 4
            nn.ReLU(),
        )
        self.mlp = nn.Sequential(
            nn.Linear(4 * width, cond_dim), nn.ReLU(), nn.Linear(cond_dim, cond_dim), nn.LayerNorm(cond_dim)
        )

    def forward(self, upload: torch.Tensor) -> torch.Tensor:
        assert upload.dim() == 4 and upload.shape[2:] == (28, 28), (
            f"expected uploads (B, K, 28, 28), got {tuple(upload.shape)}"
        )
        B, K = upload.shape[:2]
        x = upload.to(torch.float32)
        if upload.dtype == torch.uint8:
            x = x / 255.0
        e = self.embed(((x - PIXEL_MEAN) / PIXEL_STD).reshape(B * K, 1, 28, 28)).mean(dim=(2, 3))  # (B*K, 2w)
        e = e.reshape(B, K, -1)
        std = e.var(dim=1, unbiased=False).add(1e-6).sqrt() if K > 1 else torch.zeros_like(e[:, 0])
        return self.mlp(torch.cat([e.mean(dim=1), std], dim=-1))
