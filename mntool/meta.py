"""MetaNetwork, task-agnostic: a MetaGenerator and a MetaStabilizer around any `nn.Module`.

Given a backbone and the names of its adaptive parameters, the MetaGenerator encodes a device's
recent samples (through a pluggable encoder) into a condition vector and emits a low-rank residual
for every adaptive tensor; the MetaStabilizer turns residuals into parameters
`theta = theta_static + bound * tanh(gate) * rms(theta_static) * residual / max(1, rms(residual))`, with the gate
starting at zero so training starts exactly from the static model, and keeps an EMA copy of the
generator for evaluation and generation. `per_sample_call` runs the backbone with a different set
of adaptive parameters for every row of a batch, without a Python loop over samples; in training,
adaptive `nn.Linear` weights stay factored (`LowRank`: static + A @ B per device, applied as
`x W^T + (x B^T) A^T`), so no device's full matrix is ever built. Nothing here knows about
recommendation; `RecentItemsEncoder` at the bottom is the encoder our recommenders use.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap


@dataclass
class MetaConfig:
    cond_dim: int = 32  # size of the condition vector the encoder produces
    rank: int = 4  # rank of each generated 2-D residual (factorised heads keep the generator small)
    gate: bool = True  # stabilizer: zero-initialised, bounded gate on a normalised residual
    bound: float = 1.0  # stabilizer: max |residual| per element, in units of the static tensor's RMS
    ema: bool = True  # stabilizer: evaluate and generate with an exponential moving average
    ema_decay: float = 0.995  # stabilizer: EMA decay per optimisation step
    scale_floor: float = 0.0  # stabilizer: a residual's scale is max(rms(static), scale_floor), so a tensor
    # that trains to near zero (a classifier's bias) can still move by up to `bound * scale_floor`

    @property
    def stabilizer(self) -> bool:
        return self.gate or self.ema

    def to_dict(self) -> dict:
        return asdict(self)


# ---- running a module with per-sample parameters ------------------------------------------------
class LowRank(NamedTuple):
    """Per-device matrices kept factored: W_u = static + left[u] @ right[u].

    static (out, in), left (U, out, r), right (U, r, in). `materialise()` builds the (U, out, in)
    stack; a Linear layer applies it without doing so (`_batched_linear_forward`)."""

    static: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    def materialise(self) -> torch.Tensor:
        return self.static.unsqueeze(0) + torch.bmm(self.left, self.right)


def _batched_linear_forward(weight: torch.Tensor | LowRank, bias: torch.Tensor | None):
    """forward() for an nn.Linear whose weight is (U, out, in) (one bmm) or a `LowRank`
    (`x W^T` for all rows in one matmul, plus `(x B^T) A^T` per group: two thin bmm's), and bias
    (U, out) or None.

    The input's rows (B, ..., in) come in U contiguous equal groups; group u uses set u."""
    U = weight.left.shape[0] if isinstance(weight, LowRank) else weight.shape[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] % U == 0, f"{x.shape[0]} rows do not split into {U} parameter groups"
        xg = x.reshape(U, -1, x.shape[-1])  # (U, rows per group, in)
        if isinstance(weight, LowRank):
            y = F.linear(xg, weight.static) + torch.bmm(
                torch.bmm(xg, weight.right.transpose(1, 2)), weight.left.transpose(1, 2)
            )
        else:
            y = torch.bmm(xg, weight.transpose(1, 2))  # (U, rows per group, out)
        if bias is not None:
            y = y + bias.unsqueeze(1)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward


class GroupedParameters:
    """Mixin for a module that runs one parameter set per group of input rows itself.

    `grouped_forward(params)` gets `{leaf name: (U, *shape)}` for some of the module's own
    parameters (the others stay static) and returns a forward() for inputs whose rows come in U
    contiguous equal groups, group u using set u. `per_sample_call` uses it instead of `vmap`, so
    such a module may sit anywhere in a backbone (e.g. a per-channel affine inside a CNN, with
    BatchNorm around it in training mode, which `vmap` cannot run)."""

    def grouped_forward(self, params: dict[str, torch.Tensor]):
        raise NotImplementedError


def _grouped_owners(module: nn.Module, names: list[str]) -> dict[str, nn.Module] | None:
    """Map each adaptive name's owning module path -> module when every owner runs grouped
    parameters natively (an `nn.Linear` weight/bias, or a `GroupedParameters` module), else None
    (then the generic vmap path is used)."""
    owners: dict[str, nn.Module] = {}
    modules = dict(module.named_modules())
    for name in names:
        path, _, leaf = name.rpartition(".")
        owner = modules.get(path)
        linear = isinstance(owner, nn.Linear) and leaf in ("weight", "bias")
        if not (linear or isinstance(owner, GroupedParameters)):
            return None
        owners[path] = owner
    return owners


def _linear_grouped_forward(lin: nn.Linear, weight, bias):
    B = weight.left.shape[0] if isinstance(weight, LowRank) else (weight if weight is not None else bias).shape[0]
    if weight is None:
        weight = lin.weight.unsqueeze(0).expand(B, *lin.weight.shape)
    if bias is None and lin.bias is not None:
        bias = lin.bias.unsqueeze(0).expand(B, *lin.bias.shape)
    return _batched_linear_forward(weight, bias)


@contextlib.contextmanager
def _patched_owners(owners: dict[str, nn.Module], params: dict[str, torch.Tensor]):
    try:
        for path, owner in owners.items():
            own = {name.rpartition(".")[2]: p for name, p in params.items() if name.rpartition(".")[0] == path}
            if isinstance(owner, GroupedParameters):
                owner.forward = owner.grouped_forward(own)  # instance attribute shadows the method
            else:
                owner.forward = _linear_grouped_forward(owner, own.get("weight"), own.get("bias"))
        yield
    finally:
        for owner in owners.values():
            owner.__dict__.pop("forward", None)


def per_sample_call(
    module: nn.Module, params: dict[str, torch.Tensor | LowRank], args: tuple, index: torch.Tensor | None = None
) -> torch.Tensor:
    """`module(*args)` where input row b uses parameter set `index[b]` of each given (adaptive)
    parameter, `params[name]` being (U, *shape): one set per *device* (or a `LowRank`, for the
    weight of an `nn.Linear`).

    Without `index`, the B input rows come in U contiguous groups of B / U rows, group u using set
    u: the cheap layout (a batch of a few devices' rows is run without copying any parameter per
    row). With `index`, sets are gathered per row first. Adaptive tensors owned by `nn.Linear`
    layers (the common case: heads) run as batched matmuls, those of `GroupedParameters` modules
    through their own `grouped_forward`; anything else falls back to `torch.func.vmap` over
    `functional_call`.
    """
    owners = _grouped_owners(module, list(params))
    if owners is None or index is not None:
        params = {n: p.materialise() if isinstance(p, LowRank) else p for n, p in params.items()}
    if index is not None:
        params = {n: p.index_select(0, index) for n, p in params.items()}  # (B, *shape)
    if owners is not None:
        with _patched_owners(owners, params):
            return module(*args)
    group = args[0].shape[0] // next(iter(params.values())).shape[0]
    if group > 1:
        params = {n: p.repeat_interleave(group, dim=0) for n, p in params.items()}

    def one(p, *a):
        return functional_call(module, p, tuple(x.unsqueeze(0) for x in a)).squeeze(0)

    return vmap(one)(params, *args)


# ---- the generator -----------------------------------------------------------------------------
class LowRankHead(nn.Module):
    """Condition (B, c) -> residual of one adaptive tensor.

    A tensor of shape (n0, n1, ...) is viewed as a matrix (n0, n1*...) and generated as
    `A(c) @ B(c) / sqrt(rank)` with A (n0, r), B (r, m): (n0 + m) * r * c weights instead of the
    n0 * m * c of a plain linear map (the DUET reference's choice). 1-D tensors are a linear map.
    """

    def __init__(self, shape: tuple[int, ...], cond_dim: int, rank: int):
        super().__init__()
        self.shape = tuple(shape)
        self.rows = shape[0] if len(shape) >= 2 else 0
        self.cols = int(torch.tensor(shape[1:]).prod()) if len(shape) >= 2 else 0
        self.rank = rank
        if self.rows:
            self.left = nn.Linear(cond_dim, self.rows * rank)
            self.right = nn.Linear(cond_dim, rank * self.cols)
        else:
            self.vector = nn.Linear(cond_dim, int(torch.tensor(shape).prod()))

    def factors(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A / sqrt(rank) (B, n0, r), B (B, r, m)) of a matrix-shaped tensor's residual."""
        B = c.shape[0]
        a = self.left(c).view(B, self.rows, self.rank) * self.rank**-0.5
        return a, self.right(c).view(B, self.rank, self.cols)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        B = c.shape[0]
        if not self.rows:
            return self.vector(c).view(B, *self.shape)
        return torch.bmm(*self.factors(c)).view(B, *self.shape)


class MetaGenerator(nn.Module):
    """Recent samples -> condition vector (pluggable encoder) -> one residual per adaptive tensor."""

    def __init__(self, encoder: nn.Module, shapes: dict[str, tuple[int, ...]], config: MetaConfig):
        super().__init__()
        self.encoder = encoder
        self.names = list(shapes)
        # ModuleDict keys cannot contain dots
        self.heads = nn.ModuleDict(
            {n.replace(".", "__"): LowRankHead(s, config.cond_dim, config.rank) for n, s in shapes.items()}
        )

    def forward(self, *condition_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.encoder(*condition_inputs)  # (B, cond_dim)
        return {n: self.heads[n.replace(".", "__")](c) for n in self.names}

    def factored(self, *condition_inputs: torch.Tensor) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Like forward(), but 2-D residuals stay as their (A, B) factors."""
        c = self.encoder(*condition_inputs)
        heads = {n: self.heads[n.replace(".", "__")] for n in self.names}
        return {n: h.factors(c) if h.rows and len(h.shape) == 2 else h(c) for n, h in heads.items()}


class MetaStabilizer(nn.Module):
    """Keeps generated parameters close to, and starting from, the static ones.

    Per tensor k and device: theta_k = static_k + bound * tanh(g_k) * rms(static_k) * r_k,
    r_k = residual_k / max(1, rms(residual_k)).
    - g_k starts at 0, so the first forward pass is exactly the static model;
    - r_k has RMS <= 1 and the static RMS scales it to the tensor's own magnitude. (An elementwise
      tanh saturated here: with the gate small, Adam pushes the residual far out, tanh flattens
      every device to the same +-1 pattern and its gradient vanishes; measured across-device std
      of generated weights 0.0002 against a static RMS of 0.24.)
    - rms(theta_k - static_k) <= bound * max(rms(static_k), scale_floor) for every device: the
      generator cannot blow a device's model up. (`scale_floor`, 0 by default, lets a tensor that
      trained to near zero, such as a classifier's bias, move at all: the image task sets it.)
    Without the gate (ablation) theta_k = static_k + residual_k.
    """

    def __init__(self, names: list[str], config: MetaConfig):
        super().__init__()
        self.names = list(names)
        self.config = config
        self.gates = nn.Parameter(torch.zeros(len(names))) if config.gate else None

    def _coefficient(self, i: int, static: torch.Tensor, residual_ms: torch.Tensor) -> torch.Tensor:
        """(B,) factor of tensor i's residual from its mean square per device (a constant to autograd, as before)."""
        scale = static.detach().pow(2).mean().sqrt().clamp_min(max(1e-6, self.config.scale_floor))
        return self.config.bound * torch.tanh(self.gates[i]) * scale / residual_ms.sqrt().clamp_min(1.0)

    def _full(self, i: int, static: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.gates is None:
            return static.unsqueeze(0) + r
        coef = self._coefficient(i, static, r.detach().flatten(1).pow(2).mean(1))
        return static.unsqueeze(0) + coef.view(-1, *[1] * (r.dim() - 1)) * r

    def forward(self, static: dict[str, torch.Tensor], residual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self._full(i, static[n], residual[n]) for i, n in enumerate(self.names)}

    def factored(self, static: dict[str, torch.Tensor], residual: dict) -> dict[str, torch.Tensor | LowRank]:
        """forward() for residuals from `MetaGenerator.factored`: a matrix's (A, B) becomes a
        `LowRank` with the same value (its mean square from the r x r Gram matrices, never the full
        product); other tensors as in forward()."""
        out = {}
        for i, n in enumerate(self.names):
            if not isinstance(residual[n], tuple):
                out[n] = self._full(i, static[n], residual[n])
                continue
            a, b = residual[n]
            if self.gates is not None:
                with torch.no_grad():  # ||A B||_F^2 = sum((A^T A) * (B B^T))
                    ms = (torch.bmm(a.transpose(1, 2), a) * torch.bmm(b, b.transpose(1, 2))).sum((1, 2)) / (
                        a.shape[1] * b.shape[2]
                    )
                a = a * self._coefficient(i, static[n], ms).view(-1, 1, 1)
            out[n] = LowRank(static[n], a, b)
        return out


class MetaNetwork(nn.Module):
    """Backbone + MetaGenerator + MetaStabilizer.

    `forward(inputs, condition, index)` runs the backbone on `inputs` with adaptive parameters
    generated from `condition` (one set per device row, gathered per input row by `index`). With `config.ema`, `ema_generator` / `ema_stabilizer` hold
    the running averages that `adaptive_params(..., use_ema=True)` uses.
    """

    def __init__(self, backbone: nn.Module, adaptive: list[str], encoder: nn.Module, config: MetaConfig):
        super().__init__()
        params = dict(backbone.named_parameters())
        missing = [n for n in adaptive if n not in params]
        assert not missing, f"adaptive parameters not in the backbone: {missing}"
        self.backbone = backbone
        self.adaptive = list(adaptive)
        self.config = config
        shapes = {n: tuple(params[n].shape) for n in adaptive}
        self.generator = MetaGenerator(encoder, shapes, config)
        self.stabilizer = MetaStabilizer(self.adaptive, config)
        if config.ema:
            # Averaged copies of the generator (its encoder's embedding table included) and gates;
            # the backbone itself is trained and used as is.
            self.ema_generator = copy.deepcopy(self.generator).requires_grad_(False)
            self.ema_stabilizer = copy.deepcopy(self.stabilizer).requires_grad_(False)

    def static_params(self) -> dict[str, torch.Tensor]:
        params = dict(self.backbone.named_parameters())
        return {n: params[n] for n in self.adaptive}

    def adaptive_params(self, *condition: torch.Tensor, use_ema: bool = False) -> dict[str, torch.Tensor]:
        """Generated adaptive parameters, (B, *shape) each, one set per condition row."""
        generator, stabilizer = self._parts(use_ema)
        return stabilizer(self.static_params(), generator(*condition))

    def _parts(self, use_ema: bool) -> tuple[MetaGenerator, MetaStabilizer]:
        return (
            (self.ema_generator, self.ema_stabilizer)
            if use_ema and self.config.ema
            else (self.generator, self.stabilizer)
        )

    def forward(
        self, inputs: tuple, condition: tuple, index: torch.Tensor | None = None, use_ema: bool = False
    ) -> torch.Tensor:
        """Backbone output on `inputs` (B rows); `condition` holds U device rows and `index` (B,)
        the device of each input row (default: U contiguous equal groups of rows). Matrices stay
        factored (`LowRank`) on the way: the same values as `adaptive_params`, built at rank cost."""
        generator, stabilizer = self._parts(use_ema)
        params = stabilizer.factored(self.static_params(), generator.factored(*condition))
        return per_sample_call(self.backbone, params, inputs, index)

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step of the generator and stabilizer weights (call after each optimiser step)."""
        if not self.config.ema:
            return
        d = self.config.ema_decay
        for live, avg in ((self.generator, self.ema_generator), (self.stabilizer, self.ema_stabilizer)):
            for p_avg, p_live in zip(avg.parameters(), live.parameters()):
                p_avg.lerp_(p_live, 1 - d)

    def generator_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the generator and stabilizer (not the backbone's)."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        own = list(self.generator.parameters()) + list(self.stabilizer.parameters())
        return [p for p in own if id(p) not in backbone_ids]


# ---- the encoder our recommenders use -------------------------------------------------------------
class RecentItemsEncoder(nn.Module):
    """A device's recent items (B, R) -> condition vector (B, cond_dim).

    Reads the backbone's own item embeddings (shared, so the generator speaks the backbone's
    language) with learned position embeddings, pools them two ways (masked mean and attention
    pooling, so both the long-run taste and a few salient items can drive the parameters), and
    maps the result through a small MLP. Padding (id 0) is masked out.
    """

    def __init__(self, item_embedding: nn.Embedding, max_recent: int, cond_dim: int):
        super().__init__()
        d = item_embedding.embedding_dim
        self.item_embedding = item_embedding
        self.position = nn.Parameter(torch.zeros(max_recent, d))
        self.score = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1))
        self.mlp = nn.Sequential(
            nn.Linear(2 * d, cond_dim), nn.ReLU(), nn.Linear(cond_dim, cond_dim), nn.LayerNorm(cond_dim)
        )

    def forward(self, recent: torch.Tensor) -> torch.Tensor:
        R = recent.shape[1]
        assert R <= self.position.shape[0], f"{R} recent items > max_recent {self.position.shape[0]}"
        mask = (recent != 0).to(torch.float32)  # (B, R)
        e = self.item_embedding(recent)  # (B, R, d)
        mean = (e * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)  # (B, d)
        logits = self.score(e + self.position[-R:]).squeeze(-1) + (1 - mask) * -1e9  # (B, R)
        att = (F.softmax(logits, dim=1) * mask)[..., None]  # all-padding rows pool to zero
        return self.mlp(torch.cat([mean, (att * e).sum(1)], dim=-1))  # (B, cond_dim)
