"""Early-exit CNNs (PersEPhonEE's device models): a trained CNN with small classifier heads after
intermediate blocks, cut into *stages* that compile to separate callables.

`EarlyExitCNN(backbone)` attaches one `ExitHead` (average pooling + a linear layer) after each cut
of `EXIT_PLANS[backbone.model_name]`; the backbone's own head is the last exit. Its output is
`(B, E, 10)`: every exit's logits (`final_logits` reads the last). The adaptive tensors are the
backbone's (BatchNorm affines + head) and every exit head's weight and bias, so a patch, a
MetaNetwork and the device-side exit trainer all reach the exits through the weight map.

`stages()` returns one module per stage for export (docs/early-exits.md): stage 0 reads
`images (B, 1, 28, 28)`, stage k > 0 the previous stage's `features`; each non-final stage returns
`(features, embedding, logits)` and the last `(embedding, logits)`, `embedding` being what its
exit's linear layer reads (the device-side trainer fits that layer on it). A stage shares its
modules (and their parameter names) with the whole model, so the adaptive tensors keep one name
from training to the weight map of the stage that holds them.

Cloud training of the exits (`train_exits`): PersEPhonEE's schedule, the backbone trained first and
then frozen (the deployed static model, BatchNorm statistics included), each exit head trained with
cross-entropy on the cloud period (equal weights), early stopping on the validation period's mean
per-device accuracy over the early exits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from device_runtime.errors import MntoolError
from mntool.vision.models import CNN, N_CLASSES, PIXEL_MEAN, PIXEL_STD


@dataclass(frozen=True)
class ExitPoint:
    after: int  # the exit reads the output of backbone.blocks[:after]
    pool: int  # average-pooling kernel (= stride) before the linear layer


# where each CNN's early exits sit, and how much their heads pool (docs/early-exits.md)
EXIT_PLANS: dict[str, tuple[ExitPoint, ...]] = {
    # blocks: conv5x5(16) pool | conv5x5(32) pool ; exits after each pooled block
    "lenet": (ExitPoint(after=2, pool=2), ExitPoint(after=4, pool=1)),  # 16x14x14 -> 784; 32x5x5 -> 800
    # blocks: stem | dw pw (16->32 s2) | dw pw (32->64 s2) | dw pw (64->64) | dw pw (64->96 s2)
    "mobilenet": (ExitPoint(after=3, pool=2), ExitPoint(after=5, pool=3)),  # 32x14x14 -> 1568; 64x7x7 -> 256
}
FEATURES, EMBEDDING, LOGITS = "features", "embedding", "logits"


def pooled(x: torch.Tensor, pool: int) -> torch.Tensor:
    """Average pooling (kernel = stride = `pool`), flattened: what an exit's linear layer reads."""
    return (F.avg_pool2d(x, pool) if pool > 1 else x).flatten(1)


class ExitHead(nn.Module):
    """Feature map (B, C, H, W) -> average pool (kernel = stride = `pool`) -> flatten -> linear."""

    def __init__(self, in_features: int, pool: int):
        super().__init__()
        self.pool_size = pool
        self.linear = nn.Linear(in_features, N_CLASSES)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return pooled(x, self.pool_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embed(x))


class EarlyExitCNN(nn.Module):
    """A CNN with early exits; output (B, E, 10), the backbone's head last."""

    def __init__(self, backbone: CNN, plan: tuple[ExitPoint, ...] | None = None):
        super().__init__()
        name = backbone.model_name
        if plan is None and name not in EXIT_PLANS:
            raise MntoolError(f"no early-exit plan for model {name!r}; plans exist for {', '.join(EXIT_PLANS)}")
        self.plan = tuple(plan or EXIT_PLANS[name])
        afters = [p.after for p in self.plan]
        if afters != sorted(set(afters)) or not 0 < afters[0] or afters[-1] > len(backbone.blocks):
            raise MntoolError(f"exit points {afters} must increase strictly within the {len(backbone.blocks)} blocks")
        self.backbone = backbone
        self.model_name = name
        self.config = backbone.config
        with torch.no_grad():
            x = torch.zeros(1, 1, 28, 28)
            sizes, lo = [], 0
            for p in self.plan:
                x = backbone.blocks[lo : p.after](x)
                lo = p.after
                sizes.append(pooled(x, p.pool).shape[1])
        self.exits = nn.ModuleList([ExitHead(n, p.pool) for n, p in zip(sizes, self.plan, strict=True)])

    # ---- what training, evaluation and export read --------------------------------------------
    @property
    def n_exits(self) -> int:
        return len(self.plan) + 1

    def adaptive_names(self) -> list[str]:
        """The backbone's adaptive tensors, then every early exit's weight and bias."""
        names = [f"backbone.{n}" for n in self.backbone.adaptive_names()]
        return names + [f"exits.{i}.linear.{p}" for i in range(len(self.exits)) for p in ("weight", "bias")]

    def exit_names(self, k: int) -> tuple[str, str]:
        """(weight, bias) names of exit k's linear layer (the last exit: the backbone's head)."""
        if k == len(self.exits):
            return "backbone.head.weight", "backbone.head.bias"
        return f"exits.{k}.linear.weight", f"exits.{k}.linear.bias"

    def bounds(self) -> list[tuple[int, int]]:
        """The backbone blocks [lo, hi) each stage runs."""
        cuts = [0] + [p.after for p in self.plan] + [len(self.backbone.blocks)]
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every exit, equally weighted."""
        return F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(logits.shape[1]))

    def final_logits(self, output: torch.Tensor) -> torch.Tensor:
        return output[:, -1]

    def run_stage(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Stage k: images (k = 0) or the previous stage's features -> (features,) embedding, logits."""
        if k == 0:
            x = (x - PIXEL_MEAN) / PIXEL_STD
        lo, hi = self.bounds()[k]
        x = self.backbone.blocks[lo:hi](x)
        if k < len(self.exits):
            embedding = self.exits[k].embed(x)
            return x, embedding, self.exits[k].linear(embedding)
        embedding = self.backbone.pool(x)
        return embedding, self.backbone.head(embedding)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dim() == 4 and images.shape[1:] == (1, 28, 28), (
            f"expected images (B, 1, 28, 28), got {tuple(images.shape)}"
        )
        out, x = [], images
        for k in range(self.n_exits):
            result = self.run_stage(k, x)
            out.append(result[-1])
            x = result[0]
        return torch.stack(out, dim=1)

    def stages(self) -> list[Stage]:
        """One module per stage: the first reads `images`, the others the previous stage's `features`
        (`prev_features`; the argument names are the compiled stages' input names)."""
        return [ImageStage(self, 0)] + [FeatureStage(self, k) for k in range(1, self.n_exits)]

    def stage_adaptive(self, k: int) -> list[str]:
        """The adaptive tensors stage k computes with (each tensor belongs to exactly one stage)."""
        lo, hi = self.bounds()[k]
        owned = {f"backbone.blocks.{i}." for i in range(lo, hi)}
        names = [n for n in self.adaptive_names() if any(n.startswith(p) for p in owned)]
        if k < len(self.exits):
            return names + list(self.exit_names(k))
        return names + [n for n in self.adaptive_names() if n.startswith("backbone.") and ".blocks." not in n]

    def stage_outputs(self, k: int) -> tuple[str, ...]:
        return (FEATURES, EMBEDDING, LOGITS) if k < len(self.exits) else (EMBEDDING, LOGITS)

    def stage_example(self, k: int, example: torch.Tensor) -> torch.Tensor:
        """Stage k's input for `example` images (what its export traces with)."""
        with torch.no_grad():
            x = example
            for j in range(k):
                x = self.run_stage(j, x)[0]
        return x


