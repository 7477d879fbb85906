"""The main job, end to end: MovieLens-100k -> static and MetaNetwork SASRec -> TFLite/ONNX/Core ML
artifacts -> signed per-device patches -> scores from the compiled, patched models -> benchmarks
-> a report. `run_demo(out_dir)` is what `mntool demo` (and `make demo`) runs; every stage reuses
what an earlier run left in `out_dir` when its inputs have not changed (`fresh=True` rebuilds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from device_runtime import ranking
from device_runtime import weight_map as weight_maps
from device_runtime.errors import MntoolError
from device_runtime.ranking import RankingForm
from device_runtime.weight_map import WeightMap
from exporters.options import PROOF_ATOL, PROOF_RTOL
from mntool.data import RankingSet, SampleSet

DEMO_FORMAT = 1
MARKER = ".mntool-demo"  # marks a directory `mntool demo` made, so it may clean it up
STAMP = "demo-key.json"  # what a cached stage was built from
RUN_TARGETS = ("tflite", "onnx")  # targets whose runtime runs on this OS: scored and benchmarked
PARITY_ATOL = PROOF_ATOL  # compiled vs PyTorch logits, float32 artifacts: within atol + rtol x the
PARITY_RTOL = PROOF_RTOL  # largest |logit| scored (float32 rounding at that magnitude, as the export proof)


class DemoError(MntoolError):
    """The demo cannot run as asked (output directory, settings)."""


@dataclass(frozen=True)
class DemoConfig:
    users: int = 200  # device users personalised and scored with the compiled models (0 = all)
    history_len: int = 10  # clicks the device model reads; the upload stays the protocol's 30 (see docs/metanetwork.md)
    static_epochs: int = 20  # SASRec static training epochs at most (early stopping on validation ends sooner)
    metanetwork_epochs: int = 4  # MetaNetwork phase epochs at most, started from the static model
    train_users: int = 0  # train on this many device users only (0 = all); the quick mode's shortcut
    bench_runs: int = 500  # timed steady-state inferences per variant
    bench_warmup: int = 50  # untimed inferences before timing
    bench_loads: int = 20  # timed fresh loads / swaps per variant
    threads: int = 2  # PyTorch threads for training and reference scoring (this targets 2-core hosts)
    seed: int = 0  # training seed and user sample

    def __post_init__(self) -> None:
        for name in ("users", "train_users"):
            if getattr(self, name) < 0:
                raise DemoError(f"{name} must be >= 0 (0 = all), got {getattr(self, name)}")
        for name in (
            "history_len",
            "static_epochs",
            "metanetwork_epochs",
            "bench_runs",
            "bench_loads",
            "threads",
        ):
            if getattr(self, name) < 1:
                raise DemoError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bench_warmup < 0:
            raise DemoError(f"bench_warmup must be >= 0, got {self.bench_warmup}")

    @classmethod
    def quick(cls) -> DemoConfig:
        """Smoke-test settings: 120 training users, one epoch each, 24 scored users, short benchmarks."""
        return cls(
            users=24,
            static_epochs=1,
            metanetwork_epochs=1,
            train_users=120,
            bench_runs=60,
            bench_warmup=10,
            bench_loads=3,
        )


# ---- stage log ----------------------------------------------------------------------------------
class StageLog:
    """One line per stage on stderr (name, elapsed seconds, cached or not) and the same record
    for report.json (plus `reused_seconds`: what building the reused parts took when they were
    built); tqdm bars run inside the stages."""

    def __init__(self, progress: bool, total: int):
        self.console = Console(stderr=True, highlight=False, soft_wrap=True, quiet=not progress)
        self.total = total
        self.records: list[dict] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        record = {"stage": name, "seconds": 0.0, "cached": False, "reused_seconds": 0.0, "note": ""}
        self.console.print(f"[bold cyan][{len(self.records) + 1}/{self.total}] {name}[/]")
        t0 = time.perf_counter()
        yield record
        record["seconds"] = time.perf_counter() - t0
        self.records.append(record)
        done = (
            "[green]✓[/]" if not record["cached"] else f"[green]✓ reused (built in {record['reused_seconds']:.0f} s)[/]"
        )
        note = f"  [dim]{record['note']}[/]" if record["note"] else ""
        self.console.print(f"      {done} {name} [bold]{record['seconds']:.1f} s[/]{note}")

    def log(self, message: str) -> None:
        self.console.print(f"      [dim]{message}[/]")


STAGES = ("data", "train static", "train metanetwork", "export", "personalise and score", "benchmark")


# ---- caching ------------------------------------------------------------------------------------
def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_stamp(stamp_file: Path, key: str, fresh: bool) -> dict | None:
    """The stamp (key, seconds it took) if what it stamps was built from `key` and `fresh` is
    off, else None."""
    try:
        stamp = json.loads(stamp_file.read_text()) if stamp_file.is_file() and not fresh else {}
    except json.JSONDecodeError:  # a run cut off while writing it: rebuild
        stamp = {}
    return stamp if isinstance(stamp, dict) and stamp.get("key") == key else None


def write_stamp(stamp_file: Path, key: str, seconds: float) -> None:
    stamp_file.write_text(json.dumps({"key": key, "seconds": seconds}) + "\n")


def dataset_key(dataset) -> str:
    """Identifies the built dataset by its content (any source, any user subset)."""
    h = hashlib.sha256()
    for split in ("train", "valid", "test"):
        rows = dataset.split(split)
        for a in (rows.user, rows.target, rows.label, rows.history, rows.recent):
            h.update(np.ascontiguousarray(a).tobytes())
    h.update(np.ascontiguousarray(dataset.test_rank.candidates).tobytes())
    return _key(
        arrays=h.hexdigest(), n_items=dataset.n_items, protocol=asdict(dataset.config), version=dataset.protocol_version
    )


def versions() -> dict[str, str]:
    """Versions of the parts that produced the figures."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("mntool", "torch", "litert-torch", "ai-edge-litert", "onnx", "onnxruntime", "coremltools", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def prepare_out_dir(out: Path, fresh: bool) -> None:
    """Create `out` (or reuse one the demo made); with `fresh`, drop the demo's caches in it."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DemoError(f"{out} is not empty and was not made by `mntool demo`; choose a new --out directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).touch()
    except OSError as err:
        raise DemoError(f"cannot create output directory {out}: {err.strerror}") from None
    if fresh:
        for name in ("runs", "artifacts"):
            shutil.rmtree(out / name, ignore_errors=True)


# ---- stages -------------------------------------------------------------------------------------
def load_data(data_dir: Path | None, cfg: DemoConfig, log: Callable[[str], None]):
    """The ML-100k dataset under the default protocol with the demo's device window (restricted to
    `train_users` if set)."""
    from mntool.data import ProtocolConfig
    from mntool.data.datasets import load_dataset

    dataset = load_dataset(data_dir, ProtocolConfig(history_len=cfg.history_len), log=log)
    if cfg.train_users and cfg.train_users < len(dataset.device_users):
        users = np.random.default_rng(cfg.seed).choice(dataset.device_users, cfg.train_users, replace=False)
        dataset = dataset.for_users(np.sort(users))
    return dataset


def train_cached(
    dataset,
    data_key: str,
    method: str,
    epochs: int,
    cfg: DemoConfig,
    out: Path,
    fresh: bool,
    progress: bool,
    record: dict,
    init: Path | None = None,
    init_key: str = "",
) -> tuple[Path, str]:
    """A checkpoint of `method` in `out`, trained unless one from the same inputs is there."""
    from mntool.models import BackboneConfig
    from mntool.train import TrainConfig, train

    train_cfg = TrainConfig(
        model="sasrec",
        method=method,
        epochs=epochs,
        seed=cfg.seed,
        backbone=BackboneConfig(max_history=cfg.history_len),
    )
    key = _key(train=train_cfg.to_dict(), data=data_key, init=init_key)
    metrics = run_cached(
        out,
        key,
        fresh,
        record,
        lambda: train(dataset, train_cfg, out, init=init, progress=progress, log=lambda s: None),
    )
    record["note"] = (
        f"{out}: {len(metrics['train']['epochs'])} epoch(s), test UAUC {metrics['test']['uauc']:.4f} "
        f"(all {len(dataset.device_users)} users, PyTorch)"
    )
    return out, key


def run_cached(out: Path, key: str, fresh: bool, record: dict, run: Callable[[], object]) -> dict:
    """`run()` (which writes a checkpoint with metrics.json into `out`) unless `out` holds the result
    of the same inputs (`key`, stamped); notes in `record` whether it was reused. Returns the
    checkpoint's metrics."""
    stamp = read_stamp(out / STAMP, key, fresh)
    if stamp:
        record["cached"] = True
        record["reused_seconds"] = stamp.get("seconds", 0.0)
    else:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        run()
        write_stamp(out / STAMP, key, time.perf_counter() - t0)
    return json.loads((out / "metrics.json").read_text())


