"""`mntool demo --task mnist`: the whole loop on images. MNIST under the per-device shift protocol
(img-v1) -> a static CNN, BN adaptation of it and a MetaNetwork on it -> TFLite/ONNX/Core ML
artifacts -> a signed patch per device, generated from the device's unlabelled upload for the test
period -> per-device accuracy from the compiled, patched models, parity with PyTorch -> benchmarks
-> a report (report.md, report.json, PNGs).

BN adaptation (the label-free baseline) ships the same way as MetaNetwork: its re-estimated
statistics are written as the BatchNorm affines, so each device's result is a patch of the static
artifact. What does not depend on the task (stage log, caching, the output directory, the device
side, keys, export and benchmark stages, the task-free report tables) is `mntool.demo`'s and
`mntool.report`'s; this module holds what images change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mntool.demo import (
    MARKER,
    PARITY_ATOL,
    PARITY_RTOL,
    RUN_TARGETS,
    DemoError,
    DeviceModel,
    StageLog,
    _key,
    benchmark_runtimes,
    demo_keys,
    export_cached,
    prepare_out_dir,
    run_cached,
    versions,
)

TASK = "mnist"
DEMO_FORMAT = 1
METHODS = ("static", "bn-adapt", "metanetwork")  # what the report compares, on the compiled models
ADAPTED = ("bn-adapt", "metanetwork")  # the methods that ship as a patch per device
LABELS = {"static": "static", "bn-adapt": "BN adaptation", "metanetwork": "MetaNetwork"}
METRICS = ("device_mean_accuracy", "accuracy", "macro_f1", "nll", "ece")
METRIC_LABELS = {
    "device_mean_accuracy": "per-device mean acc",
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "nll": "NLL",
    "ece": "ECE",
}
STAGES = (
    "data",
    "train static",
    "train bn-adapt",
    "train metanetwork",
    "export",
    "personalise and score",
    "benchmark",
)
ACCURACY_PLOT = "accuracy_per_device.png"
LATENCY_PLOT = "latency.png"


@dataclass(frozen=True)
class VisionDemoConfig:
    model: str = "lenet"  # the device CNN (lenet, mobilenet)
    devices: int = 100  # simulated phones under img-v1; every one is personalised and scored on the compiled models
    static_epochs: int = 6  # static training epochs at most (early stopping on validation ends sooner)
    metanetwork_epochs: int = 3  # MetaNetwork epochs at most, on the static model
    batch: int = 1  # images per compiled-model call: a phone classifies what it was just shown
    bench_runs: int = 500  # timed steady-state inferences per variant
    bench_warmup: int = 50  # untimed inferences before timing
    bench_loads: int = 20  # timed fresh loads / swaps per variant
    threads: int = 2  # PyTorch threads for training and reference scoring (this targets 2-core hosts)
    seed: int = 0  # training seed (the protocol's own seed stays img-v1's)

    def __post_init__(self) -> None:
        from mntool.vision.models import CNNS

        if self.model not in CNNS:
            raise DemoError(f"unknown model {self.model!r} for --task {TASK}; choose one of {', '.join(CNNS)}")
        if self.devices < 2:
            raise DemoError(f"devices must be >= 2, got {self.devices}")
        for name in ("static_epochs", "metanetwork_epochs", "batch", "bench_runs", "bench_loads", "threads"):
            if getattr(self, name) < 1:
                raise DemoError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bench_warmup < 0:
            raise DemoError(f"bench_warmup must be >= 0, got {self.bench_warmup}")

    @classmethod
    def quick(cls, **changes) -> VisionDemoConfig:
        """Smoke-test settings: 12 devices, one epoch each, short benchmarks."""
        return cls(
            **{
                "devices": 12,
                "static_epochs": 1,
                "metanetwork_epochs": 1,
                "bench_runs": 60,
                "bench_warmup": 10,
                "bench_loads": 3,
                **changes,
            }
        )


# ---- stages -------------------------------------------------------------------------------------
def load_data(data_dir: Path | None, cfg: VisionDemoConfig, log: Callable[[str], None]):
    """img-v1 over MNIST (the fetched cache unless `data_dir`) with `cfg.devices` devices."""
    from mntool.data.images import ImageProtocolConfig, load_image_dataset

    return load_image_dataset(data_dir, ImageProtocolConfig(n_devices=cfg.devices), log=log)


def dataset_key(dataset) -> str:
    """Identifies the built dataset by its content."""
    h = hashlib.sha256()
    for split in ("train", "valid", "test"):
        rows = dataset.split(split)
        for a in (rows.images, rows.label, rows.device, rows.block):
            h.update(np.ascontiguousarray(a).tobytes())
    for a in (dataset.train_uploads, dataset.valid_uploads, dataset.test_uploads):
        h.update(np.ascontiguousarray(a).tobytes())
    return _key(arrays=h.hexdigest(), protocol=asdict(dataset.config), version=dataset.protocol_version)


def train_cached(
    dataset,
    data_key: str,
    method: str,
    epochs: int,
    cfg: VisionDemoConfig,
    out: Path,
    fresh: bool,
    progress: bool,
    record: dict,
    init: Path | None = None,
    init_key: str = "",
) -> tuple[Path, str]:
    """A checkpoint of `method` in `out`, trained unless one from the same inputs is there."""
    from mntool.vision.train import VisionTrainConfig, train

    train_cfg = VisionTrainConfig(model=cfg.model, method=method, epochs=epochs, seed=cfg.seed)
    key = _key(task=TASK, train=train_cfg.to_dict(), data=data_key, init=init_key)
    metrics = run_cached(
        out,
        key,
        fresh,
        record,
        lambda: train(dataset, train_cfg, out, init=init, progress=progress, log=lambda s: None),
    )
    done = (
        f"{len(metrics['train']['epochs'])} epoch(s)"
        if "epochs" in metrics["train"]
        else "hyperparameters chosen on validation"
    )
    record["note"] = (
        f"{out}: {done}, test per-device mean accuracy {metrics['test']['device_mean_accuracy']:.4f} "
        f"(all {dataset.n_devices} devices, PyTorch)"
    )
    return out, key


def score_compiled(runner, images: np.ndarray, batch: int) -> np.ndarray:
    """Logits (N, 10) of uint8 images (N, 28, 28) from a compiled model with a fixed batch: chunks of
    `batch` images, the last one padded by repeating its last image (padding is dropped)."""
    from mntool.vision.adapt import images_tensor

    x = images_tensor(images).numpy()
    out = np.empty((len(x), 10), dtype=np.float32)
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out[i : i + n] = runner.run({"images": chunk})["logits"][:n]
    return out


def float32_floor(model, images: np.ndarray) -> float:
    """Max abs difference between PyTorch's float32 logits and the same model's in float64: how
    far float32 arithmetic alone moves these logits (what no float32 runtime can beat)."""
    import copy

    import torch

    from mntool.vision.adapt import images_tensor
    from mntool.vision.train import EVAL_ROWS, score_images

    f32 = score_images(model, images, np.zeros(len(images), np.int64), None)
    exact = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        f64 = torch.cat(
            [exact(images_tensor(images[i : i + EVAL_ROWS]).double()) for i in range(0, len(images), EVAL_ROWS)]
        )
    return float(np.abs(f32 - f64.numpy()).max())


def parity_of(compiled: np.ndarray, reference: np.ndarray) -> dict:
    """How far compiled logits (N, classes) are from PyTorch's: the max abs error, how many logits
    exceed PARITY_ATOL, and whether every one is within PARITY_ATOL + PARITY_RTOL x the largest
    |logit| of its image (float32 rounding grows with the magnitudes summed, not with the result)."""
    error = np.abs(compiled.astype(np.float64) - reference)
    scale = np.abs(reference).max(axis=1, keepdims=True)
    return {
        "max_abs_error": float(error.max()),
        "over_atol": int((error > PARITY_ATOL).sum()),
        "logits": int(error.size),
        "within_rounding": bool(np.all(error <= PARITY_ATOL + PARITY_RTOL * scale)),
    }


def per_device_accuracy(index: np.ndarray, label: np.ndarray, logits: np.ndarray, n: int) -> list[float]:
    """Accuracy of each device slot 0..n-1 (rows mapped to slots by `index`)."""
    correct = np.bincount(index, weights=(logits.argmax(1) == label).astype(np.float64), minlength=n)
    return (correct / np.bincount(index, minlength=n)).tolist()


def personalise_and_score(
    dataset,
    checkpoints: dict[str, Path],
    artifacts: dict[str, dict[str, Path]],
    cfg: VisionDemoConfig,
    out: Path,
    progress: bool,
    log: Callable[[str], None],
) -> dict:
    """For every device: generate its parameters from its unlabelled test-period upload (cloud:
    BN adaptation and MetaNetwork), build a signed patch per artifact (cloud), verify and apply it
    in memory and open a runner on the patched model (device), and classify the device's test
    images; the static artifact classifies them unpatched. BN adaptation patches the static
    artifact; MetaNetwork its own. PyTorch scores the same images with the same parameters."""
    import torch

    from mntool.generate import Generator
    from mntool.patches import build_patch
    from mntool.train import load_checkpoint
    from mntool.vision.metrics import classification_metrics
    from mntool.vision.train import score_images

    devices, uploads = dataset.device_upload("test")
    test = dataset.test
    index = np.searchsorted(devices, test.device)  # row -> device slot; rows are sorted by device
    starts = np.searchsorted(index, np.arange(len(devices) + 1))
    log(
        f"{len(devices)} devices, {len(test):,} test images; each device uploads its last {uploads.shape[1]} "
        "unlabelled images before the test period"
    )
    signing_key, verify_key = demo_keys(out / "keys" / "demo")
    clock = time.perf_counter

    params, generate_ms = {}, {}
    for method in ADAPTED:  # cloud: {name: (devices, *shape)} from the uploads
        generator = Generator.load(checkpoints[method])
        t0 = clock()
        params[method] = generator.generate_batch(uploads)
        generate_ms[method] = (clock() - t0) * 1e3 / len(devices)

    static = {t: DeviceModel.load(artifacts["static"][t]) for t in RUN_TARGETS}
    shipped = {"bn-adapt": static, "metanetwork": {t: DeviceModel.load(a) for t, a in artifacts["metanetwork"].items()}}
    compiled = {m: {t: np.zeros((len(test), 10), np.float32) for t in RUN_TARGETS} for m in METHODS}
    static_runners = {t: model.open() for t, model in static.items()}
    timings: dict[str, list[float]] = {"build_patch_ms": [], "apply_ms": [], "open_ms": []}
    patch_bytes, example_patches = {}, {}  # MetaNetwork's; the first device's are kept for `mntool bench`
    coreml = {
        "devices": len(devices),
        "exact": True,
        "max_abs_error": 0.0,
        "method": "coremltools read-back of each device's patched package (Core ML prediction needs macOS)",
    }
    patches_dir = out / "patches"
    shutil.rmtree(patches_dir, ignore_errors=True)
    patches_dir.mkdir()
    with (
        tempfile.TemporaryDirectory(prefix=".read-back-", dir=out) as workdir,
        tqdm(total=len(devices), desc="devices", unit="dev", disable=not progress, leave=False) as bar,
    ):
        for i, device in enumerate(devices):
            rows = slice(starts[i], starts[i + 1])
            for target, runner in static_runners.items():
                compiled["static"][target][rows] = score_compiled(runner, test.images[rows], cfg.batch)
            for method in ADAPTED:
                device_params = {name: p[i] for name, p in params[method].items()}
                for target, model in shipped[method].items():
                    c0 = clock()
                    patch = build_patch(model.weight_map, device_params, signing_key)  # cloud
                    c1 = clock()
                    patched = model.apply(patch, verify_key)  # device
                    timings["build_patch_ms"].append((c1 - c0) * 1e3)
                    timings["apply_ms"].append((clock() - c1) * 1e3)
                    if method == "metanetwork":
                        patch_bytes[target] = len(patch)
                        if i == 0:
                            example_patches[target] = str(patches_dir / f"{target}-device{int(device)}.mnpatch")
                            Path(example_patches[target]).write_bytes(patch)
                    if target == "coreml":
                        read = model.read_back(patched, Path(workdir))
                        for name, value in device_params.items():
                            coreml["exact"] &= bool(np.array_equal(read[name], value))
                            coreml["max_abs_error"] = max(
                                coreml["max_abs_error"], float(np.abs(read[name] - value).max())
                            )
                        continue
                    c2 = clock()
                    with model.open(patched) as runner:
                        timings["open_ms"].append((clock() - c2) * 1e3)
                        compiled[method][target][rows] = score_compiled(runner, test.images[rows], cfg.batch)
            bar.update(1)
    for runner in static_runners.values():
        runner.close()

    # PyTorch on the same images: the static model, BN adaptation's (the same model) and the
    # MetaNetwork backbone with each device's parameters, and that backbone unpatched.
    torch.set_num_threads(cfg.threads)
    models = {m: load_checkpoint(checkpoints[m]).model for m in METHODS}

    def reference(method: str, p: dict | None) -> np.ndarray:
        tensors = None if p is None else {n: torch.from_numpy(a) for n, a in p.items()}
        return score_images(models[method], test.images, index, tensors)

    pytorch = {m: reference(m, params.get(m)) for m in METHODS}
    unpatched = reference("metanetwork", None)

    def metrics_of(logits: np.ndarray) -> dict:
        return classification_metrics(test.device, test.label, logits)

    metrics = {
        m: {**{t: metrics_of(s) for t, s in compiled[m].items()}, "pytorch": metrics_of(pytorch[m])} for m in METHODS
    }
    metrics["metanetwork_unpatched"] = {"pytorch": metrics_of(unpatched)}
    detail = {m: {t: parity_of(s, pytorch[m]) for t, s in compiled[m].items()} for m in METHODS}
    n = len(devices)
    return {
        "sample": {
            "devices": n,
            "test_images": len(test),
            "images_per_device": int(np.median(np.diff(starts))),
            "upload_len": int(uploads.shape[1]),
        },
        "metrics": metrics,
        "parity": {
            "atol": PARITY_ATOL,
            "rtol": PARITY_RTOL,
            **{m: {t: d["max_abs_error"] for t, d in detail[m].items()} for m in METHODS},
            "detail": detail,
            "max_abs_logit": float(max(np.abs(p).max() for p in pytorch.values())),
            "float32_floor": float32_floor(models["static"], test.images),
        },
        "prediction_mismatches": {
            m: {t: int((s.argmax(1) != pytorch[m].argmax(1)).sum()) for t, s in compiled[m].items()} for m in METHODS
        },
        "coreml": coreml,
        "patch_bytes": patch_bytes,
        "example_patches": example_patches,
        "personalise": {
            "generate_ms_per_device": generate_ms,
            **{k: float(np.median(v)) for k, v in timings.items()},
        },
        "per_device": {
            "device": [int(d) for d in devices],
            "images_per_device": int(np.median(np.diff(starts))),
            **{f"accuracy_{m}": per_device_accuracy(index, test.label, compiled[m]["tflite"], n) for m in METHODS},
            "accuracy_metanetwork_pytorch": per_device_accuracy(index, test.label, pytorch["metanetwork"], n),
        },
    }


def write_bench_inputs(dataset, cfg: VisionDemoConfig, path: Path) -> Path:
    """The first device's first test images (one batch) as the benchmark's inputs."""
    from mntool.vision.adapt import images_tensor

    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images_tensor(dataset.test.images[: cfg.batch]).numpy())
    return path


# ---- report -------------------------------------------------------------------------------------
def checks(result: dict) -> list[dict]:
    """What the demo promises, each with whether this run kept it and the figure behind it."""
    from mntool.report import TARGET_LABELS

    out = []
    parity = result["parity"]
    atol, rtol, detail = parity["atol"], parity["rtol"], parity["detail"]
    for target in RUN_TARGETS:
        errors = {m: parity[m][target] for m in METHODS}
        over = sum(detail[m][target]["over_atol"] for m in METHODS)
        logits = sum(detail[m][target]["logits"] for m in METHODS)
        strict = max(errors.values()) <= atol
        out.append(
            {
                "check": f"{TARGET_LABELS[target]} models, patched per device, match PyTorch (max abs logit error "
                f"<= {atol:g}"
                + ("" if strict else f", or within float32 rounding: <= {atol:g} + {rtol:g} max|logit| of the image")
                + ")",
                "ok": strict or all(detail[m][target]["within_rounding"] for m in METHODS),
                "detail": "max abs error "
                + ", ".join(f"{LABELS[m]} {e:.1e}" for m, e in errors.items())
                + (
                    ""
                    if strict
                    else f"; {over} of {logits:,} logits above {atol:g} (largest |logit| {parity['max_abs_logit']:.0f}; "
                    f"PyTorch float32 vs float64 on the static model: {parity['float32_floor']:.1e})"
                ),
            }
        )
    wrong = sum(n for m in METHODS for n in result["prediction_mismatches"][m].values())
    out.append(
        {
            "check": "Compiled models predict what PyTorch predicts (so their accuracies are PyTorch's)",
            "ok": wrong == 0,
            "detail": f"{wrong} of {len(METHODS) * len(RUN_TARGETS) * result['sample']['test_images']:,} predictions differ",
        }
    )
    coreml = result["coreml"]
    out.append(
        {
            "check": "Core ML patched weights read back exactly (coremltools; no Core ML runtime on Linux)",
            "ok": coreml["exact"],
            "detail": f"{coreml['devices']} devices, max abs error {coreml['max_abs_error']:.1e}",
        }
    )
    m = result["metrics"]
    acc = {k: m[k]["tflite"]["device_mean_accuracy"] for k in METHODS}
    for base in ("static", "bn-adapt"):
        out.append(
            {
                "check": f"MetaNetwork ahead of {LABELS[base]} on the compiled models (per-device mean accuracy)",
                "ok": acc["metanetwork"] > acc[base],
                "detail": f"{acc[base]:.4f} -> {acc['metanetwork']:.4f} ({acc['metanetwork'] - acc[base]:+.4f}, TFLite)",
            }
        )
    return out


def plot_device_accuracy(per_device: dict, path: Path) -> Path:
    """Per-device test accuracy, static vs each adapted method (compiled TFLite outputs), with the
    diagonal; and the distribution of per-device gains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    static = np.asarray(per_device["accuracy_static"])
    colors = {"bn-adapt": "tab:orange", "metanetwork": "tab:blue"}
    markers = {"bn-adapt": "s", "metanetwork": "o"}
    plt.rcParams.update({"font.size": 11})
    fig, (scatter, hist) = plt.subplots(1, 2, figsize=(13, 5.8), gridspec_kw={"width_ratios": [1.15, 1]})
    values = [static] + [np.asarray(per_device[f"accuracy_{m}"]) for m in ADAPTED]
    low = max(0.0, np.floor(min(v.min() for v in values) * 20) / 20 - 0.02)
    scatter.plot([low, 1], [low, 1], color="black", lw=1, ls="--", label="no change (y = x)")
    gains = {}
    for method in ADAPTED:
        acc = np.asarray(per_device[f"accuracy_{method}"])
        gains[method] = acc - static
        better, worse = int((gains[method] > 0).sum()), int((gains[method] < 0).sum())
        scatter.scatter(
            static,
            acc,
            s=20,
            alpha=0.6,
            marker=markers[method],
            color=colors[method],
            label=f"{LABELS[method]}: mean {static.mean():.4f} -> {acc.mean():.4f} ({better} better, {worse} worse)",
        )
    scatter.set_xlim(low, 1.005)
    scatter.set_ylim(low, 1.005)
    scatter.set_aspect("equal")
    scatter.set_xlabel("static model: device's accuracy on its test period")
    scatter.set_ylabel("adapted (patched model): device's accuracy")
    scatter.set_title("Each point is one device")
    scatter.legend(loc="lower right", fontsize=8)
    scatter.grid(alpha=0.3)

    step = 1 / per_device["images_per_device"]  # a device's accuracy moves in steps of one image
    reach = max(max(abs(g).max() for g in gains.values()), 2 * step)
    bins = (np.arange(-np.ceil(reach / step) - 1, np.ceil(reach / step) + 1) + 0.5) * step  # one bin per step
    counts = hist.hist(
        list(gains.values()),
        bins=bins,
        color=[colors[m] for m in gains],
        alpha=0.75,
        label=[LABELS[m] for m in gains],
    )[0]
    counts = float(np.max(counts))
    for method, gain in gains.items():
        hist.axvline(gain.mean(), color=colors[method], lw=2, label=f"{LABELS[method]} mean gain {gain.mean():+.4f}")
    hist.axvline(0, color="black", lw=1, ls="--")
    hist.set_xlabel("per-device accuracy gain over static")
    hist.set_ylabel("number of devices")
    hist.set_ylim(0, max(1.0, 1.1 * counts))
    hist.xaxis.set_major_locator(MaxNLocator(7))
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    hist.set_title("Distribution of per-device gains")
    hist.legend(fontsize=8)
    hist.grid(alpha=0.3)
    fig.suptitle(
        f"Per-device accuracy on the compiled TFLite models: static vs patched ({len(static)} devices)", fontsize=13
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def metrics_table(result: dict) -> str:
    from mntool.report import TARGET_LABELS, _table

    m = result["metrics"]
    rows = []
    for method in METHODS:
        label = LABELS[method] + ("" if method == "static" else " (patched per device)")
        for target in (*RUN_TARGETS, "pytorch"):
            bold = "**" if target == "tflite" else ""
            rows.append(
                [f"{bold}{label}{bold}", TARGET_LABELS[target]]
                + [f"{bold}{m[method][target][k]:.4f}{bold}" for k in METRICS]
            )
    rows.append(
        ["MetaNetwork backbone, unpatched", "PyTorch"]
        + [f"{m['metanetwork_unpatched']['pytorch'][k]:.4f}" for k in METRICS]
    )
    for method in ADAPTED:
        rows.append(
            [f"**gain** ({LABELS[method]} - static)", TARGET_LABELS["tflite"]]
            + [f"**{m[method]['tflite'][k] - m['static']['tflite'][k]:+.4f}**" for k in METRICS]
        )
    return _table(["model", "scored by", *(METRIC_LABELS[k] for k in METRICS)], rows)


def training_table(result: dict) -> str:
    from mntool.report import _table

    rows = []
    for method in METHODS:
        t = result["training"][method]
        cost = t["test"].get("personalise_ms_per_device")
        rows.append(
            [
                LABELS[method],
                f"{t['valid']['device_mean_accuracy']:.4f}",
                f"{t['test']['device_mean_accuracy']:.4f}",
                f"{t['test']['accuracy']:.4f}",
                "-" if cost is None else f"{cost:.2f} ms",
            ]
        )
    return _table(
        [
            "method (PyTorch, from training)",
            "valid per-device mean acc",
            "test per-device mean acc",
            "test accuracy",
            "personalisation per device",
        ],
        rows,
    )


def parity_table(result: dict) -> str:
    from mntool.report import TARGET_LABELS, _table

    p, atol, rtol = result["parity"], result["parity"]["atol"], result["parity"]["rtol"]
    rows = []
    for method in METHODS:
        label = LABELS[method] + ("" if method == "static" else ", patched per device")
        for target in RUN_TARGETS:
            e, d = p[method][target], p["detail"][method][target]
            verdict = (
                "ok"
                if e <= atol
                else f"ok within float32 rounding ({atol:g} + {rtol:g} max abs logit of the image)"
                if d["within_rounding"]
                else f"**FAILS** (> {atol:g} + {rtol:g} max abs logit of the image)"
            )
            rows.append(
                [
                    label,
                    TARGET_LABELS[target],
                    f"{e:.2e}",
                    f"{d['over_atol']} of {d['logits']:,}",
                    str(result["prediction_mismatches"][method][target]),
                    verdict,
                ]
            )
    c = result["coreml"]
    rows.append(
        [
            "MetaNetwork, patched per device",
            "Core ML (read-back)",
            f"{c['max_abs_error']:.2e} (weights)",
            "-",
            "-",
            "ok: bit-exact" if c["exact"] else "**FAILS**",
        ]
    )
    return _table(
        [
            "model",
            "target",
            "max abs logit error vs PyTorch",
            f"logits above {atol:g}",
            "predictions differing",
            f"within {atol:g}",
        ],
        rows,
    )


def parity_note(result: dict) -> str:
    p = result["parity"]
    return (
        f"The largest |logit| is {p['max_abs_logit']:.1f}; float32 resolves it to "
        f"{np.spacing(np.float32(p['max_abs_logit'])):.1e}, and PyTorch's own float32 logits differ from the same "
        f"static model's float64 ones by up to {p['float32_floor']:.1e}. A compiled runtime sums in its own order "
        f"(LiteRT's XNNPACK kernels, ONNX Runtime's MLAS), so on a trained model a few logits can land more than "
        f"{p['atol']:g} from PyTorch's while every one stays within a few float32 units of PyTorch's value "
        f"({p['atol']:g} + {p['rtol']:g} x the image's largest abs logit); the predictions column says whether any "
        "class changed."
    )


def unpatched_note(result: dict) -> str:
    """What the per-device patches add on top of the MetaNetwork artifact as shipped."""
    m = result["metrics"]
    key = "device_mean_accuracy"
    shipped, patched = m["metanetwork_unpatched"]["pytorch"][key], m["metanetwork"]["pytorch"][key]
    static = m["static"]["pytorch"][key]
    same = m["metanetwork_unpatched"]["pytorch"] == m["static"]["pytorch"]
    why = (
        "the generator trained on the static CNN frozen, so before a patch it is the static model"
        if same
        else "the generator trained on the static CNN with its weights frozen, but the backbone's BatchNorm "
        "running statistics moved during that training, so the two artifacts differ"
    )
    return (
        f"The unpatched row is the MetaNetwork artifact as shipped, before any patch: per-device mean accuracy "
        f"{shipped:.4f} against {static:.4f} for static ({why}). The per-device patches move it by "
        f"{patched - shipped:+.4f} to {patched:.4f} (PyTorch figures)."
    )


def render_markdown(result: dict) -> str:
    from mntool.report import _ms, duration, latency_table, size_table, stage_table

    cfg, sample, data = result["config"], result["sample"], result["data"]
    bench = result["bench"]
    host = next(iter(bench.values()))["host"]
    personalise = result["personalise"]
    ok = all(c["ok"] for c in result["checks"])
    mode = "quick (smoke-test settings, not representative)" if result["quick"] else "full"
    epochs = {k: len(v["train"].get("epochs", [])) for k, v in result["training"].items()}
    example = {t: Path(p).name for t, p in result["example_patches"].items()}
    gen = personalise["generate_ms_per_device"]
    adaptive = result["artifacts"]["metanetwork"]["tflite"]["adaptive_tensors"]
    lines = [
        "# mntool demo report: images",
        "",
        f"MNIST under the per-device shift protocol {data['protocol_version']} ({sample['devices']} simulated phones), "
        f"{cfg['model']} device model, {mode} run of `mntool demo --task mnist` on {result['created']} "
        f"({duration(result)}; {host.get('cpu', 'unknown CPU')}, {host.get('cpu_count')} CPUs). "
        "The cloud trained a static CNN, chose BN adaptation's prior on validation, and trained a MetaNetwork on the "
        f"static CNN; the device models were compiled to TFLite, ONNX and Core ML with their {adaptive} adaptive tensors "
        "(the BatchNorm affines inside the feature extractor, and the classifier head) as swappable buffers. For each "
        f"device the cloud read its last {sample['upload_len']} unlabelled images before the test period, generated its "
        "adaptive tensors (MetaNetwork; BN adaptation re-estimates the BatchNorm statistics and writes them as the "
        "affines, so it ships as a patch of the static artifact), packed them into a signed patch, and the device side "
        f"verified the patch and wrote it into the compiled model, which then classified the device's "
        f"{sample['images_per_device']} held-out test images. Every figure below comes from those compiled models "
        "unless it says PyTorch.",
        "",
        f"Host load average {result['load_average_at_start']:.1f} at the start"
        + (
            " (other jobs were running: every time below includes their interference)"
            if result["load_average_at_start"] > 0.5 * host.get("cpu_count", 1)
            else ""
        )
        + ". Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + ".",
        "",
        "## At a glance",
        "",
        *[f"- {'✅' if c['ok'] else '❌'} {c['check']}: {c['detail']}" for c in result["checks"]],
        "",
        "All checks passed." if ok else "**Some checks failed** (see above).",
        "",
        f"## Accuracy on the test period ({sample['devices']} devices, {sample['test_images']:,} images, compiled models)",
        "",
        "Static scores come from the static artifact; BN adaptation's from the same artifact patched with each device's "
        "re-estimated affines; MetaNetwork's from the MetaNetwork artifact patched with each device's generated tensors. "
        "The headline is the per-device mean accuracy (each device counts once). The PyTorch rows score the same images "
        "with the same parameters.",
        "",
        metrics_table(result),
        "",
        unpatched_note(result),
        "",
        f"![Per-device accuracy, static vs patched]({ACCURACY_PLOT})",
        "",
        f"For context, the same methods as training scored them (PyTorch, every device; static {epochs['static']} "
        f"epoch(s), MetaNetwork {epochs['metanetwork']} epoch(s), selection on the validation period only):",
        "",
        training_table(result),
        "",
        "## Parity: compiled vs PyTorch",
        "",
        "Max abs difference between the compiled model's logits and PyTorch's over every test image (patched models: "
        "each device's own patch), and how many predicted classes differ.",
        "",
        parity_table(result),
        "",
        parity_note(result),
        "",
        "Core ML models cannot run on Linux (prediction needs macOS), so each device's patched Core ML package was read "
        "back with coremltools' own blob reader instead: the package loads and every adaptive const holds exactly the "
        "generated values. Core ML accuracy and latency need a Mac.",
        "",
        "## Patches vs artifacts",
        "",
        size_table(result),
        "",
        f"Per device: generating its tensors took {gen['metanetwork']:.2f} ms with MetaNetwork and "
        f"{gen['bn-adapt']:.2f} ms with BN adaptation (batched over the devices, PyTorch on this host); building and "
        f"signing a patch {_ms(personalise['build_patch_ms'])}, verifying and applying it in memory "
        f"{_ms(personalise['apply_ms'])}, opening a runner on the patched model {_ms(personalise['open_ms'])} (medians).",
        "",
        "## Latency, load and swap per runtime",
        "",
        f"`device_runtime.bench` on the MetaNetwork artifacts, each in a fresh process, 1 thread, on real test images "
        f"({cfg['batch']} per call), with the first device's patch ({', '.join(example[t] for t in bench)}). "
        "Swap = patch bytes in hand -> verified, applied, new interpreter/session, first output. Host load average "
        f"during the run: {host.get('load_average_1min', float('nan')):.1f} on {host.get('cpu_count')} CPUs.",
        "",
        latency_table(result),
        "",
        f"![Latency distributions]({LATENCY_PLOT})",
        "",
        "## Stages",
        "",
        stage_table(result),
        "",
        "## Reproduce",
        "",
        "```",
        f"mntool demo --task mnist --model {cfg['model']} --out OUT            # reuses OUT's checkpoints and artifacts",
        "mntool demo --task mnist --out OUT --fresh                  # retrain and re-export",
        f"mntool patch-weights OUT/artifacts/{cfg['model']}/metanetwork/model.tflite "
        f"OUT/patches/{example.get('tflite', '')} \\",
        "    --verify-key OUT/keys/demo.pub -o patched.tflite      # a key: only a patch it signed is accepted",
        f"mntool bench OUT/artifacts/{cfg['model']}/metanetwork/model.onnx --patch OUT/patches/{example.get('onnx', '')}",
        "```",
        "",
        "Every figure is also in `report.json`.",
        "",
    ]
    return "\n".join(lines)


def write_report(result: dict, bench: dict, out: Path) -> list[Path]:
    """report.json, report.md and the PNGs in `out`; returns their paths."""
    from mntool.report import plot_bench_latency

    paths = [
        plot_device_accuracy(result["per_device"], out / ACCURACY_PLOT),
        plot_bench_latency(
            bench, out / LATENCY_PLOT, result["config"]["batch"], request="classification", unit="image"
        ),
    ]
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(result))
    return [out / "report.md", out / "report.json", *paths]


