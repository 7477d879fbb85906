"""Training and evaluation of the image classifiers on the per-device MNIST protocol (`img-v1`).

Methods, all scored by one path (`evaluate_split`: per-device adaptive tensors, or none):
`static` (one model for every device), `bn-adapt` and `tent` (label-free, from the device's
unlabelled upload; `mntool.vision.adapt`), `finetune` (the device's K uploaded images with their
labels) and `metanetwork` (the cloud generates each device's adaptive tensors from its unlabelled
upload through `ImageSetEncoder`). Epochs and the baselines' hyperparameters are chosen on the
validation period only; the test period is scored once. The checkpoint directory has the same
shape as the recommender's (`config.json` with `"task": "mnist"`, `weights.pt`, `metrics.json`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from device_runtime.errors import MntoolError
from mntool.meta import MetaConfig, MetaNetwork, per_sample_call
from mntool.vision import adapt
from mntool.vision.encoder import ImageSetEncoder
from mntool.vision.exits import EarlyExitCNN, exit_accuracies, train_exits
from mntool.vision.metrics import classification_metrics
from mntool.vision.models import CNN, CNNS, CNNConfig, build_cnn

TASK = "mnist"
METHODS = ("static", "bn-adapt", "tent", "finetune", "metanetwork", "exits")
LABEL_FREE = ("static", "bn-adapt", "tent", "metanetwork", "exits")  # methods a cloud can run on an unlabelled upload
CHECKPOINT_FORMAT = 1
EVAL_ROWS = 2048


@dataclass
class VisionTrainConfig:
    model: str = "lenet"
    method: str = "static"
    epochs: int = 15  # upper bound; early stopping on validation per-device mean accuracy
    patience: int = 3
    batch_size: int = 256  # images per step (static); metanetwork: blocks_per_batch cloud blocks
    blocks_per_batch: int = 8  # metanetwork: device requests (each with its own upload) per step
    lr: float = 2e-3
    meta_lr: float = 1e-3  # metanetwork on a frozen static backbone
    meta_train_backbone: bool = True  # backbone and generator together from scratch (False: frozen --init)
    shuffled_uploads: bool = False  # control: every device reads another device's upload
    encoder_width: int = 32
    encoder_probe: bool = True  # the encoder also reads the device model's predictions on the upload
    exits: bool = False  # the device model is an EarlyExitCNN (mntool.vision.exits); set by --method exits
    seed: int = 0
    backbone: CNNConfig = field(default_factory=CNNConfig)
    # a classifier's bias trains to near zero: the stabilizer's floor lets a device's label mix move it
    meta: MetaConfig = field(default_factory=lambda: MetaConfig(scale_floor=1.0))
    adapt: adapt.AdaptConfig = field(default_factory=adapt.AdaptConfig)

    def __post_init__(self) -> None:
        if self.model not in CNNS:
            raise MntoolError(f"unknown model {self.model!r} for --task {TASK}; choose one of {', '.join(CNNS)}")
        if self.method not in METHODS:
            raise MntoolError(f"unknown method {self.method!r} for --task {TASK}; choose one of {', '.join(METHODS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise MntoolError("epochs and batch size must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VisionTrainConfig:
        d = dict(d)
        d["backbone"] = CNNConfig(**d.get("backbone", {}))
        d["meta"] = MetaConfig(**d.get("meta", {}))
        d["adapt"] = adapt.AdaptConfig(**d.get("adapt", {}))
        return cls(**d)


def build_model(cfg: VisionTrainConfig):
    """The device model a checkpoint of `cfg` holds: a CNN, or an early-exit CNN around one."""
    model = build_cnn(cfg.model, cfg.backbone)
    return EarlyExitCNN(model) if cfg.exits else model


# ---- scoring ------------------------------------------------------------------------------------
@torch.no_grad()
def score_images(model: CNN, images: np.ndarray, device_index: np.ndarray, params: dict | None) -> np.ndarray:
    """Logits (N, 10) for images (N, 28, 28) uint8, row i with parameter set `device_index[i]`."""
    model.eval()
    out = []
    for i in range(0, len(images), EVAL_ROWS):
        x = adapt.images_tensor(images[i : i + EVAL_ROWS])
        if params is None:
            out.append(model(x))
        else:
            index = torch.from_numpy(np.ascontiguousarray(device_index[i : i + EVAL_ROWS]))
            out.append(per_sample_call(model, params, (x,), index))
    return torch.cat(out).numpy()


def evaluate_split(model: CNN, dataset, split: str, params: dict | None) -> dict:
    """Metrics of `split` with per-device adaptive tensors `params` ({name: (n_devices, *shape)},
    indexed by device id) or the static ones."""
    rows = dataset.split(split)
    logits = model.final_logits(torch.from_numpy(score_images(model, rows.images, rows.device, params))).numpy()
    return classification_metrics(rows.device, rows.label, logits)


# ---- the MetaNetwork -----------------------------------------------------------------------------
def build_metanetwork(model: CNN, cfg: VisionTrainConfig) -> MetaNetwork:
    encoder = ImageSetEncoder(cfg.meta.cond_dim, cfg.encoder_width, probe=model if cfg.encoder_probe else None)
    return MetaNetwork(model, model.adaptive_names(), encoder, cfg.meta)


def generate_params(meta: MetaNetwork, uploads: np.ndarray, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The generator's adaptive tensors (U, *shape) from uploads (U, K, 28, 28) uint8."""
    meta.eval()
    with torch.no_grad():
        out = []
        for i in range(0, len(uploads), 256):
            up = torch.from_numpy(np.ascontiguousarray(uploads[i : i + 256]))
            out.append(meta.adaptive_params(up, use_ema=use_ema))
    return {n: torch.cat([o[n] for o in out]) for n in out[0]}