def export_cached(
    ckpt_dir: Path,
    ckpt_key: str,
    targets: tuple[str, ...],
    cfg: DemoConfig,
    out: Path,
    fresh: bool,
    progress: bool,
    record: dict,
    layout: str | None = None,
    batch: int | None = None,
) -> tuple[dict[str, Path], int]:
    """Artifacts of a checkpoint's device model for `targets` in `out`, with the inputs its task
    exports by default (`Checkpoint.export_inputs`: a recommender's candidate form, one request of
    the protocol's 100 candidates per call, or `layout="rows"`; an image model's `batch` images);
    each target is re-exported only if its checkpoint or settings changed. Returns (artifacts, how
    many were reused)."""
    from exporters import export
    from mntool.train import load_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    artifacts, reused, ckpt = {}, 0, None
    for target in targets:
        key = _key(checkpoint=ckpt_key, target=target, layout=layout, batch=batch, name="model", outputs=["logits"])
        artifact = out / ("model" + {"tflite": ".tflite", "onnx": ".onnx", "coreml": ".mlpackage"}[target])
        stamp_file = out / f"{target}-{STAMP}"
        stamp = read_stamp(stamp_file, key, fresh)
        if stamp and artifact.exists():
            reused += 1
            record["reused_seconds"] += stamp.get("seconds", 0.0)
        else:
            t0 = time.perf_counter()
            ckpt = ckpt or load_checkpoint(ckpt_dir)
            example, form = ckpt.export_inputs(batch=batch, layout=layout)
            export(
                ckpt.model,
                example,
                ckpt.adaptive,
                target,
                out,
                output_names=("logits",),
                form=form,
                progress=progress,
            )
            write_stamp(stamp_file, key, time.perf_counter() - t0)
        artifacts[target] = artifact
    return artifacts, reused


