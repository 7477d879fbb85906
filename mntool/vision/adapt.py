"""Per-device adaptation baselines for the CNNs, each producing the same thing MetaNetwork does:
one set of adaptive tensors (BatchNorm affines + classifier head) per device, i.e. a patch.

- `bn_stats_params`: BN adaptation (Schneider et al. 2020): BatchNorm statistics re-estimated on
  the device's unlabelled upload, mixed with the training statistics under a prior of strength N
  (`mu = (N mu_train + n mu_upload) / (N + n)`, n the number of uploaded images, likewise the
  variance), layer after layer (each layer's statistics are taken on features normalised by the
  adapted layers before it). The new statistics are written as the affine that follows each
  BatchNorm: `gamma' = gamma sigma / sigma'`, `beta' = beta + gamma (mu - mu') / sigma'`, exactly
  the same function, so a phone applies it as a patch and never changes its folded constants.
- `tent_params`: TENT (Wang et al., ICLR 2021), in the deployable form: starting from the BN
  adaptation above, a few Adam steps minimising the mean prediction entropy over the upload,
  updating only the BatchNorm affines (TENT's parameters), per device.
- `finetune_params`: the labelled baseline: Adam steps on the device's K labelled uploaded images,
  cross-entropy, every adaptive tensor.

Devices are batched (a device's K images are one contiguous group, `per_sample_call`); devices
never share gradients (Adam is elementwise, losses are per-device means summed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mntool.meta import per_sample_call
from mntool.vision.models import CNN

DEVICES_PER_BATCH = 32


@dataclass
class AdaptConfig:
    bn_priors: list[float] = field(default_factory=lambda: [0.0, 16.0, 64.0, 256.0, 1024.0])  # N, chosen on validation
    bn_prior: float = 16.0  # the chosen one (set by selection; used by generation)
    tent_steps: int = 10
    tent_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3])  # chosen on validation
    tent_lr: float = 3e-3
    finetune_steps: int = 20
    finetune_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])  # chosen on validation
    finetune_lr: float = 1e-2

    def to_dict(self) -> dict:
        return asdict(self)


def images_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32) / 255.0
    return x.reshape(-1, 1, 28, 28)


def static_params(model: CNN, n: int) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {
        name: params[name].detach().unsqueeze(0).repeat(n, *[1] * params[name].dim()) for name in model.adaptive_names()
    }


def _chunks(n: int):
    for i in range(0, n, DEVICES_PER_BATCH):
        yield slice(i, min(n, i + DEVICES_PER_BATCH))


@torch.no_grad()
def bn_stats_params(model: CNN, uploads: np.ndarray, prior: float) -> dict[str, torch.Tensor]:
    """Adaptive tensors (U, *shape) that make every BatchNorm use statistics re-estimated on each
    device's upload (U, K, 28, 28) under a prior of strength `prior` (module docstring)."""
    model.eval()
    U, K = uploads.shape[:2]
    out = {name: [] for name in model.adaptive_names()}
    params = dict(model.named_parameters())
    for sl in _chunks(U):
        n = sl.stop - sl.start
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        saved = []
        for bn, prefix in model.bn_affines():

            def forward(x, bn=bn, prefix=prefix, n=n, stats=stats):
                xg = x.reshape(n, K, *x.shape[1:])
                mu_b = xg.mean(dim=(1, 3, 4))  # (n, C)
                var_b = xg.var(dim=(1, 3, 4), unbiased=False)
                w = K / (prior + K)
                mu = (1 - w) * bn.running_mean + w * mu_b
                var = (1 - w) * bn.running_var + w * var_b
                stats[prefix] = (mu, var)
                return ((xg - mu[:, None, :, None, None]) / (var[:, None, :, None, None] + bn.eps).sqrt()).reshape(
                    x.shape
                )

            bn.forward = forward
            saved.append(bn)
        try:
            model(images_tensor(uploads[sl]))
        finally:
            for bn in saved:
                bn.__dict__.pop("forward", None)
        for bn, prefix in model.bn_affines():
            mu, var = stats[prefix]
            gamma, beta = params[f"{prefix}.weight"].detach(), params[f"{prefix}.bias"].detach()
            sigma, sigma_new = (bn.running_var + bn.eps).sqrt(), (var + bn.eps).sqrt()
            out[f"{prefix}.weight"].append(gamma * sigma / sigma_new)
            out[f"{prefix}.bias"].append(beta + gamma * (bn.running_mean - mu) / sigma_new)
        for name in ("head.weight", "head.bias"):
            out[name].append(params[name].detach().unsqueeze(0).repeat(n, *[1] * params[name].dim()))
    return {name: torch.cat(v) for name, v in out.items()}


def _optimise(model: CNN, start: dict, trainable: list[str], uploads, loss_fn, steps: int, lr: float) -> dict:
    """Per-device Adam on `trainable` tensors from `start`, `loss_fn(logits (n, K, classes), sl)` per device."""
    model.eval()
    model.requires_grad_(False)
    U, K = uploads.shape[:2]
    out = {name: [] for name in start}
    try:
        for sl in _chunks(U):
            params = {name: p[sl].clone().requires_grad_(name in trainable) for name, p in start.items()}
            x = images_tensor(uploads[sl])
            opt = torch.optim.Adam([params[n] for n in trainable], lr=lr)
            for _ in range(steps):
                logits = per_sample_call(model, params, (x,)).reshape(sl.stop - sl.start, K, -1)
                loss = loss_fn(logits, sl).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for name, p in params.items():
                out[name].append(p.detach())
    finally:
        model.requires_grad_(True)
    return {name: torch.cat(v) for name, v in out.items()}


def tent_params(model: CNN, uploads: np.ndarray, prior: float, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """TENT from the BN adaptation: entropy minimisation of the BatchNorm affines on the upload."""
    start = bn_stats_params(model, uploads, prior)
    affines = [n for n in model.adaptive_names() if not n.startswith("head.")]

    def entropy(logits, sl):
        logp = F.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp).sum(-1).mean(-1)  # (n,) mean entropy per device

    return _optimise(model, start, affines, uploads, entropy, steps, lr)


def finetune_params(
    model: CNN, uploads: np.ndarray, labels: np.ndarray, steps: int, lr: float
) -> dict[str, torch.Tensor]:
    """Fine-tuning of every adaptive tensor on the device's K labelled uploaded images."""
    y = torch.from_numpy(np.ascontiguousarray(labels)).to(torch.int64)

    def cross_entropy(logits, sl):
        return (
            F.cross_entropy(logits.flatten(0, 1), y[sl].reshape(-1), reduction="none")
            .reshape(logits.shape[:2])
            .mean(-1)
        )

    return _optimise(
        model, static_params(model, len(uploads)), model.adaptive_names(), uploads, cross_entropy, steps, lr
    )