def device_params(
    method: str, model: CNN, uploads: np.ndarray, cfg: VisionTrainConfig, meta=None, labels=None
) -> dict | None:
    """Per-device adaptive tensors for uploads (U, K, 28, 28) under `method` (None for static)."""
    if method in ("static", "exits"):
        return None
    if method == "metanetwork":
        return generate_params(meta, uploads)
    if method == "bn-adapt":
        return adapt.bn_stats_params(model, uploads, cfg.adapt.bn_prior)
    if method == "tent":
        return adapt.tent_params(model, uploads, cfg.adapt.bn_prior, cfg.adapt.tent_steps, cfg.adapt.tent_lr)
    if labels is None:
        raise MntoolError("finetune needs the uploaded images' labels: it runs on the device, not from an upload")
    return adapt.finetune_params(model, uploads, labels, cfg.adapt.finetune_steps, cfg.adapt.finetune_lr)


def upload_labels(dataset, split: str) -> np.ndarray:
    """Labels of each device's uploaded images (what only the phone knows; finetune reads them)."""
    return dataset.device_upload_labels(split)


# ---- training --------------------------------------------------------------------------------
def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, disable=not progress, leave=False)


def _fit(
    cfg: VisionTrainConfig, module, batches_fn, step_fn, valid_fn, name: str, progress: bool, start_valid=None
) -> dict:
    """Epochs of `step_fn` over `batches_fn(rng)`, early stopping on `valid_fn()` (per-device mean
    validation accuracy), best epoch restored."""
    rng = np.random.default_rng(cfg.seed)
    best, bad, log, steps = -1.0, 0, [], 0
    best_state = None
    if start_valid is not None:  # a frozen backbone with a zero gate starts as the static model
        best, best_state = start_valid, {k: v.detach().clone() for k, v in module.state_dict().items()}
    for epoch in range(1, cfg.epochs + 1):
        t0, losses, n = time.perf_counter(), [], 0
        batches = batches_fn(rng)
        with _bar(sum(len(b) for b in batches), f"{name} epoch {epoch}", progress) as bar:
            for rows in batches:
                module.train()
                losses.append(step_fn(rows))
                n += len(rows)
                steps += 1
                bar.update(len(rows))
        valid = valid_fn()
        seconds = time.perf_counter() - t0
        log.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "valid_device_mean_accuracy": valid,
                "seconds": seconds,
            }
        )
        if progress:
            tqdm.write(f"{name} epoch {epoch}: loss {np.mean(losses):.4f}  valid device-mean accuracy {valid:.4f}")
        if valid > best:
            best, bad = valid, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    module.load_state_dict(best_state)
    best_epoch = max(log, key=lambda e: e["valid_device_mean_accuracy"])["epoch"]
    if start_valid is not None and start_valid >= log[best_epoch - 1]["valid_device_mean_accuracy"]:
        best_epoch = 0
    return {"epochs": log, "best_epoch": best_epoch, "steps": steps, "start_valid": start_valid}


