"""Device backbones: GRU4Rec, SASRec and DIN, each ending in the same adaptive scoring head.

Every backbone maps a click history and a target item to one logit:
`forward(history (B, L) int64, target (B,) int64) -> (B,) float`. Item id 0 is padding
(histories are left-padded, most recent last). The user representation `u` (B, d) differs per
backbone; the scoring head is shared: `head(concat(u, t, u * t))` with `t` the target's embedding.
The head's tensors are the *adaptive parameters* MetaNetwork generates per device
(`adaptive_names()`); everything else is static. With `BackboneConfig.metapatch_dim > 0` the
backbone also holds DCCL's MetaPatch patches (`mntool/metapatch.py`: one on `u` after the
sequence encoder, one in the head), and their per-device vector `metapatch.z` is then the only
adaptive tensor. Written to convert cleanly to TFLite, ONNX and
Core ML: plain matmuls, no boolean indexing, no -inf masks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from device_runtime.errors import MntoolError

MASK_VALUE = -1e9  # finite "minus infinity": a fully padded history must not produce NaN


@dataclass
class BackboneConfig:
    dim: int = 32  # item embedding / user representation size (DUET reference: 32)
    max_history: int = 30  # L: clicks the device model reads (data protocol default)
    head_hidden: int = 32  # width of the head's hidden layer (2-layer head, as in DUET)
    n_layers: int = 1  # SASRec: transformer blocks
    n_heads: int = 1  # SASRec: attention heads
    attn_hidden: int = 32  # DIN: width of the target-attention MLP
    dropout: float = 0.1  # embedding/attention dropout during training
    metapatch_dim: int = 0  # > 0: MetaPatch (mntool/metapatch.py) patches with a z of this size; 0: none
    metapatch_rank: int = 8  # bottleneck width of each metapatch

    def to_dict(self) -> dict:
        return asdict(self)


class ScoringHead(nn.Module):
    """The adaptive layers: Linear(3d -> hidden) -> ReLU -> Linear(hidden -> 1, no bias).

    The last layer has no bias on purpose: a 1-element tensor would be stored inline (not as a
    patchable buffer) by Core ML, and a per-device constant shift cannot change a device's
    ranking anyway. The global offset lives in the backbone's static `out_bias`.
    """

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(in_dim, hidden), nn.Linear(hidden, 1, bias=False)])

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        """`gain` (a metapatch model's head patch, broadcastable to the hidden layer) scales the
        hidden pre-activation by `1 + gain`."""
        x = self.layers[0](x)  # (B, hidden)
        if gain is not None:
            x = x * (1 + gain)
        return self.layers[1](F.relu(x)).squeeze(-1)  # (B,)


class Backbone(nn.Module):
    """Shared parts: item embedding, scoring head, and the features the head reads."""

    model_name = "backbone"

    def __init__(self, n_items: int, config: BackboneConfig):
        super().__init__()
        assert n_items > 0, "n_items must be positive"
        self.n_items = n_items
        self.config = config
        d = config.dim
        self.item_embedding = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.head = ScoringHead(3 * d, config.head_hidden)
        self.out_bias = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.item_embedding.weight, std=0.1)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.metapatch = None
        if config.metapatch_dim:  # built last, so a base model's initial weights do not depend on it
            from mntool.metapatch import MetaPatches

            self.metapatch = MetaPatches(d, config.head_hidden, config.metapatch_dim, config.metapatch_rank)

    def adaptive_names(self) -> list[str]:
        """Names (as in `named_parameters()`) of the tensors MetaNetwork generates: the scoring
        head's, or a metapatch model's z (`metapatch.z`) alone."""
        if self.metapatch is not None:
            return ["metapatch.z"]
        return [f"head.{n}" for n, _ in self.head.named_parameters()]

    def user_representation(self, history: torch.Tensor, target_emb: torch.Tensor) -> torch.Tensor:
        """(B, d) from the history; may depend on the target (DIN), then (B, C, d) for (B, C, d)."""
        raise NotImplementedError

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits (B,) for target (B,); or (B, C) for C candidates per row, target (B, C).

        The candidate form reads each history once (what ranking evaluation needs); exported
        device models use the (B,) form.
        """
        assert history.dim() == 2 and target.dim() in (1, 2) and history.shape[0] == target.shape[0], (
            f"expected history (B, L) and target (B,) or (B, C), got {tuple(history.shape)} and {tuple(target.shape)}"
        )
        t = self.item_embedding(target)  # (B, d) or (B, C, d)
        u = self.user_representation(history, t)  # (B, d) or (B, C, d)
        gain = None
        if self.metapatch is not None:  # the user patch on u, the head patch's gain from u and z
            z = self.metapatch(u)  # (D,), or (groups, D) under per_sample_call
            u = self.metapatch.user_patch(u, z)
            gain = self.metapatch.head_gain(u, z)  # (B, hidden) or (B, C, hidden)
            if t.dim() == 3 and gain.dim() == 2:
                gain = gain[:, None, :]
        if t.dim() == 3 and u.dim() == 2:
            u = u[:, None, :].expand_as(t)
        return self.head(torch.cat([u, t, u * t], dim=-1), gain) + self.out_bias  # (B,) or (B, C)


class GRU4Rec(Backbone):
    """Hidasi et al. 2016: a GRU over the click history; the last hidden state is the user."""

    model_name = "gru4rec"

    def __init__(self, n_items: int, config: BackboneConfig):
        super().__init__(n_items, config)
        self.gru = nn.GRU(config.dim, config.dim, batch_first=True)

    def user_representation(self, history, target_emb):
        x = self.emb_dropout(self.item_embedding(history))  # (B, L, d)
        _, h = self.gru(x)  # h: (1, B, d); left padding puts the most recent click last
        return h[0]


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block with a key-padding mask (an additive bias, finite)."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        assert dim % n_heads == 0, "dim must be divisible by n_heads"
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        hs = d // self.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.reshape(B, L, self.n_heads, hs).transpose(1, 2)  # (B, nh, L, hs)
        k = k.reshape(B, L, self.n_heads, hs).transpose(1, 2)
        v = v.reshape(B, L, self.n_heads, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(  # fused softmax(q k^T / sqrt(hs) + bias) v: (B, nh, L, hs)
            q, k, v, attn_mask=key_bias[:, None, None, :], dropout_p=self.dropout.p if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, L, d)  # (B, L, d)
        x = x + self.dropout(self.proj(y))
        return x + self.dropout(self.ffn(self.ln2(x)))


class SASRec(Backbone):
    """Kang & McAuley 2018: self-attention over the history; the last position is the user.

    Only the last position's output is used, so no causal mask is needed: every key it may see is
    in the past already. Padding keys get a large negative bias.
    """

    model_name = "sasrec"

    def __init__(self, n_items: int, config: BackboneConfig):
        super().__init__(n_items, config)
        self.position_embedding = nn.Embedding(config.max_history, config.dim)
        nn.init.normal_(self.position_embedding.weight, std=0.1)
        self.blocks = nn.ModuleList(
            [SelfAttentionBlock(config.dim, config.n_heads, config.dropout) for _ in range(config.n_layers)]
        )
        self.ln_out = nn.LayerNorm(config.dim)

    def user_representation(self, history, target_emb):
        B, L = history.shape
        assert L <= self.config.max_history, f"history length {L} > max_history {self.config.max_history}"
        pos = self.position_embedding.weight[-L:]  # (L, d): right-aligned like the history
        x = self.emb_dropout(self.item_embedding(history) + pos)  # (B, L, d)
        key_bias = (history == 0).to(x.dtype) * MASK_VALUE  # (B, L)
        for block in self.blocks:
            x = block(x, key_bias)
        return self.ln_out(x[:, -1])  # (B, d)


class DIN(Backbone):
    """Zhou et al. 2018: target attention; each past click is weighted by its relevance to the
    target item (an MLP over [h, t, h - t, h * t]), weights are not normalised (as in DIN)."""

    model_name = "din"

    def __init__(self, n_items: int, config: BackboneConfig):
        super().__init__(n_items, config)
        d = config.dim
        self.attention = nn.Sequential(
            nn.Linear(4 * d, config.attn_hidden), nn.ReLU(), nn.Linear(config.attn_hidden, 1)
        )

    def user_representation(self, history, target_emb):
        if target_emb.dim() == 3:  # (B, C, d) candidates: one user representation per candidate
            B, C, d = target_emb.shape
            flat = self.user_representation(history.repeat_interleave(C, dim=0), target_emb.reshape(B * C, d))
            return flat.reshape(B, C, d)
        h = self.emb_dropout(self.item_embedding(history))  # (B, L, d)
        t = target_emb[:, None, :].expand_as(h)  # (B, L, d)
        w = self.attention(torch.cat([h, t, h - t, h * t], dim=-1)).squeeze(-1)  # (B, L)
        w = w * (history != 0).to(h.dtype)
        return (w[:, :, None] * h).sum(dim=1) / self.config.max_history  # (B, d)


BACKBONES: dict[str, type[Backbone]] = {"gru4rec": GRU4Rec, "sasrec": SASRec, "din": DIN}


def build_model(name: str, n_items: int, config: BackboneConfig | None = None) -> Backbone:
    """Build a backbone by name (`gru4rec`, `sasrec`, `din`)."""
    if name not in BACKBONES:
        raise MntoolError(f"unknown model {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](n_items, config or BackboneConfig())