# ---- the device side: compiled models held in memory --------------------------------------------
@dataclass
class DeviceModel:
    """A compiled artifact as an app holds it: its weight map (checked against the files once, at
    load) and its files in memory. A patch is verified and written into a copy of the files, then
    a fresh runner is opened on that copy (runtimes pre-pack weights when they load a model)."""

    artifact: Path
    weight_map: WeightMap
    files: dict[str, bytes]

    @property
    def form(self) -> RankingForm:
        form = RankingForm.of(self.weight_map)
        if form is None:
            raise DemoError(f"{self.artifact} declares no ranking form (exported before forms were recorded?)")
        return form

    @classmethod
    def load(cls, artifact: Path) -> DeviceModel:
        wm = weight_maps.load(artifact)
        return cls(artifact, wm, weight_maps.read_artifact_files(artifact, wm.files))

    def apply(self, patch: bytes, verify_key: bytes) -> dict[str, bytes | bytearray]:
        from device_runtime.patch import TrustPolicy, apply_patch_bytes

        return apply_patch_bytes(
            self.files, patch, self.weight_map, policy=TrustPolicy(verify_key=verify_key), check_artifact=False
        )

    def open(self, files: dict[str, bytes | bytearray] | None = None):
        from device_runtime.runners import open_runner

        return open_runner(self.artifact, weight_map=self.weight_map, files=files)

    def read_back(self, files: dict[str, bytes | bytearray], workdir: Path) -> dict[str, np.ndarray]:
        """Core ML off macOS: the adaptive tensors of `files` as coremltools itself reads them (the
        exporter's read-back: the package must load and each const must point at its blob)."""
        from exporters.coreml import read_back

        return read_back(self.weight_map, files, workdir)