# ---- the whole job ------------------------------------------------------------------------------
def check_out_dir(out: Path) -> None:
    """Refuse a directory holding the other task's demo (their checkpoints would overwrite each other)."""
    report = out / "report.json"
    if (out / MARKER).is_file() and report.is_file():
        try:
            task = json.loads(report.read_text()).get("task", "movielens")
        except (json.JSONDecodeError, AttributeError):
            return
        if task != TASK:
            raise DemoError(f"{out} holds a --task {task} demo; choose another --out for --task {TASK}")


def run_demo(
    out_dir: Path | str,
    quick: bool = False,
    fresh: bool = False,
    data_dir: Path | str | None = None,
    progress: bool = True,
    config: VisionDemoConfig | None = None,
) -> dict:
    """Run the whole cloud -> device loop on images and write DIR/report.md, report.json and PNGs.

    Returns the report as a dict (what report.json holds). `quick` uses `VisionDemoConfig.quick()`
    unless a `config` is given; `fresh` retrains and re-exports (the verified data cache stays)."""
    import torch

    from mntool import report as reports

    cfg = config or (VisionDemoConfig.quick() if quick else VisionDemoConfig())
    out = Path(out_dir)
    check_out_dir(out)
    prepare_out_dir(out, fresh)
    stages = StageLog(progress, len(STAGES))
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    runs = out / "runs" / cfg.model
    try:
        with stages.stage("data") as record:
            dataset = load_data(Path(data_dir) if data_dir else None, cfg, stages.log)
            data_key = dataset_key(dataset)
            record["note"] = (
                f"{dataset.n_devices} devices, {len(dataset.train):,} cloud / {len(dataset.valid):,} validation / "
                f"{len(dataset.test):,} test images ({dataset.protocol_version})"
            )
        with stages.stage("train static") as record:
            static_dir, static_key = train_cached(
                dataset, data_key, "static", cfg.static_epochs, cfg, runs / "static", fresh, progress, record
            )
        with stages.stage("train bn-adapt") as record:
            bn_dir, _ = train_cached(
                dataset,
                data_key,
                "bn-adapt",
                1,
                cfg,
                runs / "bn-adapt",
                fresh,
                progress,
                record,
                init=static_dir,
                init_key=static_key,
            )
        with stages.stage("train metanetwork") as record:
            mn_dir, mn_key = train_cached(
                dataset,
                data_key,
                "metanetwork",
                cfg.metanetwork_epochs,
                cfg,
                runs / "metanetwork",
                fresh,
                progress,
                record,
                init=static_dir,
                init_key=static_key,
            )
        checkpoints = {"static": static_dir, "bn-adapt": bn_dir, "metanetwork": mn_dir}
        with stages.stage("export") as record:
            static_art, reused_static = export_cached(
                static_dir,
                static_key,
                RUN_TARGETS,
                cfg,
                out / "artifacts" / cfg.model / "static",
                fresh,
                progress,
                record,
                batch=cfg.batch,
            )
            mn_art, reused_mn = export_cached(
                mn_dir,
                mn_key,
                ("tflite", "onnx", "coreml"),
                cfg,
                out / "artifacts" / cfg.model / "metanetwork",
                fresh,
                progress,
                record,
                batch=cfg.batch,
            )
            record["cached"] = reused_static + reused_mn == len(static_art) + len(mn_art)
            record["note"] = (
                f"batch {cfg.batch}; {reused_static + reused_mn} of {len(static_art) + len(mn_art)} artifacts reused"
            )
        artifacts = {"static": static_art, "metanetwork": mn_art}
        with stages.stage("personalise and score") as record:
            scored = personalise_and_score(dataset, checkpoints, artifacts, cfg, out, progress, stages.log)
            m = scored["metrics"]
            record["note"] = (
                "per-device mean accuracy "
                + ", ".join(f"{LABELS[k]} {m[k]['tflite']['device_mean_accuracy']:.4f}" for k in METHODS)
                + f" (TFLite); parity {max(max(scored['parity'][k].values()) for k in METHODS):.1e} max abs"
            )
        with stages.stage("benchmark") as record:
            inputs = write_bench_inputs(dataset, cfg, out / "bench" / "inputs.npz")
            bench = benchmark_runtimes(mn_art, scored["example_patches"], inputs, cfg, progress)
            record["note"] = ", ".join(
                f"{t} p50 {r.latency.p50_ms:.3f} ms, swap {r.patches[0].swap_ms:.2f} ms" for t, r in bench.items()
            )
        from mntool.data.images import stats

        result = {
            "format": DEMO_FORMAT,
            "task": TASK,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": quick,
            "config": asdict(cfg),
            "versions": versions(),
            "load_average_at_start": load_at_start,
            "data": {
                **stats(dataset),
                "protocol": asdict(dataset.config),
                "source": str(data_dir or "fetched cache"),
            },
            "training": {m: json.loads((d / "metrics.json").read_text()) for m, d in checkpoints.items()},
            "artifacts": reports.artifact_summaries(artifacts),
            **scored,
            "bench": {t: r.to_dict(samples=False) for t, r in bench.items()},
            "stages": stages.records,
            "seconds": time.perf_counter() - started,
        }
        result["checks"] = checks(result)
        written = write_report(result, bench, out)
        stages.log(f"wrote {', '.join(str(p) for p in written)} ({result['seconds']:.0f} s in all)")
        return result
    finally:
        torch.set_num_threads(threads)