def train_static(dataset, cfg: VisionTrainConfig, progress: bool = True) -> tuple[CNN, dict]:
    torch.manual_seed(cfg.seed)
    model = build_cnn(cfg.model, cfg.backbone)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train = dataset.train

    def batches(rng):
        order = rng.permutation(len(train))
        return [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]

    def step(rows):
        x = adapt.images_tensor(train.images[rows])
        loss = F.cross_entropy(model(x), torch.from_numpy(train.label[rows]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def valid():
        return evaluate_split(model, dataset, "valid", None)["device_mean_accuracy"]

    return model, _fit(cfg, model, batches, step, valid, "static", progress)


def train_metanetwork(dataset, cfg: VisionTrainConfig, init: CNN, progress: bool = True) -> tuple[MetaNetwork, dict]:
    """The generator around `init`: trained together with it (`cfg.meta_train_backbone`, `init`
    freshly built) or on it frozen (`init` a trained static model). Each step takes
    `blocks_per_batch` cloud blocks: a block's images share the upload the device sent before it."""
    torch.manual_seed(cfg.seed + 1)
    meta = build_metanetwork(init, cfg)
    meta.backbone.requires_grad_(cfg.meta_train_backbone)
    lr = cfg.lr if cfg.meta_train_backbone else cfg.meta_lr
    opt = torch.optim.Adam([p for p in meta.parameters() if p.requires_grad], lr=lr)
    train = dataset.train
    by_block = np.argsort(train.block, kind="stable")
    starts = np.searchsorted(train.block[by_block], np.arange(len(dataset.train_uploads) + 1))
    valid_users, valid_uploads = dataset.device_upload("valid")

    def batches(rng):
        order = rng.permutation(len(dataset.train_uploads))
        out = []
        for i in range(0, len(order), cfg.blocks_per_batch):
            blocks = order[i : i + cfg.blocks_per_batch]
            out.append(np.concatenate([by_block[starts[b] : starts[b + 1]] for b in blocks]))
        return out

    def step(rows):
        # a frozen backbone is the deployed static model: its BatchNorm statistics stay as they are
        meta.backbone.train(cfg.meta_train_backbone)
        blocks, index = np.unique(train.block[rows], return_inverse=True)
        cond = torch.from_numpy(dataset.train_uploads[blocks])
        x = adapt.images_tensor(train.images[rows])
        logits = meta((x,), (cond,), torch.from_numpy(index.astype(np.int64)))
        loss = meta.backbone.loss(logits, torch.from_numpy(train.label[rows]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        meta.update_ema()
        return loss.item()

    def valid():
        params = _by_device(valid_users, generate_params(meta, valid_uploads), dataset.n_devices)
        return evaluate_split(meta.backbone, dataset, "valid", params)["device_mean_accuracy"]

    start = None
    if cfg.meta.gate and not cfg.meta_train_backbone:
        start = evaluate_split(meta.backbone, dataset, "valid", None)["device_mean_accuracy"]
    log = _fit(cfg, meta, batches, step, valid, "metanetwork", progress, start_valid=start)
    meta.backbone.requires_grad_(True)
    return meta, log


def _by_device(devices: np.ndarray, params: dict | None, n_devices: int) -> dict | None:
    """Params of devices `devices` re-indexed by device id (rows score with `params[name][device]`)."""
    if params is None:
        return None
    assert np.array_equal(devices, np.arange(n_devices)), "every device uploads once per period"
    return params


def select_baseline(model: CNN, dataset, cfg: VisionTrainConfig) -> dict:
    """Choose the baselines' hyperparameters on the validation period only (written into cfg.adapt)."""
    devices, uploads = dataset.device_upload("valid")
    labels = upload_labels(dataset, "valid")
    trials = {}

    def score(params):
        return evaluate_split(model, dataset, "valid", _by_device(devices, params, dataset.n_devices))[
            "device_mean_accuracy"
        ]

    if cfg.method in ("bn-adapt", "tent"):
        trials["bn_prior"] = {str(p): score(adapt.bn_stats_params(model, uploads, p)) for p in cfg.adapt.bn_priors}
        cfg.adapt.bn_prior = float(max(trials["bn_prior"], key=trials["bn_prior"].get))
    if cfg.method == "tent":
        trials["tent_lr"] = {
            str(lr): score(adapt.tent_params(model, uploads, cfg.adapt.bn_prior, cfg.adapt.tent_steps, lr))
            for lr in cfg.adapt.tent_lrs
        }
        cfg.adapt.tent_lr = float(max(trials["tent_lr"], key=trials["tent_lr"].get))
    if cfg.method == "finetune":
        trials["finetune_lr"] = {
            str(lr): score(adapt.finetune_params(model, uploads, labels, cfg.adapt.finetune_steps, lr))
            for lr in cfg.adapt.finetune_lrs
        }
        cfg.adapt.finetune_lr = float(max(trials["finetune_lr"], key=trials["finetune_lr"].get))
    return trials


def report_metrics(model: CNN, dataset, cfg: VisionTrainConfig, meta: MetaNetwork | None) -> dict:
    """Validation and test metrics under the run's method, with the per-device personalisation cost."""
    out = {}
    for split in ("valid", "test"):
        devices, uploads = dataset.device_upload(split)
        labels = upload_labels(dataset, split) if cfg.method == "finetune" else None
        t0 = time.perf_counter()
        params = device_params(cfg.method, model, uploads, cfg, meta, labels)
        seconds = time.perf_counter() - t0
        params = _by_device(devices, params, dataset.n_devices)
        out[split] = evaluate_split(model, dataset, split, params)
        if isinstance(model, EarlyExitCNN):  # every exit's per-device mean accuracy, the last = the above
            out[split]["exit_device_mean_accuracy"] = exit_accuracies(model, dataset, split, params)
        if cfg.method not in ("static", "exits"):
            out[split]["personalise_ms_per_device"] = 1e3 * seconds / len(devices)
    return out


# ---- checkpoints -----------------------------------------------------------------------------
@dataclass
class VisionCheckpoint:
    path: Path
    config: VisionTrainConfig
    protocol: dict
    model: CNN  # eval mode, static adaptive tensors
    meta: MetaNetwork | None
    task: str = TASK

    @property
    def adaptive(self) -> list[str]:
        return self.model.adaptive_names()

    @property
    def upload_len(self) -> int:
        return int(self.protocol["upload_len"])

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor]:
        """(images (batch, 1, 28, 28) float32 in [0, 1],): what export traces with."""
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(batch, 1, 28, 28, generator=g),)

    def export_inputs(
        self, batch: int | None = None, candidates: int | None = None, layout: str | None = None
    ) -> tuple:
        """(example inputs, weight map `form`): an image classifier declares no form."""
        if candidates or layout:
            raise MntoolError(
                "--candidates / --rows are for recommenders (ranking requests); an image model takes images"
            )
        return self.example_inputs(batch=batch or 1), None


def save_checkpoint(out: Path, cfg: VisionTrainConfig, dataset, module: torch.nn.Module, metrics: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format": CHECKPOINT_FORMAT,
        "task": TASK,
        "protocol_version": dataset.protocol_version,
        "protocol": asdict(dataset.config),
        "train": cfg.to_dict(),
    }
    torch.save(module.state_dict(), out / "weights.pt")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out


def load_checkpoint(path: Path, config: dict) -> VisionCheckpoint:
    """Rebuild a checkpoint from its directory and parsed config.json (see `mntool.train.load_checkpoint`)."""
    from mntool.data.images import IMAGE_PROTOCOL_VERSION

    if config.get("protocol_version") != IMAGE_PROTOCOL_VERSION:
        raise MntoolError(
            f"{path} was trained under image protocol {config.get('protocol_version')!r}, this mntool uses "
            f"{IMAGE_PROTOCOL_VERSION!r}; retrain it"
        )
    cfg = VisionTrainConfig.from_dict(config["train"])
    model = build_model(cfg)
    module: torch.nn.Module = model
    meta = None
    if cfg.method == "metanetwork":
        meta = build_metanetwork(model, cfg)
        module = meta
    try:
        module.load_state_dict(torch.load(path / "weights.pt", map_location="cpu", weights_only=True))
    except FileNotFoundError:
        raise MntoolError(f"{path}: weights.pt is missing") from None
    except (RuntimeError, KeyError, EOFError) as err:
        raise MntoolError(f"{path}: weights.pt does not match config.json ({str(err).splitlines()[0]})") from None
    model.eval()
    if meta is not None:
        meta.eval()
    return VisionCheckpoint(path, cfg, config["protocol"], model, meta)


# ---- the entry point the CLI calls -------------------------------------------------------------
def experiment_dataset(dataset, cfg: VisionTrainConfig):
    return dataset.with_shuffled_uploads(cfg.seed) if cfg.shuffled_uploads else dataset


def train(
    dataset,
    cfg: VisionTrainConfig,
    out: Path,
    init: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train `cfg.method` on an `ImageDeviceDataset`, write a checkpoint to `out`, return its metrics.

    `metanetwork` trains backbone and generator together from scratch unless given a static
    `init` (or `cfg.meta_train_backbone` is False): then the generator learns on that model, frozen.
    `bn-adapt`, `tent` and `finetune` start from a static model: `init`, or one trained first with
    the same seed into `out/static/`; their hyperparameters are chosen on validation."""
    out = Path(out)
    cfg = replace(cfg, adapt=replace(cfg.adapt))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    dataset = experiment_dataset(dataset, cfg)
    if cfg.method == "metanetwork":
        cfg.meta_train_backbone = cfg.meta_train_backbone and init is None
    if cfg.method == "static" or (cfg.method == "metanetwork" and cfg.meta_train_backbone):
        if cfg.method == "static":
            model, train_log = train_static(dataset, cfg, progress)
            meta = None
        else:
            torch.manual_seed(cfg.seed)
            model = build_cnn(cfg.model, cfg.backbone)
            meta, train_log = train_metanetwork(dataset, cfg, model, progress)
        return _score_and_save(out, cfg, dataset, model, meta, train_log)
    if init is None:
        log(f"{cfg.method} starts from a static {cfg.model}: training it first into {out / 'static'}")
        static_cfg = VisionTrainConfig.from_dict({**cfg.to_dict(), "method": "static", "shuffled_uploads": False})
        train(dataset, static_cfg, out / "static", progress=progress, log=log)
        init = out / "static"
    from mntool.train import load_checkpoint as load_any

    base = load_any(init)
    allowed = ("static", "exits") if cfg.method == "metanetwork" else ("static",)
    if getattr(base, "task", None) != TASK or base.config.method not in allowed or base.config.model != cfg.model:
        kinds = " or ".join(f"an {m}" if m == "exits" else f"a {m}" for m in allowed)
        raise MntoolError(f"--init {init} must be {kinds} {cfg.model} checkpoint of --task {TASK}")
    if base.protocol != asdict(dataset.config):
        raise MntoolError(f"--init {init} was trained under another image protocol configuration; use the same")
    cfg.backbone = base.config.backbone
    cfg.exits = base.config.exits
    model, meta, train_log = base.model, None, {}
    if cfg.method == "exits":
        model, train_log = train_exits(
            model, dataset, epochs=cfg.epochs, patience=cfg.patience, lr=cfg.lr, seed=cfg.seed
        )
        cfg.exits = True
    elif cfg.method == "metanetwork":
        meta, train_log = train_metanetwork(dataset, cfg, model, progress)
    else:
        train_log = {"selection": select_baseline(model, dataset, cfg)}
    return _score_and_save(out, cfg, dataset, model, meta, train_log, init=str(init))


def _score_and_save(out, cfg, dataset, model, meta, train_log, **extra) -> dict:
    metrics = {
        "task": TASK,
        "method": cfg.method,
        "model": cfg.model,
        "seed": cfg.seed,
        **extra,
        "train": train_log,
        **report_metrics(model, dataset, cfg, meta),
    }
    save_checkpoint(out, cfg, dataset, meta if meta is not None else model, metrics)
    return metrics
