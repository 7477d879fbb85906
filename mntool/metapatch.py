"""MetaPatch (DCCL, Yao et al., KDD 2021): patches in a frozen device model whose parameters are a
function of shared cloud parameters and one small per-device vector z (the "metapatch").

Two patches sit in every recommender backbone (`mntool.models.Backbone`) built with
`BackboneConfig.metapatch_dim > 0`:

- the **user patch**, after the sequence encoder, on the user representation u (d):
  `u' = u + W_u(z) relu(A_u u + b_u)`;
- the **head patch**, in the scoring head, on the hidden pre-activation h (head_hidden) of its first
  layer: `h' = h * (1 + W_h(z) relu(A_h u' + b_h))`, a per-unit gain computed from u' and z (once per
  history, not per candidate).

Each generated matrix is `W(z) = reshape(P z, (out, r))`: P (r, out, D) and the bottleneck A, b are
shared (learned in the cloud, constants of the compiled model), z (D,) is the only adaptive tensor
(`metapatch.z`). z = 0 gives W = 0, so both patches are the identity and the patched model is the
base model exactly (bit for bit). The cloud phase (`train_metapatch`) learns P, A, b together with
one z per cloud-period user (an embedding table), the base backbone frozen; the checkpoint keeps
the mean of those z's as its `metapatch.z`. The device phase is `mntool.train.finetune_device_params`
on this model: a metapatch model's only adaptive tensor is z, so exactly z is trained per device, on
exactly fine-tuning's data and step budget.

Two forms of the same function: in a plain forward (z a (D,) parameter: what the exporters trace)
z is contracted *last*, with an input-dependent tensor (`(a @ P) @ z`), so no converter can fold
P z into one constant and lose z; with one z per row group (`per_sample_call`: training, scoring,
the device phase) W(z) is built once per group and applied as a batched matmul.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from device_runtime.errors import MntoolError
from mntool.meta import GroupedParameters

ADAPTIVE = "metapatch.z"  # the one adaptive tensor of a metapatch model
MIN_DIM = 10  # Core ML writes constants under 10 elements inline in model.mlmodel (see MetaPatchDimTooSmall)


class MetaPatchDimTooSmall(MntoolError):
    """z must have at least MIN_DIM elements: coremltools stores smaller constants inline in
    model.mlmodel, not as a weight.bin blob a patch can address. (mntool's Core ML exporter moves
    inline adaptive constants into weight.bin, and a D = 8 z exported that way reads back exactly
    on Linux, but that is a package coremltools itself never writes, and whether the Core ML
    runtime accepts it is unverified off macOS; the head's last layer has no bias for the same
    reason.) Refused when the configuration or the model is built, before any training."""


def check_dim(dim: int) -> None:
    if dim < MIN_DIM:
        raise MetaPatchDimTooSmall(
            f"metapatch dim {dim} < {MIN_DIM}: Core ML stores constants under {MIN_DIM} elements inline, "
            "where no patch can reach them; use --metapatch-dim >= 10"
        )


@dataclass
class MetaPatchConfig:
    dim: int = 32  # D: the per-device vector z, the only adaptive tensor (>= 10, see MetaPatchDimTooSmall)
    rank: int = 8  # r: bottleneck width of each patch
    lr: float = 2e-3  # cloud phase: Adam on the shared patch parameters (P, A, b)
    z_lr: float = 1e-2  # cloud phase: SparseAdam on the per-user z table (only the batch's users move)

    def __post_init__(self) -> None:
        check_dim(self.dim)
        if self.rank < 1:
            raise MntoolError(f"metapatch rank must be >= 1 (got {self.rank})")

    def to_dict(self) -> dict:
        return asdict(self)


class ZBottleneck(nn.Module):
    """x (..., n_in) -> W(z) relu(A x + b) (..., n_out), W(z) = reshape(P z, (n_out, r)).

    `forward(x, z)`: z is (D,) (one model: the exported form, z contracted last with the
    input-dependent `relu(A x + b) @ P`), or (G, D) with x's rows in G contiguous equal groups
    (one z each: W(z) built once per group, then a batched matmul)."""

    def __init__(self, n_in: int, n_out: int, rank: int, dim: int):
        super().__init__()
        self.n_out, self.rank, self.dim = n_out, rank, dim
        self.down = nn.Linear(n_in, rank)
        # std 1/sqrt(r D): a unit-RMS z moves the output by about the bottleneck activation's RMS
        self.P = nn.Parameter(torch.randn(rank, n_out, dim) * (rank * dim) ** -0.5)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.down(x))  # (..., r)
        if z.dim() == 1:
            s = (a @ self.P.reshape(self.rank, self.n_out * self.dim)).unflatten(-1, (self.n_out, self.dim))
            # (..., n_out): z meets only input-dependent values, so no converter can fold it away;
            # a multiply-and-sum, not a matmul, because coremltools turns a matmul with a constant into
            # a linear with a transposed copy of it per use (two patches: z stored twice)
            return (s * z).sum(-1)
        G = z.shape[0]  # row groups: x's rows come in G contiguous equal groups, group g using z[g]
        assert a.shape[0] % G == 0, f"{a.shape[0]} rows do not split into {G} metapatch groups"
        W = _generate(self.P, z)  # (G, n_out, r)
        y = torch.bmm(a.reshape(G, -1, self.rank), W.transpose(1, 2))  # (G, rows per group, n_out)
        return y.reshape(*a.shape[:-1], self.n_out)


def _generate(P: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """W = reshape(P z) per group: P (r, n, D), z (G, D) -> (G, n, r)."""
    return torch.einsum("rnd,gd->gnr", P, z)


class MetaPatches(GroupedParameters, nn.Module):
    """The patches of one backbone and their metapatch z (`metapatch.z`, (D,)).

    `forward(x)` is "the z of these rows": z itself in a plain forward, or each row group's z when
    `per_sample_call` runs the model with one z per device (`grouped_forward`). The backbone calls
    it once and hands the result to `user_patch` and `head_gain`. `spread` (a buffer, not exported:
    no op reads it) is the RMS of the cloud users' z around their mean, which a MetaNetwork on this
    model uses as its residual scale."""

    def __init__(self, user_dim: int, head_hidden: int, dim: int, rank: int):
        super().__init__()
        check_dim(dim)
        self.dim = dim
        self.z = nn.Parameter(torch.zeros(dim))
        self.user = ZBottleneck(user_dim, user_dim, rank, dim)
        self.head = ZBottleneck(user_dim, head_hidden, rank, dim)
        self.register_buffer("spread", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z

    def grouped_forward(self, params: dict[str, torch.Tensor]):
        z = params["z"]  # (U, D)

        def forward(x: torch.Tensor) -> torch.Tensor:
            assert x.shape[0] % z.shape[0] == 0, f"{x.shape[0]} rows do not split into {z.shape[0]} metapatch groups"
            return z  # (U, D): the patches build W(z) once per group and apply it to the group's rows

        return forward

    def user_patch(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """u (B, d) or (B, C, d) -> u + W_u(z) relu(A_u u + b_u)."""
        return u + self.user(u, z)

    def head_gain(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The head patch's gain offset W_h(z) relu(A_h u + b_h): (B, hidden) or (B, C, hidden)."""
        return self.head(u, z)


