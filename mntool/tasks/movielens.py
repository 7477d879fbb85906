"""The recommender task: MovieLens-100k under the time-shift protocol (`ts-v1`), GRU4Rec / SASRec /
DIN, uploads of recent item ids. Thin over `mntool.train`, `mntool.data` and `mntool.metrics`."""

from __future__ import annotations

import numpy as np

from device_runtime.errors import MntoolError
from mntool.models import BACKBONES
from mntool.tasks import SamplesError

NAME = "movielens"
MODELS = tuple(BACKBONES)
METHODS = ("static", "finetune", "metapatch", "metanetwork", "momodistill")
DEFAULT_MODEL = "sasrec"
METRICS = ("auc", "uauc", "ndcg@10", "hr@10")


def train(options: dict, out, init, data_dir, progress: bool, log) -> dict:
    """`mntool train` for this task; `options` are the CLI's (model, method, seed, epochs,
    no_stabilizer, meta_train_backbone, shuffled_uploads, history_len, recent_len, metapatch_dim,
    teacher, distill_alpha, distill_weighting)."""
    from mntool.data import ProtocolConfig
    from mntool.data.datasets import load_dataset
    from mntool.meta import MetaConfig
    from mntool.metapatch import MetaPatchConfig
    from mntool.models import BackboneConfig
    from mntool.momodistill import DistillConfig
    from mntool.train import TrainConfig
    from mntool.train import train as run_train

    cfg = TrainConfig(
        model=options["model"],
        method=options["method"],
        seed=options["seed"],
        backbone=BackboneConfig(max_history=options["history_len"]),
    )
    if options.get("epochs") is not None:
        cfg.epochs = options["epochs"]
    if options.get("no_stabilizer"):
        cfg.meta = MetaConfig(gate=False, ema=False)
    cfg.meta_train_backbone = options["meta_train_backbone"]
    cfg.shuffled_uploads = options.get("shuffled_uploads", False)
    if options.get("metapatch_dim") is not None:
        cfg.metapatch = MetaPatchConfig(dim=options["metapatch_dim"])
    if options.get("teacher") is not None:
        cfg.distill = DistillConfig(
            teacher=str(options["teacher"]),
            alpha=DistillConfig.alpha if options.get("distill_alpha") is None else options["distill_alpha"],
            weighting=options.get("distill_weighting") or DistillConfig.weighting,
        )
    protocol = ProtocolConfig(history_len=options["history_len"], recent_len=options["recent_len"])
    dataset = load_dataset(data_dir, protocol, log=log)
    return run_train(dataset, cfg, out, init=init, progress=progress, log=log)


def evaluate(ck, data_dir) -> dict:
    from mntool.data.datasets import load_dataset
    from mntool.train import experiment_dataset, report_metrics

    dataset = load_dataset(data_dir, ck.protocol)
    if dataset.n_items != ck.n_items:
        raise MntoolError(f"{ck.path} was trained on {ck.n_items} items, the data has {dataset.n_items}")
    return report_metrics(ck.model, experiment_dataset(dataset, ck.config), ck.config, ck.meta, progress=False)


def metrics_table(metrics: dict) -> str:
    lines = [f"{'':12s}" + "".join(f"{m:>10s}" for m in METRICS)]
    for label, row in (
        ("valid", metrics["valid"]),
        ("test", metrics["test"]),
        ("popularity", metrics["popularity"]["test"]),
    ):
        lines.append(f"{label:12s}" + "".join(f"{row[m]:10.4f}" for m in METRICS))
    lines += _bucket_lines(metrics)
    return "\n".join(lines)


BUCKET_COLUMNS = (("valid", "uauc"), ("valid", "ndcg@10"), ("test", "uauc"), ("test", "ndcg@10"))


def _bucket_lines(metrics: dict) -> list[str]:
    """The long-tail block (docs/dccl.md, "Long-tail buckets"): users and UAUC / NDCG@10 per bucket
    and period; nothing for metrics without buckets (a metrics.json written before them)."""
    from mntool.data import BUCKETS

    if not all(b in metrics[s] for b in BUCKETS for s in ("valid", "test")):
        return []
    lines = [f"{'bucket':12s}{'users':>7s}" + "".join(f"{s + ' ' + m:>15s}" for s, m in BUCKET_COLUMNS)]
    for b in BUCKETS:
        values = [metrics[s][b][m] for s, m in BUCKET_COLUMNS]
        cells = "".join(f"{'-':>15s}" if v is None else f"{v:15.4f}" for v in values)
        lines.append(f"{b:12s}{metrics['test'][b]['users']:7d}" + cells)
    return lines


def load_checkpoint(path, config: dict):
    from mntool.train import load_recommender_checkpoint

    return load_recommender_checkpoint(path, config)