# ---- scoring ------------------------------------------------------------------------------------
@dataclass
class TestPeriod:
    """The sampled users' test period: pointwise rows (AUC/UAUC) and ranking tasks (NDCG/HR)."""

    rows: SampleSet
    rank: RankingSet
    group: int  # pointwise rows per positive: the positive and its negatives, sharing one history

    def of(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of one user's pointwise rows and ranking tasks."""
        return np.flatnonzero(self.rows.user == user), np.flatnonzero(self.rank.user == user)


@dataclass
class Scores:
    """Logits of the test period: pointwise (N,) and ranking (P, C)."""

    pointwise: np.ndarray
    ranking: np.ndarray

    @classmethod
    def empty(cls, test: TestPeriod) -> Scores:
        return cls(np.zeros(len(test.rows), np.float32), np.zeros(test.rank.candidates.shape, np.float32))

    def max_abs(self) -> float:
        return float(max(np.abs(self.pointwise).max(), np.abs(self.ranking).max()))

    def max_abs_error(self, other: Scores) -> float:
        return float(
            max(
                np.abs(self.pointwise.astype(np.float64) - other.pointwise).max(),
                np.abs(self.ranking.astype(np.float64) - other.ranking).max(),
            )
        )

    def metrics(self, test: TestPeriod) -> dict:
        from mntool.metrics import evaluate

        return evaluate(test.rows.user, test.rows.label, self.pointwise, test.rank.user, self.ranking)


def score_user(runner, form: RankingForm, test: TestPeriod, user: int, into: Scores) -> None:
    """One user's pointwise rows (groups of a positive and its negatives, sharing one history) and
    ranking tasks scored by `runner` in its ranking form, written into `into`."""
    rows, rank = test.rows, test.rank
    row_index, rank_index = test.of(user)
    group = test.group
    history = rows.history[row_index].reshape(-1, group, rows.history.shape[1])
    assert (history == history[:, :1]).all(), "rows of a group must share one history"
    into.pointwise[row_index] = ranking.score(
        runner, form, history[:, 0], rows.target[row_index].reshape(-1, group)
    ).reshape(-1)
    into.ranking[rank_index] = ranking.score(runner, form, rank.history[rank_index], rank.candidates[rank_index])


def pytorch_scores(model, test: TestPeriod, device_params) -> Scores:
    """The same rows scored by PyTorch (`mntool.train.score_rows`), per-user parameters or none."""
    from mntool.train import score_rows

    return Scores(
        score_rows(model, test.rows.history, test.rows.target, test.rows.user, device_params),
        score_rows(model, test.rank.history, test.rank.candidates, test.rank.user, device_params),
    )


def per_user_auc(test: TestPeriod, scores: Scores, users: np.ndarray) -> list[float]:
    from mntool.metrics import auc

    rows = test.rows
    return [auc(rows.label[rows.user == u], scores.pointwise[rows.user == u]) for u in users]


def sample_users(dataset, cfg: DemoConfig) -> tuple[np.ndarray, np.ndarray]:
    """(users (U,), their test-period uploads (U, R)): `cfg.users` device users drawn with
    `cfg.seed` (all of them for 0), in user-code order."""
    all_users, all_recent = dataset.device_recent("test")
    n = len(all_users) if cfg.users == 0 else min(cfg.users, len(all_users))
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(all_users), n, replace=False))
    return all_users[pick], all_recent[pick]


def demo_keys(keybase: Path):
    """(signing key, raw public key) of the demo's Ed25519 pair at KEYBASE.key/.pub, made once."""
    from device_runtime.signing import load_public_key
    from mntool.patches import keygen, load_signing_key

    if not Path(f"{keybase}.key").is_file():
        keygen(keybase)
    return load_signing_key(Path(f"{keybase}.key")), load_public_key(Path(f"{keybase}.pub"))


