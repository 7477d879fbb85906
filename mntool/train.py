"""Training and evaluation of device models, and their checkpoints.

Five methods share one evaluation path: `static` (one model for every device), `finetune` (per
device, a few gradient steps on the adaptive layers using the device's labelled recent samples:
what a phone would have to run), `metapatch` (DCCL's MetaPatch, `mntool/metapatch.py`: patches in
the frozen static model, shared parameters learned in the cloud, per device only a small vector z
learned on fine-tuning's data) and `metanetwork` (the cloud generates each device's adaptive
parameters from its recent samples; on a metapatch `init`, it generates z) and `momodistill` (DCCL's
MoMoDistill, `mntool/momodistill.py`: a new one-model-for-every-device cloud model trained with a
distillation term toward a teacher checkpoint's personalised device models). Model and epoch
selection use the validation period only;
the test period is scored once, with the selected weights. A checkpoint is a directory:
`config.json` (everything needed to rebuild), `weights.pt`, `metrics.json`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from device_runtime.errors import MntoolError
from mntool.data import BUCKETS, PROTOCOL_VERSION, DeviceDataset, RankingSet, SampleSet, activity_buckets
from mntool.meta import MetaConfig, MetaNetwork, RecentItemsEncoder, per_sample_call
from mntool.metapatch import MetaPatchConfig
from mntool.metrics import evaluate, evaluate_buckets, evaluate_popularity
from mntool.models import BACKBONES, Backbone, BackboneConfig, build_model
from mntool.momodistill import DistillConfig

METHODS = ("static", "finetune", "metapatch", "metanetwork", "momodistill")
DEVICE_TRAINING = ("finetune", "metapatch")  # methods whose device phase is gradient steps on the labelled upload
CLOUD_MODELS = ("static", "momodistill")  # methods whose checkpoint is one model for every device (an --init)
CHECKPOINT_FORMAT = 1
EVAL_ROWS = 8192  # pointwise rows per evaluation batch
EVAL_CANDIDATES = 25_600  # scored (history, candidate) pairs per evaluation batch in the candidate form


@dataclass
class FinetuneConfig:
    steps: int = 20  # Adam steps per device on its labelled recent samples
    lr: float = 3e-3  # step size (chosen on validation UAUC)
    n_negatives: int = 4  # sampled negatives per recent positive, as in cloud training


@dataclass
class TrainConfig:
    model: str = "sasrec"
    method: str = "static"
    epochs: int = 20  # upper bound; early stopping on validation UAUC usually ends sooner
    patience: int = 2  # epochs without a validation-UAUC gain before stopping
    batch_size: int = 1280  # rows per step (256 positives with their 4 negatives each)
    lr: float = 5e-3  # static phase (chosen on validation: 2e-3 needs twice the epochs for the same UAUC)
    meta_lr: float = 2e-3  # metanetwork on a frozen static backbone (joint training uses `lr` throughout)
    encoder_dim: int = 0  # generator's item table width; 0 reads the backbone's own item embeddings
    meta_train_backbone: bool = True  # metanetwork: backbone and generator trained together from scratch;
    # train() runs with it False when it starts from a static `init`, whose backbone then stays frozen
    # (the patch for a model already on phones). Why both: docs/metanetwork-results.md
    shuffled_uploads: bool = False  # control experiment: every device reads another's upload (see experiment_dataset)
    seed: int = 0
    probe_every: int = 50  # steps between validation probes (loss, UAUC on a fixed user subset)
    probe_users: int = 200
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # also metapatch's device phase (on z)
    metapatch: MetaPatchConfig = field(default_factory=MetaPatchConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # momodistill: teacher and weights

    def __post_init__(self) -> None:
        if self.model not in BACKBONES:
            raise MntoolError(f"unknown model {self.model!r}; choose one of {', '.join(BACKBONES)}")
        if self.method not in METHODS:
            raise MntoolError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise MntoolError("epochs and batch size must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["backbone"] = BackboneConfig(**d.get("backbone", {}))
        d["meta"] = MetaConfig(**d.get("meta", {}))
        d["finetune"] = FinetuneConfig(**d.get("finetune", {}))
        d["metapatch"] = MetaPatchConfig(**d.get("metapatch", {}))
        d["distill"] = DistillConfig(**d.get("distill", {}))
        return cls(**d)


# ---- personalised scoring: one code path for every method -----------------------------------
@dataclass
class DeviceParams:
    """Adaptive parameters per device: `params[name]` is (U, *shape) for `users` (U,)."""

    users: np.ndarray
    params: dict[str, torch.Tensor]

    def index_of(self, rows_users: np.ndarray) -> torch.Tensor:
        pos = np.searchsorted(self.users, rows_users)
        assert np.all(self.users[np.minimum(pos, len(self.users) - 1)] == rows_users), (
            "row of a device without parameters"
        )
        return torch.from_numpy(pos)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


@torch.no_grad()
def score_rows(
    model: Backbone, history: np.ndarray, target: np.ndarray, users: np.ndarray, device_params: DeviceParams | None
) -> np.ndarray:
    """Logits for rows (history (N, L), target (N,) or (N, C)), each with its device's parameters."""
    model.eval()
    step = EVAL_ROWS if target.ndim == 1 else max(1, EVAL_CANDIDATES // target.shape[1])
    out = []
    for i in range(0, len(history), step):
        h, t = _t(history[i : i + step]), _t(target[i : i + step])
        if device_params is None:
            out.append(model(h, t))
        else:
            index = device_params.index_of(users[i : i + step])
            out.append(per_sample_call(model, device_params.params, (h, t), index))
    return torch.cat(out).numpy()


def evaluate_split(
    model: Backbone,
    dataset: DeviceDataset,
    split: str,
    device_params: DeviceParams | None,
    ranking: bool = True,
    buckets: dict[str, np.ndarray] | None = None,
) -> dict:
    """AUC/UAUC on the pointwise rows and NDCG@10/HR@10 on the ranking tasks of `split`. With
    `buckets` ({name: user codes}, e.g. `activity_buckets(dataset)`) and `ranking`, also one sub-dict
    per bucket with the same figures on its users' rows and `users` (`metrics.evaluate_buckets`: the
    scores computed once here, sliced by user; the overall figures are unchanged)."""
    rows: SampleSet = dataset.split(split)
    rank: RankingSet = getattr(dataset, f"{split}_rank")
    group = dataset.config.n_negatives + 1
    history, target, _ = grouped_rows(rows, np.arange(len(rows)), group)  # each history scored once with its targets
    scores = score_rows(model, history, target, rows.user[::group], device_params).reshape(-1)
    if not ranking:
        from mntool.metrics import auc, uauc

        return {"auc": auc(rows.label, scores), "uauc": uauc(rows.user, rows.label, scores)}
    rank_scores = score_rows(model, rank.history, rank.candidates, rank.user, device_params)
    out = evaluate(rows.user, rows.label, scores, rank.user, rank_scores)
    if buckets is not None:
        out.update(evaluate_buckets(rows.user, rows.label, scores, rank.user, rank_scores, buckets))
    return out


# ---- batching ---------------------------------------------------------------------------------
def group_batches(rows: SampleSet, batch_size: int, group: int, rng: np.random.Generator):
    """Index arrays of shuffled batches that keep each positive with its negatives (a group of
    `group` consecutive rows): they share one device upload, so the generator runs once per group."""
    n_groups = len(rows) // group
    assert n_groups * group == len(rows), "sample rows must come in positive + negatives groups"
    per_batch = max(1, batch_size // group)
    order = rng.permutation(n_groups)
    for i in range(0, n_groups, per_batch):
        g = order[i : i + per_batch]
        yield (g[:, None] * group + np.arange(group)).reshape(-1)


# ---- training ---------------------------------------------------------------------------------
@dataclass
class Curve:
    """Validation probes during training: the figures behind the stabilizer's claims."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    uauc: list[float] = field(default_factory=list)

    def oscillation(self) -> float:
        """Std of the step-to-step change of validation loss over the last half of training."""
        half = np.asarray(self.loss[len(self.loss) // 2 :])
        return float(np.std(np.diff(half))) if len(half) > 2 else float("nan")

    def steps_to_fraction(self, fraction: float = 0.95) -> int | None:
        """First probe step at which UAUC covered `fraction` of its gain from the first probe to
        the final one (None if there was no gain)."""
        u = np.asarray(self.uauc)
        gain = u[-1] - u[0]
        if len(u) < 2 or gain <= 0:
            return None
        hit = np.nonzero(u - u[0] >= fraction * gain)[0]
        return int(self.step[hit[0]])


class _Prober:
    """Validation loss and UAUC on a fixed subset of device users, every few steps."""

    def __init__(self, dataset: DeviceDataset, n_users: int, seed: int):
        users = np.random.default_rng(seed).choice(
            dataset.device_users, size=min(n_users, len(dataset.device_users)), replace=False
        )
        self.rows = dataset.valid.for_users(users)
        self.dataset = dataset
        self.curve = Curve()

    def __call__(self, step: int, model: Backbone, device_params: DeviceParams | None) -> None:
        from mntool.metrics import uauc

        logits = score_rows(model, self.rows.history, self.rows.target, self.rows.user, device_params)
        loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(self.rows.label)).item()
        self.curve.step.append(step)
        self.curve.loss.append(loss)
        self.curve.uauc.append(uauc(self.rows.user, self.rows.label, logits))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def _bar(total: int, desc: str, progress: bool):
    return tqdm(
        total=total, desc=desc, unit="row", unit_scale=True, disable=not progress, leave=False, dynamic_ncols=True
    )


def grouped_rows(rows: SampleSet, idx: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows `idx` (groups of `group` consecutive rows: a positive and its negatives, which share one
    history) as the backbone's candidate form: history (G, L), targets (G, group), labels (G, group).
    The history is encoded once per group instead of once per row (GRU4Rec, SASRec: ~4x faster
    steps); DIN's target attention still runs per candidate."""
    history = rows.history[idx[::group]]
    assert np.array_equal(np.repeat(history, group, axis=0), rows.history[idx]), (
        "rows of a group must share one history"
    )
    return history, rows.target[idx].reshape(-1, group), rows.label[idx].reshape(-1, group)


def group_inputs(rows: SampleSet, idx: np.ndarray, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`grouped_rows` as tensors: the inputs of one training step."""
    return tuple(_t(a) for a in grouped_rows(rows, idx, group))


def static_step(model: Backbone, opt: torch.optim.Optimizer, rows: SampleSet, idx: np.ndarray, group: int) -> float:
    """One BCE step of the whole backbone on rows `idx` (groups of `group`, see `group_inputs`)."""
    history, target, label = group_inputs(rows, idx, group)
    loss = F.binary_cross_entropy_with_logits(model(history, target), label)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def metanetwork_step(
    meta: MetaNetwork, opt: torch.optim.Optimizer, rows: SampleSet, idx: np.ndarray, group: int
) -> float:
    """One BCE step of the MetaNetwork on rows `idx`, which come in groups of `group` rows (a
    positive and its negatives) sharing one device upload: parameters are generated per group."""
    cond = _t(rows.recent[idx[::group]])
    history, target, label = group_inputs(rows, idx, group)
    logits = meta((history, target), (cond,))  # (groups, group): one parameter set per group
    loss = F.binary_cross_entropy_with_logits(logits, label)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    meta.update_ema()
    return loss.item()


def metanetwork_optimizer(meta: MetaNetwork, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the generator and gates, plus the backbone if `cfg.meta_train_backbone` (then at
    the static learning rate, as everything trains from scratch; else at `meta_lr`)."""
    meta.backbone.requires_grad_(cfg.meta_train_backbone)
    lr = cfg.lr if cfg.meta_train_backbone else cfg.meta_lr
    return torch.optim.Adam([p for p in meta.parameters() if p.requires_grad], lr=lr)


def train_static(dataset: DeviceDataset, cfg: TrainConfig, progress: bool = True) -> tuple[Backbone, dict]:
    """BCE training of the whole backbone; the epoch with the best validation UAUC is kept."""
    _seed_everything(cfg.seed)
    model = build_model(cfg.model, dataset.n_items, cfg.backbone)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    prober = _Prober(dataset, cfg.probe_users, cfg.seed)

    def step_fn(idx: np.ndarray) -> float:
        return static_step(model, opt, dataset.train, idx, dataset.config.n_negatives + 1)

    log = _fit_loop(dataset, cfg, model, step_fn, lambda: None, prober, cfg.epochs, progress, "static")
    return model, log


def build_metanetwork(model: Backbone, cfg: TrainConfig, recent_len: int) -> MetaNetwork:
    table = model.item_embedding
    if cfg.encoder_dim:  # a cloud-side table of its own: the generator may be richer than the device model
        table = torch.nn.Embedding(model.n_items + 1, cfg.encoder_dim, padding_idx=0)
        torch.nn.init.normal_(table.weight, std=0.1)
    encoder = RecentItemsEncoder(table, recent_len, cfg.meta.cond_dim)
    return MetaNetwork(model, model.adaptive_names(), encoder, cfg.meta)


def generate_device_params(
    meta: MetaNetwork, users: np.ndarray, recent: np.ndarray, use_ema: bool = True
) -> DeviceParams:
    """The generator's adaptive parameters for each device from its upload (no gradients)."""
    if meta.training:
        meta.eval()
    with torch.no_grad():
        params = meta.adaptive_params(_t(recent), use_ema=use_ema)
    return DeviceParams(users, {n: p.detach() for n, p in params.items()})


def train_metanetwork(
    dataset: DeviceDataset, cfg: TrainConfig, init: Backbone, progress: bool = True
) -> tuple[MetaNetwork, dict]:
    """Train the generator around `init`: together with it if `cfg.meta_train_backbone` (`init`
    freshly built), else on it frozen (`init` a trained static backbone)."""
    _seed_everything(cfg.seed + 1)
    meta = build_metanetwork(init, cfg, dataset.config.recent_len)
    opt = metanetwork_optimizer(meta, cfg)
    prober = _Prober(dataset, cfg.probe_users, cfg.seed)
    users, valid_recent = dataset.device_recent("valid")
    group = dataset.config.n_negatives + 1

    def step_fn(idx: np.ndarray) -> float:
        return metanetwork_step(meta, opt, dataset.train, idx, group)

    def params_fn() -> DeviceParams:
        return generate_device_params(meta, users, valid_recent)

    log = _fit_loop(
        dataset,
        cfg,
        meta,
        step_fn,
        params_fn,
        prober,
        cfg.epochs,
        progress,
        "metanetwork",
        backbone=meta.backbone,
        start_is_candidate=cfg.meta.gate and not cfg.meta_train_backbone,
    )
    meta.backbone.requires_grad_(True)
    return meta, log


def _fit_loop(
    dataset,
    cfg,
    module,
    step_fn,
    params_fn,
    prober,
    epochs,
    progress,
    name,
    backbone=None,
    start_is_candidate: bool = False,
) -> dict:
    """Epochs of `step_fn` with validation probes, early stopping and best-epoch restore.

    With `start_is_candidate` the module as given competes as epoch 0 (used when it is exactly the
    static model, i.e. the gated MetaNetwork at its zero-gate start): if no epoch validates better,
    the static parameters are what is kept."""
    backbone = backbone if backbone is not None else module
    rng = np.random.default_rng(cfg.seed + 2)
    group = dataset.config.n_negatives + 1
    best, best_state, bad, step = -math.inf, None, 0, 0
    epochs_log = []
    prober(0, backbone, params_fn())
    start = None
    if start_is_candidate:
        start = evaluate_split(backbone, dataset, "valid", params_fn(), ranking=False)["uauc"]
        best, best_state = start, {k: v.detach().clone() for k, v in module.state_dict().items()}
    for epoch in range(1, epochs + 1):
        t0, n_rows, losses = time.perf_counter(), 0, []
        train_time = 0.0
        with _bar(len(dataset.train), f"{name} epoch {epoch}", progress) as bar:
            for idx in group_batches(dataset.train, cfg.batch_size, group, rng):
                module.train()
                s0 = time.perf_counter()
                losses.append(step_fn(idx))
                train_time += time.perf_counter() - s0
                n_rows += len(idx)
                step += 1
                bar.update(len(idx))
                if step % cfg.probe_every == 0:
                    prober(step, backbone, params_fn())
        valid = evaluate_split(backbone, dataset, "valid", params_fn(), ranking=False)
        epochs_log.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "valid_auc": valid["auc"],
                "valid_uauc": valid["uauc"],
                "seconds": time.perf_counter() - t0,
                "train_seconds": train_time,
                "samples_per_s": n_rows / train_time,
            }
        )
        if progress:
            tqdm.write(
                f"{name} epoch {epoch}: loss {np.mean(losses):.4f}  valid AUC {valid['auc']:.4f}  UAUC {valid['uauc']:.4f}  "
                f"({n_rows / train_time:,.0f} samples/s)"
            )
        if valid["uauc"] > best:
            best, bad = valid["uauc"], 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    module.load_state_dict(best_state)
    best_epoch = max(epochs_log, key=lambda e: e["valid_uauc"])["epoch"]
    if start is not None and start >= epochs_log[best_epoch - 1]["valid_uauc"]:
        best_epoch = 0  # no epoch beat the static start: the static parameters were kept
    return {
        "epochs": epochs_log,
        "best_epoch": best_epoch,
        "start_valid_uauc": start,
        "steps": step,
        "samples_per_s": float(np.mean([e["samples_per_s"] for e in epochs_log])),
        "epoch_seconds": float(np.mean([e["train_seconds"] for e in epochs_log])),
        "curve": asdict(prober.curve),
        "oscillation": prober.curve.oscillation(),
        "steps_to_95pct_gain": prober.curve.steps_to_fraction(0.95),
    }


# ---- per-device fine-tuning (the baseline a phone would have to run) ----------------------------
def recent_training_rows(recent: np.ndarray, history_len: int, n_items: int, n_negatives: int, seed: int):
    """A device's labelled recent samples: each uploaded item as a positive with the items before
    it as history, plus `n_negatives` random items the device has not uploaded.

    Returns history (U, P, L), target (U, P), label (U, P) with P = R * (1 + n_negatives); rows of
    padding positions get label -1 (ignored)."""
    U, R = recent.shape
    rng = np.random.default_rng(seed)
    padded = np.concatenate([np.zeros((U, history_len), dtype=np.int64), recent], axis=1)  # (U, L + R)
    hist = np.stack([padded[:, j : j + history_len] for j in range(R)], axis=1)  # (U, R, L)
    neg = rng.integers(1, n_items + 1, size=(U, R, n_negatives))
    clash = (neg[..., None] == recent[:, None, None, :]).any(-1)
    neg = np.where(clash, rng.integers(1, n_items + 1, size=neg.shape), neg)  # one resample is plenty at 1.7k items
    target = np.concatenate([recent[:, :, None], neg], axis=2)  # (U, R, 1 + n)
    valid = recent != 0
    label = np.where(valid[:, :, None], np.concatenate([np.ones((U, R, 1)), np.zeros((U, R, n_negatives))], 2), -1.0)
    G = 1 + n_negatives
    hist = np.repeat(hist[:, :, None, :], G, axis=2).reshape(U, R * G, history_len)
    return hist, target.reshape(U, R * G), label.reshape(U, R * G).astype(np.float32)


def finetune_device_params(
    model: Backbone,
    users: np.ndarray,
    recent: np.ndarray,
    cfg: FinetuneConfig,
    seed: int = 0,
    history_len: int = 30,
    devices_per_batch: int = 64,
    progress: bool = False,
) -> DeviceParams:
    """Fine-tune the adaptive layers separately for every device, batched over devices.

    Each device starts from the static parameters and takes `cfg.steps` Adam steps on its own
    labelled recent samples; devices never share gradients (Adam is elementwise, losses are
    per-device means summed). On a metapatch model the adaptive tensor is z alone, so this is
    MetaPatch's device phase: each device learns only its z, from the model's (the mean cloud z)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    static = {n: p for n, p in model.named_parameters() if n in model.adaptive_names()}
    hist, target, label = recent_training_rows(recent, history_len, model.n_items, cfg.n_negatives, seed)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in static}
    try:
        for i in tqdm(range(0, len(users), devices_per_batch), desc="finetune", disable=not progress, leave=False):
            h, t, y = (
                _t(hist[i : i + devices_per_batch]),
                _t(target[i : i + devices_per_batch]),
                _t(label[i : i + devices_per_batch]),
            )
            U, P = t.shape
            params = {
                n: p.detach().unsqueeze(0).repeat(U, *[1] * p.dim()).requires_grad_(True) for n, p in static.items()
            }
            opt = torch.optim.Adam(params.values(), lr=cfg.lr)
            mask = (y >= 0).to(torch.float32)
            for _ in range(cfg.steps):
                logits = per_sample_call(model, params, (h.reshape(U * P, -1), t.reshape(-1))).view(
                    U, P
                )  # U groups of P rows
                per_row = F.binary_cross_entropy_with_logits(logits, y.clamp_min(0), reduction="none") * mask
                loss = (per_row.sum(1) / mask.sum(1).clamp_min(1)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for n, p in params.items():
                out[n].append(p.detach())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return DeviceParams(users, {n: torch.cat(v) for n, v in out.items()})


# ---- checkpoints ------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    path: Path
    config: TrainConfig
    n_items: int
    protocol: dict
    model: Backbone  # eval mode, static adaptive parameters
    meta: MetaNetwork | None  # the trained generator (method metanetwork)
    task: str = "movielens"

    @property
    def adaptive(self) -> list[str]:
        return self.model.adaptive_names()

    def example_inputs(
        self, batch: int = 1, seed: int = 0, candidates: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid item ids to trace an export with: row form (history (batch, L), target (batch,)),
        or with `candidates` the candidate form (history (batch, L), target (batch, candidates))."""
        g = torch.Generator().manual_seed(seed)
        L = self.protocol["history_len"]
        history = torch.randint(1, self.n_items + 1, (batch, L), generator=g)
        history[:, : L // 3] = 0  # some left padding, as real histories have
        shape = (batch, candidates) if candidates else (batch,)
        return history, torch.randint(1, self.n_items + 1, shape, generator=g)

    def export_inputs(
        self, batch: int | None = None, candidates: int | None = None, layout: str | None = None
    ) -> tuple[tuple, dict]:
        """(example inputs, weight map `form`) of the artifact a device runs. `candidates` per
        ranking request default to the protocol's (the positive and its ranking negatives: 100).
        Layout `candidates` (the default): `batch` histories (default 1) x `candidates` per call,
        each history encoded once; `rows`: `batch` rows per call (default: one request's
        candidates), one per candidate (device_runtime.ranking)."""
        from device_runtime.ranking import RankingForm

        layout = layout or "candidates"
        candidates = candidates or 1 + int(self.protocol["n_rank_negatives"])
        form = RankingForm(
            layout=layout,
            per_call=batch or (1 if layout == "candidates" else candidates),
            candidates=candidates,
            history_len=int(self.protocol["history_len"]),
            n_items=int(self.n_items),
        )
        example = self.example_inputs(batch=form.per_call, candidates=candidates if layout == "candidates" else None)
        return example, form.to_dict()


def save_checkpoint(
    out: Path, cfg: TrainConfig, dataset: DeviceDataset, module: torch.nn.Module, metrics: dict
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format": CHECKPOINT_FORMAT,
        "protocol_version": dataset.protocol_version,
        "protocol": asdict(dataset.config),
        "n_items": dataset.n_items,
        "train": cfg.to_dict(),
    }
    torch.save(module.state_dict(), out / "weights.pt")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Rebuild a trained model (and generator) from a checkpoint directory, of any task (the
    task named in its config.json loads it: `mntool.tasks`)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MntoolError(f"{path} is not an mntool checkpoint (no config.json)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise MntoolError(f"{cfg_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise MntoolError(
            f"{path}: checkpoint format {config.get('format') if isinstance(config, dict) else None!r} is not "
            f"supported (expected {CHECKPOINT_FORMAT})"
        )
    from mntool import tasks

    return tasks.get(tasks.of_config(config)).load_checkpoint(path, config)


def load_recommender_checkpoint(path: Path, config: dict) -> Checkpoint:
    """`load_checkpoint` for a recommender (task `movielens`) checkpoint."""
    if config.get("protocol_version") != PROTOCOL_VERSION:
        raise MntoolError(
            f"{path} was trained under data protocol {config.get('protocol_version')!r}, this mntool uses {PROTOCOL_VERSION!r}; retrain it"
        )
    cfg = TrainConfig.from_dict(config["train"])
    model = build_model(cfg.model, config["n_items"], cfg.backbone)
    module: torch.nn.Module = model
    meta = None
    if cfg.method == "metanetwork":
        meta = build_metanetwork(model, cfg, config["protocol"]["recent_len"])
        module = meta
    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except FileNotFoundError:
        raise MntoolError(f"{path}: weights.pt is missing") from None
    except (RuntimeError, KeyError, EOFError) as err:
        raise MntoolError(f"{path}: weights.pt does not match config.json ({str(err).splitlines()[0]})") from None
    model.eval()
    if meta is not None:
        meta.eval()
    return Checkpoint(path, cfg, config["n_items"], config["protocol"], model, meta)


# ---- the one entry point the CLI calls ---------------------------------------------------------
def device_params_for(
    ckpt_or_model,
    method: str,
    dataset: DeviceDataset,
    split: str,
    cfg: TrainConfig,
    meta: MetaNetwork | None = None,
    progress: bool = False,
) -> DeviceParams | None:
    """Per-device adaptive parameters for a period under `method` (None for static)."""
    users, recent = dataset.device_recent(split)
    if method in CLOUD_MODELS:
        return None
    if method == "metanetwork":
        return generate_device_params(meta, users, recent)
    assert method in DEVICE_TRAINING, method
    seed = cfg.seed + (11 if split == "valid" else 13)
    return finetune_device_params(
        ckpt_or_model, users, recent, cfg.finetune, seed, dataset.config.history_len, progress=progress
    )


def experiment_dataset(dataset: DeviceDataset, cfg: TrainConfig) -> DeviceDataset:
    """The dataset a run with `cfg` trains and is scored on: as given, or, for the
    `shuffled_uploads` control, with every upload swapped for another device's
    (`DeviceDataset.with_shuffled_uploads`, seeded by the run's seed)."""
    return dataset.with_shuffled_uploads(cfg.seed) if cfg.shuffled_uploads else dataset


def report_metrics(
    model: Backbone, dataset: DeviceDataset, cfg: TrainConfig, meta: MetaNetwork | None, progress: bool
) -> dict:
    """Validation and test metrics of a trained model under its method, plus per-device cost
    (seconds per device, all devices of the period batched; gradient steps per device). Each period
    also holds `head`, `torso`, `tail`: the same figures on the long-tail buckets of the device users
    (`activity_buckets`, decided once on the cloud period; docs/dccl.md, "Long-tail buckets")."""
    out = {}
    buckets = activity_buckets(dataset)
    for split in ("valid", "test"):
        t0 = time.perf_counter()
        params = device_params_for(model, cfg.method, dataset, split, cfg, meta, progress)
        seconds = time.perf_counter() - t0
        out[split] = evaluate_split(model, dataset, split, params, buckets=buckets)
        if cfg.method not in CLOUD_MODELS:
            out[split]["personalise_seconds_per_device"] = seconds / len(dataset.device_users)
            out[split]["personalise_steps"] = cfg.finetune.steps if cfg.method in DEVICE_TRAINING else 0
        for name in BUCKETS:  # after the overall figures and costs in metrics.json
            out[split][name] = out[split].pop(name)
    out["popularity"] = {"valid": evaluate_popularity(dataset, "valid"), "test": evaluate_popularity(dataset, "test")}
    return out


def train(
    dataset: DeviceDataset,
    cfg: TrainConfig,
    out: Path,
    init: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train `cfg.method` on `dataset`, write a checkpoint to `out`, return its metrics.

    `metanetwork` trains the backbone and the generator together from scratch, unless it is given an
    `init` or `cfg.meta_train_backbone` is False: then the generator learns on that model, frozen
    (a static `init`: it generates the head; a metapatch `init`: it generates z). `finetune`,
    `metapatch` (and the frozen metanetwork without an `init`) start from a static model: `init` (a
    static checkpoint of the same backbone) or, if not given, one trained first with the same seed
    into `out/static/`. With `cfg.shuffled_uploads` everything runs on `experiment_dataset`.
    """
    out = Path(out)
    cfg = replace(
        cfg
    )  # what actually runs (frozen backbone with an init, the init's backbone shape) is saved, not written back
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the machines this targets have 2 cores
    dataset = experiment_dataset(dataset, cfg)
    if cfg.method == "metanetwork":
        cfg.meta_train_backbone = cfg.meta_train_backbone and init is None
    if cfg.method == "metanetwork" and cfg.meta_train_backbone:
        _seed_everything(cfg.seed)  # the same initial backbone as the static model of this seed
        model = build_model(cfg.model, dataset.n_items, cfg.backbone)
        meta, train_log = train_metanetwork(dataset, cfg, model, progress)
        return _score_and_save(out, cfg, dataset, model, meta, train_log, progress, init=None)
    if cfg.method == "static":
        model, train_log = train_static(dataset, cfg, progress)
        return _score_and_save(out, cfg, dataset, model, None, train_log, progress)
    if cfg.method == "momodistill":
        from mntool.momodistill import train_momodistill

        if init is not None:
            raise MntoolError(
                "--method momodistill trains a new cloud model from scratch; it takes --teacher, not --init"
            )
        model, train_log = train_momodistill(dataset, cfg, progress, log)
        return _score_and_save(out, cfg, dataset, model, None, train_log, progress, teacher=cfg.distill.teacher)
    if init is None:
        log(f"{cfg.method} starts from a static {cfg.model}: training it first into {out / 'static'}")
        static_cfg = TrainConfig.from_dict({**cfg.to_dict(), "method": "static", "shuffled_uploads": False})
        train(dataset, static_cfg, out / "static", progress=progress, log=log)
        init = out / "static"
    base = load_checkpoint(init)
    allowed = (*CLOUD_MODELS, "metapatch") if cfg.method == "metanetwork" else CLOUD_MODELS
    if base.config.method not in allowed or base.config.model != cfg.model or base.n_items != dataset.n_items:
        raise MntoolError(
            f"--init {init} must be a {' or '.join(allowed)} {cfg.model} checkpoint on the same data "
            f"(it is {base.config.method} {base.config.model})"
        )
    # a static (or metapatch) model never reads the uploads, so only the upload length may differ
    if {**base.protocol, "recent_len": None} != {**asdict(dataset.config), "recent_len": None}:
        raise MntoolError(
            f"--init {init} was trained under another protocol configuration (e.g. --history-len); use the same"
        )
    meta, train_log, extra = None, {}, {"init": str(init)}
    if cfg.method == "metapatch":
        from mntool.metapatch import attach, train_metapatch

        model = attach(base.model, cfg.metapatch, cfg.seed + 3)
        cfg.backbone = model.config
        model, train_log = train_metapatch(dataset, cfg, model, progress)
    else:
        cfg.backbone = base.config.backbone
        model = base.model
    if cfg.method == "metanetwork":
        extra["init_method"] = base.config.method
        if base.config.method == "metapatch" and cfg.meta.gate:
            # z's residual on the scale of how far the cloud users' z's spread, not the (small) mean z's
            spread = float(model.metapatch.spread)
            cfg.meta = replace(cfg.meta, scale_floor=max(cfg.meta.scale_floor, spread))
        meta, train_log = train_metanetwork(dataset, cfg, model, progress)
    return _score_and_save(out, cfg, dataset, model, meta, train_log, progress, **extra)


def _score_and_save(
    out: Path,
    cfg: TrainConfig,
    dataset: DeviceDataset,
    model: Backbone,
    meta: MetaNetwork | None,
    train_log: dict,
    progress: bool,
    **extra,
) -> dict:
    """Score a trained run (`report_metrics`), write its checkpoint (the MetaNetwork if any, else the
    backbone) and return its metrics; `extra` (e.g. `init`) goes into metrics.json after the run's names."""
    metrics = {
        "method": cfg.method,
        "model": cfg.model,
        "seed": cfg.seed,
        **extra,
        "adaptive_values": sum(p.numel() for n, p in model.named_parameters() if n in model.adaptive_names()),
        "train": train_log,
        **report_metrics(model, dataset, cfg, meta, progress),
    }
    save_checkpoint(out, cfg, dataset, meta if meta is not None else model, metrics)
    return metrics