# ---- uploads ---------------------------------------------------------------------------------
def upload_limit(ck) -> int:
    """The most samples one device's upload may hold."""
    return int(ck.protocol["recent_len"])


def check_upload(ck, recent) -> np.ndarray:
    """(B, R) int64 from a list / array of item ids per device, most recent last; shorter uploads
    are left-padded with 0."""
    recent_len, n_items = upload_limit(ck), ck.n_items
    arr = np.asarray(recent)
    if arr.dtype == object or arr.ndim not in (1, 2):
        raise SamplesError(
            f"recent samples must be a list of item ids or a (devices, items) array, got shape {arr.shape}"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise SamplesError(f"recent samples must be integer item ids, got {arr.dtype}")
    arr = arr.astype(np.int64)
    arr = arr[None, :] if arr.ndim == 1 else arr
    if arr.shape[1] > recent_len:
        raise SamplesError(f"{arr.shape[1]} recent samples per device; this model takes at most {recent_len}")
    if arr.size and (arr.min() < 0 or arr.max() > n_items):
        bad = arr[(arr < 0) | (arr > n_items)][0]
        raise SamplesError(f"item id {bad} is outside the vocabulary 1..{n_items} (0 = padding)")
    if arr.shape[1] < recent_len:
        arr = np.concatenate([np.zeros((arr.shape[0], recent_len - arr.shape[1]), np.int64), arr], axis=1)
    return arr


def one_upload(raw) -> np.ndarray:
    """One device's upload as a batch of one (a 1-D list of item ids)."""
    arr = np.asarray(raw)
    if arr.ndim != 1:
        raise SamplesError(f"one device's recent samples are a 1-D list of item ids, got shape {arr.shape}")
    return arr[None, :] if arr.size else np.zeros((1, 0), np.int64)


def check_generates(ck) -> None:
    """Every recommender method generates from an upload (finetune runs its baseline in the cloud)."""


def generate(ck, batch: np.ndarray) -> dict:
    """{name: (B, *shape) tensor} for checked uploads `batch` under the checkpoint's method."""
    import torch

    from mntool.train import DEVICE_TRAINING, finetune_device_params, generate_device_params

    users = np.arange(len(batch))
    if ck.config.method == "metanetwork":
        return generate_device_params(ck.meta, users, batch).params
    if ck.config.method in DEVICE_TRAINING:  # metapatch: the device phase, on z alone
        # One device phase per upload: its sampled negatives are drawn per call, so a patch is a
        # function of its upload alone, whatever else shares its micro-batch.
        per_upload = [
            finetune_device_params(
                ck.model, users[:1], batch[i : i + 1], ck.config.finetune, 0, int(ck.protocol["history_len"])
            ).params
            for i in range(len(batch))
        ]
        return {n: torch.cat([params[n] for params in per_upload]) for n in per_upload[0]}
    static = dict(ck.model.named_parameters())  # static, momodistill: one model, the same for every device
    return {
        n: static[n].detach().unsqueeze(0).expand(len(batch), *static[n].shape).to(torch.float32) for n in ck.adaptive
    }


# ---- uploads over HTTP (`mntool serve`) -------------------------------------------------------


def parse_upload(ck, samples, limit: int) -> list[int]:
    """One device's upload from the JSON value of a request's `samples`,
    `{"items": [item ids, most recent last]}` with at most `limit` ids, left-padded with 0 to the
    model's upload length. Plain Python on the (at most recent_len) ids: per request, numpy calls
    cost more than they save. SamplesError (with `.code`) names the first problem."""
    items = samples.get("items") if type(samples) is dict else None
    if type(items) is not list:
        raise SamplesError(code="malformed_request", message='samples must be {"items": [item ids, most recent last]}')
    if len(items) > limit:
        raise SamplesError(code="too_many_samples", message=f"{len(items)} samples; this service takes at most {limit}")
    if not all(type(i) is int for i in items):
        raise SamplesError(code="bad_item_id", message="samples.items must hold integer item ids only")
    n_items = ck.n_items
    if items and (min(items) < 0 or max(items) > n_items):
        bad = next(i for i in items if not 0 <= i <= n_items)
        raise SamplesError(
            code="bad_item_id", message=f"item id {bad} is outside the vocabulary 1..{n_items} (0 = padding)"
        )
    return [0] * (upload_limit(ck) - len(items)) + items


def upload_schema(ck, limit: int) -> dict:
    """The JSON schema of a request's `samples` (the OpenAPI document's)."""
    return {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {
                "type": "array",
                "maxItems": limit,
                "description": "item ids, most recent last (0 = padding)",
                "items": {"type": "integer", "minimum": 0, "maximum": ck.n_items},
            }
        },
    }


def upload_body_bytes(limit: int) -> int:
    """The default request-body limit: a full upload (30 ids) is ~250 B."""
    return 16384