def personalise_and_score(
    dataset,
    users: np.ndarray,
    recent: np.ndarray,
    static_dir: Path,
    mn_dir: Path,
    artifacts: dict[str, dict[str, Path]],
    cfg: DemoConfig,
    out: Path,
    progress: bool,
    log: Callable[[str], None],
) -> dict:
    """For each sampled user: generate its parameters from its test-period upload (cloud), build a
    signed patch per target (cloud), verify and apply it in memory and open a runner on the
    patched model (device), and score the user's test period; the static artifact scores it too.
    PyTorch scores the same rows with the same parameters, for parity."""
    import torch

    from mntool.generate import Generator
    from mntool.patches import build_patch
    from mntool.train import DeviceParams, load_checkpoint

    test = TestPeriod(dataset.test.for_users(users), dataset.test_rank.for_users(users), dataset.config.n_negatives + 1)
    log(
        f"{len(users)} of {len(dataset.device_users)} device users; {len(test.rows):,} pointwise rows, "
        f"{len(test.rank):,} ranking tasks x {test.rank.candidates.shape[1]} candidates"
    )
    signing_key, verify_key = demo_keys(out / "keys" / "demo")
    clock = time.perf_counter

    t0 = clock()
    params = Generator.load(mn_dir).generate_batch(recent)  # cloud: {name: (U, *shape)}
    generate_ms = (clock() - t0) * 1e3 / len(users)

    static = {t: DeviceModel.load(artifacts["static"][t]) for t in RUN_TARGETS}
    mn_models = {t: DeviceModel.load(a) for t, a in artifacts["metanetwork"].items()}
    compiled = {m: {t: Scores.empty(test) for t in RUN_TARGETS} for m in ("static", "metanetwork")}
    static_runners = {t: model.open() for t, model in static.items()}
    timings: dict[str, list[float]] = {"build_patch_ms": [], "apply_ms": [], "open_ms": []}
    patch_bytes, example_patches = {}, {}  # the first user's patches are kept for `mntool bench` / patch-weights
    coreml = {
        "users": len(users),
        "exact": True,
        "max_abs_error": 0.0,
        "method": "coremltools read-back of each user's patched package (Core ML prediction needs macOS)",
    }
    patches_dir = out / "patches"
    shutil.rmtree(patches_dir, ignore_errors=True)
    patches_dir.mkdir()
    with (
        tempfile.TemporaryDirectory(prefix=".read-back-", dir=out) as workdir,
        tqdm(total=len(users), desc="users", unit="user", disable=not progress, leave=False, dynamic_ncols=True) as bar,
    ):
        for i, user in enumerate(users):
            user_params = {name: p[i] for name, p in params.items()}
            for target, runner in static_runners.items():
                score_user(runner, static[target].form, test, user, compiled["static"][target])
            for target, model in mn_models.items():
                c0 = clock()
                patch = build_patch(model.weight_map, user_params, signing_key)  # cloud
                c1 = clock()
                patched = model.apply(patch, verify_key)  # device
                timings["build_patch_ms"].append((c1 - c0) * 1e3)
                timings["apply_ms"].append((clock() - c1) * 1e3)
                patch_bytes[target] = len(patch)
                if i == 0:
                    example_patches[target] = str(patches_dir / f"{target}-user{dataset.user_ids[user]}.mnpatch")
                    Path(example_patches[target]).write_bytes(patch)
                if target == "coreml":
                    read = model.read_back(patched, Path(workdir))
                    for name, value in user_params.items():
                        coreml["exact"] &= bool(
                            np.array_equal(read[name], value.astype(model.weight_map.tensor(name).dtype))
                        )
                        coreml["max_abs_error"] = max(coreml["max_abs_error"], float(np.abs(read[name] - value).max()))
                    continue
                c2 = clock()
                with model.open(patched) as runner:
                    timings["open_ms"].append((clock() - c2) * 1e3)
                    score_user(runner, model.form, test, user, compiled["metanetwork"][target])
            bar.update(1)
    for runner in static_runners.values():
        runner.close()

    # PyTorch on the same rows: the static model, the MetaNetwork backbone with each user's
    # generated parameters, and that backbone unpatched (the shipped artifact on its own).
    torch.set_num_threads(cfg.threads)
    static_model, mn_model = load_checkpoint(static_dir).model, load_checkpoint(mn_dir).model
    device_params = DeviceParams(users, {name: torch.from_numpy(p) for name, p in params.items()})
    reference = {
        "static": pytorch_scores(static_model, test, None),
        "metanetwork": pytorch_scores(mn_model, test, device_params),
    }
    metrics = {
        m: {**{t: s.metrics(test) for t, s in compiled[m].items()}, "pytorch": reference[m].metrics(test)}
        for m in compiled
    }
    metrics["metanetwork_unpatched"] = {"pytorch": pytorch_scores(mn_model, test, None).metrics(test)}
    return {
        "sample": {
            "users": len(users),
            "of": len(dataset.device_users),
            "pointwise_rows": len(test.rows),
            "ranking_tasks": len(test.rank),
            "candidates": int(test.rank.candidates.shape[1]),
            "seed": cfg.seed,
        },
        "metrics": metrics,
        "parity": {
            "atol": PARITY_ATOL,
            "rtol": PARITY_RTOL,
            "scale": {m: reference[m].max_abs() for m in compiled},  # the largest |logit| PyTorch scored
            **{m: {t: s.max_abs_error(reference[m]) for t, s in compiled[m].items()} for m in compiled},
        },
        "coreml": coreml,
        "patch_bytes": patch_bytes,
        "example_patches": example_patches,
        "personalise": {"generate_ms_per_device": generate_ms, **{k: float(np.median(v)) for k, v in timings.items()}},
        "per_user": {
            "user": [str(dataset.user_ids[u]) for u in users],
            "uauc_static": per_user_auc(test, compiled["static"]["tflite"], users),
            "uauc_metanetwork": per_user_auc(test, compiled["metanetwork"]["tflite"], users),
        },
    }