def attach(base: nn.Module, config: MetaPatchConfig, seed: int) -> nn.Module:
    """A copy of the backbone `base` with metapatches: base weights as given, patches freshly
    initialised (seeded), z = 0, so it computes exactly what `base` does."""
    from dataclasses import replace

    from mntool.models import build_model

    cfg = replace(base.config, metapatch_dim=config.dim, metapatch_rank=config.rank)
    torch.manual_seed(seed)
    model = build_model(base.model_name, base.n_items, cfg)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("metapatch.") for k in missing), (missing, unexpected)
    return model.eval()


# ---- the cloud phase ------------------------------------------------------------------------------
class CloudMetaPatch(nn.Module):
    """A metapatch model and one z per user (an embedding table, rows of cloud-period users
    learned, zero-initialised: the start is the base model) for the cloud phase."""

    def __init__(self, model: nn.Module, n_users: int):
        super().__init__()
        self.model = model
        self.z_table = nn.Embedding(n_users, model.metapatch.dim, sparse=True)
        nn.init.zeros_(self.z_table.weight)

    def forward(self, history: torch.Tensor, target: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """Logits of rows (history (G, L), target (G,) or (G, C)), row g with user users[g]'s z."""
        from mntool.meta import per_sample_call

        return per_sample_call(self.model, {ADAPTIVE: self.z_table(users)}, (history, target))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if n.startswith("metapatch.") and n != ADAPTIVE]


def train_metapatch(dataset, cfg, model: nn.Module, progress: bool = True) -> tuple[nn.Module, dict]:
    """The cloud phase: Adam on the shared patch parameters and SparseAdam on a z per cloud-period
    user, BCE on the cloud period's samples (each group with its user's z), the base backbone
    frozen. Epochs are selected on validation UAUC with every device scored with its own cloud z
    (a cheap proxy of the device phase; the untouched start, z = 0, i.e. the base model, competes
    as epoch 0). Afterwards the model's `metapatch.z` is the mean z of the cloud users (where the
    device phase starts) and `metapatch.spread` the RMS of their z around it."""
    from mntool.train import DeviceParams, _fit_loop, _Prober, _seed_everything, group_inputs

    _seed_everything(cfg.seed + 3)
    cloud = CloudMetaPatch(model, dataset.n_users)
    shared = {id(p) for p in cloud.shared_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in shared)
    opt = torch.optim.Adam(cloud.shared_parameters(), lr=cfg.metapatch.lr)
    z_opt = torch.optim.SparseAdam([cloud.z_table.weight], lr=cfg.metapatch.z_lr)
    rows, group = dataset.train, dataset.config.n_negatives + 1
    devices = np.sort(dataset.device_users)

    def step_fn(idx: np.ndarray) -> float:
        history, target, label = group_inputs(rows, idx, group)
        users = torch.from_numpy(rows.user[idx[::group]])
        loss = F.binary_cross_entropy_with_logits(cloud(history, target, users), label)
        opt.zero_grad(set_to_none=True)
        z_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        z_opt.step()
        return loss.item()

    def params_fn() -> DeviceParams:
        return DeviceParams(devices, {ADAPTIVE: cloud.z_table.weight.detach()[torch.from_numpy(devices)].clone()})

    try:
        log = _fit_loop(
            dataset,
            cfg,
            cloud,
            step_fn,
            params_fn,
            _Prober(dataset, cfg.probe_users, cfg.seed),
            cfg.epochs,
            progress,
            "metapatch",
            backbone=model,
            start_is_candidate=True,
        )
    finally:
        model.requires_grad_(True)
    cloud_users = np.unique(rows.user)
    z = cloud.z_table.weight.detach()[torch.from_numpy(cloud_users)]
    mean = z.mean(0)
    spread = (z - mean).pow(2).mean().sqrt()
    with torch.no_grad():
        model.metapatch.z.copy_(mean)
        model.metapatch.spread.fill_(spread)
    log["cloud_z"] = {
        "users": len(cloud_users),
        "mean_rms": float(mean.pow(2).mean().sqrt()),
        "spread_rms": float(spread),
    }
    return model.eval(), log
