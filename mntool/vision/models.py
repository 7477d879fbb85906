"""Phone-sized image classifiers, with adaptive tensors inside the feature extractor.

Every CNN maps `images (B, 1, 28, 28) float32` in [0, 1] to `logits (B, 10)`. Each convolution is
followed by BatchNorm *without* its own affine and then a `ChannelAffine` (per-channel scale and
shift): together they are exactly a BatchNorm, but its affine is a module of its own, so that

- the affines (and the classifier head) are the *adaptive parameters* MetaNetwork generates, TENT
  optimises and a patch carries (`adaptive_names()`);
- re-estimating BatchNorm statistics on a device (BN adaptation) is itself a patch of those
  affines (`mntool.vision.adapt.bn_stats_patch`): a phone-side model never changes its folded
  normalisation constants;
- the exporters keep each affine a swappable buffer: it owns its tensors, so the converters'
  fencing of adaptive modules (TFLite's optimization barrier) stops BatchNorm/scale folding at it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from device_runtime.errors import MntoolError
from mntool.meta import GroupedParameters

N_CLASSES = 10
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081  # MNIST's own; the model normalises internally


@dataclass
class CNNConfig:
    width: int = 16  # channels of the first block; later blocks are multiples of it
    hidden: int = 128  # LeNet: width of the fully connected layer before the head

    def to_dict(self) -> dict:
        return asdict(self)


class ChannelAffine(nn.Module, GroupedParameters):
    """`x * weight[c] + bias[c]` over the channels of (B, C, H, W): a BatchNorm's affine."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def grouped_forward(self, params: dict[str, torch.Tensor]):
        weight, bias = params.get("weight"), params.get("bias")
        U = (weight if weight is not None else bias).shape[0]
        weight = self.weight.expand(U, -1) if weight is None else weight
        bias = self.bias.expand(U, -1) if bias is None else bias

        def forward(x: torch.Tensor) -> torch.Tensor:
            assert x.shape[0] % U == 0, f"{x.shape[0]} rows do not split into {U} parameter groups"
            xg = x.reshape(U, -1, *x.shape[1:])  # (U, rows per group, C, H, W)
            return (xg * weight[:, None, :, None, None] + bias[:, None, :, None, None]).reshape(x.shape)

        return forward


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (statistics only) -> ChannelAffine -> activation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1, act=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, affine=False)
        self.affine = ChannelAffine(cout)
        self.act = act or nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.affine(self.bn(self.conv(x))))


class CNN(nn.Module):
    """Shared parts: input normalisation, a feature extractor (`blocks`), a linear classifier head."""

    model_name = "cnn"

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config

    def adaptive_names(self) -> list[str]:
        """Every BatchNorm affine, and the classifier head."""
        names = [n for n, _ in self.named_parameters() if ".affine." in f".{n}"]
        return names + ["head.weight", "head.bias"]

    def bn_affines(self) -> list[tuple[nn.BatchNorm2d, str]]:
        """(BatchNorm, name prefix of the ChannelAffine that follows it) for every ConvBN."""
        return [(m.bn, f"{n}.affine") for n, m in self.named_modules() if isinstance(m, ConvBN)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> the vector the head reads."""
        return self.pool(self.blocks(x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's feature map -> the vector the head reads."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of this model's output (an early-exit model weighs its exits)."""
        return F.cross_entropy(logits, labels)

    def final_logits(self, output: torch.Tensor) -> torch.Tensor:
        """The (B, 10) logits a prediction reads from this model's output."""
        return output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dim() == 4 and images.shape[1:] == (1, 28, 28), (
            f"expected images (B, 1, 28, 28), got {tuple(images.shape)}"
        )
        return self.head(self.features((images - PIXEL_MEAN) / PIXEL_STD))


class LeNet(CNN):
    """LeNet-5 style: two 5x5 conv blocks with max pooling, one hidden fully connected layer."""

    model_name = "lenet"

    def __init__(self, config: CNNConfig):
        super().__init__(config)
        w = config.width
        self.blocks = nn.Sequential(
            ConvBN(1, w, 5, padding=2), nn.MaxPool2d(2), ConvBN(w, 2 * w, 5), nn.MaxPool2d(2)
        )  # 28 -> 14 -> 10 -> 5
        self.fc = nn.Linear(2 * w * 25, config.hidden)
        self.head = nn.Linear(config.hidden, N_CLASSES)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x.flatten(1)))


class MobileNet(CNN):
    """MobileNet-style: a 3x3 stem, then depthwise-separable blocks (3x3 depthwise, 1x1
    pointwise, each with BatchNorm and ReLU6), global average pooling, a linear head."""

    model_name = "mobilenet"

    def __init__(self, config: CNNConfig):
        super().__init__(config)
        w = config.width
        plan = [(w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 6 * w, 2)]  # 28 -> 14 -> 7 -> 7 -> 4
        layers = [ConvBN(1, w, 3, padding=1, act=nn.ReLU6())]
        for cin, cout, stride in plan:
            layers.append(ConvBN(cin, cin, 3, stride, padding=1, groups=cin, act=nn.ReLU6()))
            layers.append(ConvBN(cin, cout, 1, act=nn.ReLU6()))
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(6 * w, N_CLASSES)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


CNNS: dict[str, type[CNN]] = {"lenet": LeNet, "mobilenet": MobileNet}


def build_cnn(name: str, config: CNNConfig | None = None) -> CNN:
    """Build a CNN by name (`lenet`, `mobilenet`)."""
    if name not in CNNS:
        raise MntoolError(f"unknown model {name!r}; choose one of {', '.join(CNNS)}")
    return CNNS[name](config or CNNConfig())
