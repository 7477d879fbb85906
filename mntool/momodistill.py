"""MoMoDistill (DCCL's "model over models"): a new cloud model distilled from the personalised
device models.

Owns the distillation method: `DistillConfig` (teacher, weight of the distillation term, how
devices are weighted), `teacher_logits` (what each device's personalised model predicts on that
device's cloud-period samples) and `train_momodistill` (the new cloud model). `mntool.train` calls
it for `--method momodistill`; docs/dccl.md says what is distilled, from which devices and with
which weights.

What is distilled. The teacher is a trained checkpoint of any recommender method (metapatch,
metanetwork, finetune; static is the self-distillation control). Each device user u is given the
device model it holds at the end of the cloud period: the teacher's method run on u's upload at
that moment (`dataset.device_recent("valid")`: its last R cloud-period items; MetaPatch learns u's
z on it, MetaNetwork generates u's parameters from it). That model scores every cloud-period
training row of u (positives and their sampled negatives). The student is a fresh static backbone
(the static model's architecture, initial weights and batch order for the same seed) trained on the
cloud period with

    loss = (1 - alpha) * BCE(s, y) + alpha * w_u * BCE(s, sigmoid(t))

per row (s the student's logit, y the label, t the teacher's logit, mean over the batch). With
`weighting="devices"` (default) the distillation term of each device's rows is scaled by w_u =
mean rows per device / rows of u, so every device's personalised model counts equally in total
(a tail device with 17 positives as much as a head device with 500); with `"rows"` w_u = 1 (every
row counts the same, so the head dominates, as in pooled training). Epochs are chosen on
validation UAUC as for the static model; the result is a static-form model (no per-device
parameters) that every personalisation method accepts as `--init`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from device_runtime.errors import MntoolError

WEIGHTINGS = ("devices", "rows")


@dataclass
class DistillConfig:
    teacher: str = ""  # checkpoint directory of the personalised device models (any recommender method)
    alpha: float = 0.5  # weight of the distillation term; the label term gets 1 - alpha (not tuned)
    weighting: str = "devices"  # "devices": each device's rows sum to the same weight; "rows": each row weighs 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise MntoolError(f"distillation weight alpha {self.alpha} is outside [0, 1]")
        if self.weighting not in WEIGHTINGS:
            raise MntoolError(
                f"unknown distillation weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def load_teacher(path: Path | str, dataset):
    """The teacher checkpoint, checked against the dataset the student trains on: a recommender
    (task movielens) trained under the same protocol configuration on the same items."""
    from mntool.train import load_checkpoint

    if not str(path):
        raise MntoolError("--method momodistill needs --teacher CKPT (the personalised device models to distil)")
    teacher = load_checkpoint(path)
    if teacher.task != "movielens":
        raise MntoolError(f"--teacher {path} is a {teacher.task} checkpoint; MoMoDistill distils recommenders")
    if teacher.n_items != dataset.n_items or teacher.protocol != asdict(dataset.config):
        raise MntoolError(
            f"--teacher {path} was trained under another protocol configuration or item set "
            "(e.g. --history-len, --recent-len); use the same"
        )
    return teacher


def teacher_logits(teacher, dataset, progress: bool = False) -> tuple[np.ndarray, dict]:
    """(logits (rows,) aligned with `dataset.train`, info): every cloud training row scored by its
    user's personalised teacher model, personalised on the user's end-of-cloud-period upload."""
    import time

    from mntool.train import device_params_for, grouped_rows, score_rows

    rows, group = dataset.train, dataset.config.n_negatives + 1
    t0 = time.perf_counter()
    params = device_params_for(
        teacher.model, teacher.config.method, dataset, "valid", teacher.config, teacher.meta, progress
    )
    personalise = time.perf_counter() - t0
    history, target, _ = grouped_rows(rows, np.arange(len(rows)), group)
    logits = score_rows(teacher.model, history, target, rows.user[::group], params).reshape(-1)
    if not np.all(np.isfinite(logits)):
        raise MntoolError(f"--teacher {teacher.path} predicts non-finite logits on the cloud period")
    info = {
        "teacher": str(teacher.path),
        "teacher_method": teacher.config.method,
        "teacher_model": teacher.config.model,
        "devices": int(len(np.unique(rows.user))),
        "rows": int(len(rows)),
        "personalise_seconds": personalise,
        "seconds": time.perf_counter() - t0,
    }
    return logits.astype(np.float32), info


def device_weights(users: np.ndarray, weighting: str) -> np.ndarray:
    """Per-row weight of the distillation term: 1 (`rows`) or mean rows per device / rows of the
    row's device (`devices`), so the weights average 1 over the rows either way."""
    if weighting == "rows":
        return np.ones(len(users), np.float32)
    _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
    return (len(users) / len(counts) / counts[inverse]).astype(np.float32)


def distill_loss(
    student: torch.Tensor, label: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, alpha: float
) -> torch.Tensor:
    """(1 - alpha) * BCE(student, label) + alpha * weight * BCE(student, sigmoid(teacher)), mean over rows."""
    hard = F.binary_cross_entropy_with_logits(student, label)  # static training's loss, term for term
    soft = F.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher), reduction="none")
    return (1.0 - alpha) * hard + alpha * (weight * soft).mean()


def train_momodistill(dataset, cfg, progress: bool = True, log=print) -> tuple[torch.nn.Module, dict]:
    """The new cloud model: `cfg.model` from the static model's initial weights (same seed), trained
    on the cloud period with `distill_loss` toward the teacher (`cfg.distill`), epochs chosen on
    validation UAUC (`mntool.train._fit_loop`, as `train_static`)."""
    from mntool.models import build_model
    from mntool.train import _fit_loop, _Prober, _seed_everything, group_inputs

    dcfg: DistillConfig = cfg.distill
    teacher = load_teacher(dcfg.teacher, dataset)
    log(f"momodistill: scoring the cloud period with {teacher.config.method} {teacher.config.model} device models")
    t_logits, info = teacher_logits(teacher, dataset, progress)
    del teacher
    rows, group = dataset.train, dataset.config.n_negatives + 1
    weights = device_weights(rows.user, dcfg.weighting)
    t_all, w_all = torch.from_numpy(t_logits), torch.from_numpy(weights)

    _seed_everything(cfg.seed)  # the static model's initial weights for this seed
    model = build_model(cfg.model, dataset.n_items, cfg.backbone)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def step_fn(idx: np.ndarray) -> float:
        history, target, label = group_inputs(rows, idx, group)
        i = torch.from_numpy(idx)
        loss = distill_loss(model(history, target), label, t_all[i].view_as(label), w_all[i].view_as(label), dcfg.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    prober = _Prober(dataset, cfg.probe_users, cfg.seed)
    train_log = _fit_loop(dataset, cfg, model, step_fn, lambda: None, prober, cfg.epochs, progress, "momodistill")
    _, first = np.unique(rows.user, return_index=True)
    per_device = weights[first]  # one weight per device
    train_log["distill"] = {
        **info,
        "alpha": dcfg.alpha,
        "weighting": dcfg.weighting,
        "device_weight": {
            "min": float(per_device.min()),
            "median": float(np.median(per_device)),
            "max": float(per_device.max()),
        },
    }
    return model.eval(), train_log