def write_bench_inputs(rank, form: RankingForm, path: Path) -> Path:
    """One real ranking request (the first task of `rank`: a history and its candidates), laid
    out for `form`, as the benchmark's inputs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **ranking.request_inputs(form, rank.history[0], rank.candidates[0]))
    return path


def compare_forms(
    candidate_art: dict[str, Path], row_art: dict[str, Path], rank, cfg: DemoConfig, progress: bool
) -> dict:
    """Per runtime: latency per ranking request of the same model in the row form and the candidate
    form, timed interleaved in one process on one real request, and the largest difference between
    their logits (device_runtime.ranking.time_requests)."""
    out = {}
    for target in tqdm(RUN_TARGETS, desc="forms", disable=not progress, leave=False):
        models = {"rows": DeviceModel.load(row_art[target]), "candidates": DeviceModel.load(candidate_art[target])}
        runners = {name: (m.open(), m.form) for name, m in models.items()}
        try:
            timed = ranking.time_requests(
                runners, rank.history[0], rank.candidates[0], runs=cfg.bench_runs, warmup=cfg.bench_warmup
            )
        finally:
            for runner, _ in runners.values():
                runner.close()
        rows, cand = timed["forms"]["rows"]["latency"], timed["forms"]["candidates"]["latency"]
        out[target] = {
            "rows_p50_ms": rows.p50_ms,
            "candidates_p50_ms": cand.p50_ms,
            "rows_p99_ms": rows.p99_ms,
            "candidates_p99_ms": cand.p99_ms,
            "ratio": cand.p50_ms / rows.p50_ms,
            "max_abs_difference": timed["max_abs_difference"],
            "runs": rows.runs,
        }
    return out


def benchmark_runtimes(
    artifacts: dict[str, Path], patches: dict[str, str], inputs: Path, cfg: DemoConfig, progress: bool
) -> dict:
    """`device_runtime.bench` on each runnable MetaNetwork artifact with its example patch, on a
    real request, each in a fresh worker process (as `mntool bench` does)."""
    from device_runtime.bench import BenchConfig, benchmark_isolated

    config = BenchConfig(
        runs=cfg.bench_runs, warmup=cfg.bench_warmup, loads=cfg.bench_loads, rounds=min(10, cfg.bench_runs)
    )
    reports = {}
    with tqdm(
        total=len(RUN_TARGETS) * config.work_units(1),
        desc="bench",
        unit="run",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        for target in RUN_TARGETS:
            reports[target] = benchmark_isolated(
                artifacts[target], [Path(patches[target])], inputs, config, progress=bar.update
            )
    return reports


# ---- the whole job ------------------------------------------------------------------------------
def run_demo(
    out_dir: Path | str,
    quick: bool = False,
    fresh: bool = False,
    data_dir: Path | str | None = None,
    progress: bool = True,
    config: DemoConfig | None = None,
) -> dict:
    """Run the whole cloud -> device loop and write DIR/report.md, report.json and PNGs.

    Returns the report as a dict (what report.json holds). `quick` uses `DemoConfig.quick()`
    unless a `config` is given; `fresh` retrains and re-exports (the verified data cache stays).

    >>> run_demo("demo-out")["checks"]
    [{'check': 'TFLite parity <= 1e-05', 'ok': True, ...}, ...]
    """
    import torch

    from mntool import report as reports

    cfg = config or (DemoConfig.quick() if quick else DemoConfig())
    out = Path(out_dir)
    prepare_out_dir(out, fresh)
    stages = StageLog(progress, len(STAGES))
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with stages.stage("data") as record:
            dataset = load_data(Path(data_dir) if data_dir else None, cfg, stages.log)
            data_key = dataset_key(dataset)
            record["note"] = (
                f"{len(dataset.device_users)} device users, {dataset.n_items} items, {len(dataset.train):,} training rows"
            )
        with stages.stage("train static") as record:
            static_dir, static_key = train_cached(
                dataset, data_key, "static", cfg.static_epochs, cfg, out / "runs" / "static", fresh, progress, record
            )
        with stages.stage("train metanetwork") as record:
            mn_dir, mn_key = train_cached(
                dataset,
                data_key,
                "metanetwork",
                cfg.metanetwork_epochs,
                cfg,
                out / "runs" / "metanetwork",
                fresh,
                progress,
                record,
                init=static_dir,
                init_key=static_key,
            )
        with stages.stage("export") as record:
            static_art, reused_static = export_cached(
                static_dir, static_key, RUN_TARGETS, cfg, out / "artifacts" / "static", fresh, progress, record
            )
            mn_art, reused_mn = export_cached(
                mn_dir,
                mn_key,
                ("tflite", "onnx", "coreml"),
                cfg,
                out / "artifacts" / "metanetwork",
                fresh,
                progress,
                record,
            )
            row_art, reused_rows = export_cached(  # the same model in the row form: latency side by side
                mn_dir,
                mn_key,
                RUN_TARGETS,
                cfg,
                out / "artifacts" / "metanetwork-rows",
                fresh,
                progress,
                record,
                "rows",
            )
            reused, made = reused_static + reused_mn + reused_rows, len(static_art) + len(mn_art) + len(row_art)
            record["cached"] = reused == made
            record["note"] = f"candidate form (row form beside it for latency); {reused} of {made} artifacts reused"
        artifacts = {"static": static_art, "metanetwork": mn_art}  # what devices run (candidate form)
        with stages.stage("personalise and score") as record:
            users, recent = sample_users(dataset, cfg)
            scored = personalise_and_score(
                dataset, users, recent, static_dir, mn_dir, artifacts, cfg, out, progress, stages.log
            )
            m = scored["metrics"]
            record["note"] = (
                f"UAUC static {m['static']['tflite']['uauc']:.4f} -> MetaNetwork {m['metanetwork']['tflite']['uauc']:.4f} "
                f"(TFLite); parity {max(scored['parity']['metanetwork'].values()):.1e}"
            )
        with stages.stage("benchmark") as record:
            request = dataset.test_rank.for_users(users[:1])
            inputs = write_bench_inputs(request, DeviceModel.load(mn_art["tflite"]).form, out / "bench" / "inputs.npz")
            bench = benchmark_runtimes(mn_art, scored["example_patches"], inputs, cfg, progress)
            forms = compare_forms(mn_art, row_art, request, cfg, progress)
            record["note"] = ", ".join(
                f"{t} p50 {r.latency.p50_ms:.2f} ms ({forms[t]['ratio']:.2f}x the row form), swap "
                f"{r.patches[0].swap_ms:.2f} ms"
                for t, r in bench.items()
            )
        result = {
            "format": DEMO_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": quick,
            "config": asdict(cfg),
            "versions": versions(),
            "load_average_at_start": load_at_start,
            "data": {
                **dataset.summary(),
                "protocol": asdict(dataset.config),
                "source": str(data_dir or "fetched cache"),
            },
            "training": {
                name: json.loads((d / "metrics.json").read_text())
                for name, d in (("static", static_dir), ("metanetwork", mn_dir))
            },
            "artifacts": reports.artifact_summaries(artifacts),
            **scored,
            "bench": {t: r.to_dict(samples=False) for t, r in bench.items()},
            "forms": forms,
            "stages": stages.records,
            "seconds": time.perf_counter() - started,
        }
        result["checks"] = reports.checks(result)
        written = reports.write_report(result, bench, out)
        stages.log(f"wrote {', '.join(str(p) for p in written)} ({result['seconds']:.0f} s in all)")
        return result
    finally:
        torch.set_num_threads(threads)