class Stage(nn.Module):
    """One stage of an `EarlyExitCNN` as a module of its own, for export. It registers the whole
    model's children under their own names (so its parameter names are the model's) and runs only
    its blocks and its exit."""

    def __init__(self, net: EarlyExitCNN, k: int):
        super().__init__()
        for name, child in net.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_net", net)  # not a child: named_parameters stays the model's
        self.k = k
        self.training = net.training  # not .train(): that would switch the shared children too

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._net.run_stage(self.k, x)


class ImageStage(Stage):
    """Stage 0: `images (B, 1, 28, 28)` in [0, 1]."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._net.run_stage(self.k, images)


class FeatureStage(Stage):
    """Stage k > 0: the previous stage's `features` (input `prev_features`: ONNX forbids an input
    and an output of one name)."""

    def forward(self, prev_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._net.run_stage(self.k, prev_features)


# ---- cloud training of the exits on a frozen backbone ------------------------------------------
def exit_accuracies(net: EarlyExitCNN, dataset, split: str, params: dict | None = None) -> list[float]:
    """Per-device mean accuracy of every exit on `split` (per-device adaptive tensors `params`)."""
    from mntool.vision.metrics import classification_metrics
    from mntool.vision.train import score_images

    rows = dataset.split(split)
    logits = score_images(net, rows.images, rows.device, params)  # (N, E, 10)
    return [
        classification_metrics(rows.device, rows.label, logits[:, k])["device_mean_accuracy"]
        for k in range(net.n_exits)
    ]


def train_exits(
    backbone: CNN, dataset, *, epochs: int = 15, patience: int = 3, lr: float = 2e-3, batch_size: int = 256, seed=0
) -> tuple[EarlyExitCNN, dict]:
    """Attach exits to a trained `backbone` and train only their heads (backbone frozen, eval mode)."""
    from mntool.vision import adapt

    torch.manual_seed(seed)
    net = EarlyExitCNN(backbone)
    net.backbone.requires_grad_(False)
    opt = torch.optim.Adam(net.exits.parameters(), lr=lr)
    train = dataset.train
    rng = np.random.default_rng(seed)
    best, bad, log, best_state = -1.0, 0, [], None
    for epoch in range(1, epochs + 1):
        t0, losses = time.perf_counter(), []
        net.eval()  # BatchNorm statistics are the deployed model's
        order = rng.permutation(len(train))
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            x = adapt.images_tensor(train.images[rows])
            out = net(x)[:, :-1]
            loss = F.cross_entropy(
                out.flatten(0, 1), torch.from_numpy(train.label[rows]).repeat_interleave(len(net.exits))
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        valid = exit_accuracies(net, dataset, "valid")
        score = float(np.mean(valid[:-1]))
        log.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "valid_exit_accuracy": valid,
                "seconds": time.perf_counter() - t0,
            }
        )
        if score > best:
            best, bad = score, 0
            best_state = {k: v.detach().clone() for k, v in net.exits.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    net.exits.load_state_dict(best_state)
    net.backbone.requires_grad_(True)
    net.eval()
    best_epoch = max(log, key=lambda e: np.mean(e["valid_exit_accuracy"][:-1]))["epoch"]
    return net, {"epochs": log, "best_epoch": best_epoch}
