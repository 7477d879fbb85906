"""The DCCL fleet loop: devices move from the old cloud model (v1) to a new one distilled from
their personalised models (v2, MoMoDistill) while ONE `mntool serve` serves patches for both.

1. v1 is the old cloud model's personalisation checkpoint (`--old`: e.g. MetaPatch on a static
   model, or MetaNetwork generating the metapatch) compiled to an artifact (ONNX Runtime, or
   LiteRT with `--target tflite`). Every device runs its own copy, refreshes its patch from the
   server at the start of each round (its latest 30 items, all before the rows it then scores),
   verifies it with the root key alone and scores its next test interactions on the compiled
   model, as examples/fleet.py does.
2. The cloud distils v1's per-device models into a new cloud model and personalises that:
   `mntool train --method momodistill --teacher V1`, then `--method metapatch --init DISTILLED`
   (`--new`; trained into OUT when not given, as is `--old`: `mntool train --method metapatch`,
   static first, all with `--history-len 10`), and compiles v2.
3. One server: `mntool serve V1 --artifact v1/model.onnx --also V2 v2/model.onnx`. Each device's
   test period is cut into `--rounds` equal parts (one refresh each). v1 serves round 0; before
   each later round a further `--wave` of the fleet moves over: it downloads v2's artifact (its
   bytes are counted), then asks for patches with v2's fingerprint.
4. Report: online UAUC / NDCG@10 of the moving fleet on the rows scored under v1 and under v2,
   beside the same rows when every device stays on v1 (`all v1`) or is on v2 from the start
   (`all v2`), both also run against the same server; head / tail users (mntool.data.activity_buckets);
   requests served per fingerprint; bytes moved (artifact downloads + patches); fetch and
   verify+apply+reload latency; and PyTorch's offline scores of the moving fleet (each version's
   checkpoint, the same uploads, the same version per device and round) as the cross-check.

MetaPatch checkpoints run the device phase on the server, one upload at a time whatever the batch
(docs/serving.md, Micro-batching), so every patch is a function of its upload alone (reproducible,
and what the cross-check computes). The server runs with `--max-batch 1` by default, as the
figures in docs/dccl.md were measured; `--max-batch 64` serves as in production.

    .venv/bin/python examples/dccl_fleet.py --old runs/dccl/sasrec/seed0/metapatch \\
        --new runs/dccl/sasrec/seed0/momodistill--metapatch+metapatch --data ../shared/data/ml-100k --devices 200
    .venv/bin/python examples/dccl_fleet.py --devices 50 --json   # trains OUT/v1, OUT/v2 first (minutes)
    .venv/bin/python examples/dccl_fleet.py --target tflite --rounds 5 --wave 0.25
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is not a package: fleet.py beside us

from fleet import Device, cloud_keys, compiled, devices_of, percentiles, score_device, server_batches  # noqa: E402

from device_runtime import weight_map as wmap  # noqa: E402
from device_runtime.client import fetch_patch, refresh  # noqa: E402
from device_runtime.ranking import RankingForm  # noqa: E402
from device_runtime.runners import RunnerConfig, find_weight_map  # noqa: E402
from mntool.data import activity_buckets  # noqa: E402
from mntool.data.datasets import load_dataset  # noqa: E402
from mntool.generate import Generator  # noqa: E402
from mntool.metrics import evaluate, evaluate_users  # noqa: E402
from mntool.serve import ServerProcess  # noqa: E402
from mntool.train import Checkpoint, DeviceParams, load_checkpoint, score_rows  # noqa: E402

TOKEN = "dccl-fleet-token"
PASSES = ("moving", "all_v1", "all_v2")  # the fleet moving over, and the same rows all on v1, all on v2
BUCKETS = ("head", "tail")


@dataclass
class DcclFleetConfig:
    old: Path | None  # v1: the old cloud model's personalisation checkpoint; None: OUT/v1, trained there if missing
    new: Path | None  # v2: personalisation of the model distilled from v1; None: OUT/v2, trained there if missing
    data: Path | None  # MovieLens-100k files; None: the fetched cache
    out: Path
    devices: int = 200
    target: str = "onnx"  # onnx (ONNX Runtime) or tflite (LiteRT)
    rounds: int = 4  # refreshes per device: its test period cut into this many equal parts
    wave: float = 1 / 3  # share of the fleet that moves to v2 before each round after the first
    workers: int = 1  # server worker processes
    concurrency: int = 4  # devices simulated at once (threads)
    max_batch: int = 1  # the server's --max-batch (1: one patch per generator call, as docs/dccl.md measured)
    epochs: int | None = None  # when training here (None: mntool train's default, early stopping)
    history_len: int = 10  # when training here: clicks the device model reads (the upload stays 30)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 2:
            raise SystemExit("error: --rounds must be >= 2 (v1 serves the first round, devices move after it)")
        if not 0 < self.wave <= 1:
            raise SystemExit(f"error: --wave must be in (0, 1], got {self.wave}")


# ---- checkpoints ----------------------------------------------------------------------------
def _train(cfg: DcclFleetConfig, out: Path, *args: str) -> Path:
    if (out / "metrics.json").is_file():
        print(f"using the checkpoint trained by an earlier run: {out}", file=sys.stderr)
        return out
    print(f"training {out} ({' '.join(args)})", file=sys.stderr)
    extra = (["--data", str(cfg.data)] if cfg.data else []) + (["--epochs", str(cfg.epochs)] if cfg.epochs else [])
    subprocess.run(
        [sys.executable, "-m", "mntool.cli.main", "train", *args, "--seed", str(cfg.seed), "--out", str(out)]
        + ["--quiet", *extra],
        check=True,
    )
    return out


def checkpoints(cfg: DcclFleetConfig) -> tuple[Path, Path, Path | None]:
    """(v1, v2, what v2 was trained from (`init` in its metrics.json: the distilled cloud model when
    trained here)): given, or trained into OUT."""
    old = cfg.old or _train(
        cfg, cfg.out / "v1", "--model", "sasrec", "--history-len", str(cfg.history_len), "--method", "metapatch"
    )
    if cfg.new is not None:
        init = (
            json.loads((cfg.new / "metrics.json").read_text()).get("init")
            if (cfg.new / "metrics.json").is_file()
            else None
        )
        return old, cfg.new, Path(init) if init else None
    v1 = load_checkpoint(old)
    same = ["--model", v1.config.model, "--history-len", str(v1.protocol["history_len"])]
    same += ["--recent-len", str(v1.protocol["recent_len"])]
    distilled = _train(cfg, cfg.out / "v2-distilled", *same, "--method", "momodistill", "--teacher", str(old))
    new = _train(cfg, cfg.out / "v2", *same, "--method", "metapatch", "--init", str(distilled))
    return old, new, distilled


# ---- the plan: which version each device runs in each round ---------------------------------
@dataclass
class Plan:
    """Rounds per device (positives [bounds[r], bounds[r + 1]) of its test period) and the round
    from which each device runs v2 in the moving fleet."""

    rounds: int
    move_round: np.ndarray  # (devices,): first round on v2 (>= rounds: never moves)

    @staticmethod
    def of(devices: list[Device], rounds: int, wave: float, seed: int) -> Plan:
        per_wave = max(1, round(wave * len(devices)))
        order = np.random.default_rng(seed + 1).permutation(len(devices))
        move = np.empty(len(devices), np.int64)
        move[order] = 1 + np.arange(len(devices)) // per_wave
        return Plan(rounds, move)

    def bounds(self, device: Device) -> list[int]:
        return [device.positives * r // self.rounds for r in range(self.rounds + 1)]

    def scores(self, device: Device, r: int) -> bool:
        """Whether `device` has positives to score in round `r` (else it does not refresh then)."""
        bounds = self.bounds(device)
        return bounds[r + 1] > bounds[r]

    def version(self, fleet: str, index: int, r: int) -> int:
        if fleet == "all_v1":
            return 1
        if fleet == "all_v2":
            return 2
        return 2 if r >= self.move_round[index] else 1

    def on_v2(self) -> list[float]:
        """Share of the moving fleet on v2 in each round (by the plan)."""
        return [float(np.mean(self.move_round <= r)) for r in range(self.rounds)]


@dataclass
class Step:
    """One device in one round: the version it ran, its scores and its refresh."""

    version: int
    pointwise: np.ndarray
    ranking: np.ndarray
    fetch_s: float
    apply_s: float
    attempts: int
    patch_bytes: int
    download_bytes: int  # v2's artifact, when the device moved over in this round


@dataclass
class Version:
    name: str  # "v1" / "v2"
    checkpoint: Path
    artifact: Path
    fingerprint: str
    form: RankingForm
    bytes: int  # every file a device downloads to install it (the artifact's directory)


def run_fleet(
    cfg: DcclFleetConfig,
    fleet: str,
    devices: list[Device],
    plan: Plan,
    versions: dict[int, Version],
    server: ServerProcess,
    root_pub: Path,
    recent_len: int,
    group: int,
    work: Path,
) -> tuple[dict[tuple[int, int], Step], float]:
    """Every device refreshes its own artifact copy from the server at the start of each round and
    scores that round's positives with the patched model; rounds run fleet-wide one after another,
    so v1 and v2 requests reach the server together."""
    installed: dict[int, int] = {}  # device index -> version installed
    steps: dict[tuple[int, int], Step] = {}

    def install(index: int, version: Version) -> Path:
        home = work / fleet / str(devices[index].user)
        shutil.rmtree(home, ignore_errors=True)  # the old version goes
        shutil.copytree(version.artifact.parent, home / version.name)
        return home / version.name / version.artifact.name

    def step(index: int, r: int) -> None:
        device = devices[index]
        bounds = plan.bounds(device)
        start, stop = bounds[r], bounds[r + 1]
        v = plan.version(fleet, index, r)
        moved = installed.get(index) not in (None, v)
        if installed.get(index) != v:
            install(index, versions[v])
            installed[index] = v
        local = work / fleet / str(device.user) / versions[v].name / versions[v].artifact.name
        done = refresh(
            server.url,
            local,
            device.upload(start, recent_len),
            root_key=root_pub,
            token=TOKEN,
            device_id=f"ml100k-user-{device.user}",
            runner_config=RunnerConfig(threads=1),
        )
        with done.runner as runner:
            pointwise, ranking = score_device(runner, versions[v].form, device, start, stop, group)
        steps[(index, r)] = Step(
            v,
            pointwise,
            ranking,
            done.fetch_seconds,
            done.apply_seconds,
            done.attempts,
            done.patch.total_size,
            versions[v].bytes if moved else 0,
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        for r in range(plan.rounds):
            due = [i for i, d in enumerate(devices) if plan.scores(d, r)]
            print(f"  {fleet}: round {r + 1}/{plan.rounds}, {len(due)} devices", file=sys.stderr)
            list(pool.map(step, due, [r] * len(due)))
    shutil.rmtree(work / fleet, ignore_errors=True)
    return steps, time.perf_counter() - started


# ---- scoring and metrics --------------------------------------------------------------------
@dataclass
class Rows:
    """Every scored row of the fleet in one canonical order (device, round), with its version."""

    users: np.ndarray
    labels: np.ndarray
    version: np.ndarray  # (pointwise rows,) in the moving fleet
    rank_users: np.ndarray
    rank_version: np.ndarray
    keys: list[tuple[int, int]] = field(default_factory=list)

    @staticmethod
    def of(devices: list[Device], plan: Plan, group: int) -> Rows:
        users, labels, version, rank_users, rank_version, keys = [], [], [], [], [], []
        for i, d in enumerate(devices):
            bounds = plan.bounds(d)
            for r in range(plan.rounds):
                start, stop = bounds[r], bounds[r + 1]
                if stop == start:
                    continue
                v = plan.version("moving", i, r)
                keys.append((i, r))
                users.append(np.full((stop - start) * group, d.user))
                labels.append(d.row_label[start * group : stop * group])
                version.append(np.full((stop - start) * group, v))
                rank_users.append(np.full(stop - start, d.user))
                rank_version.append(np.full(stop - start, v))
        cat = np.concatenate
        return Rows(cat(users), cat(labels), cat(version), cat(rank_users), cat(rank_version), keys)

    def scores(self, steps: dict[tuple[int, int], Step]) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.concatenate([steps[k].pointwise for k in self.keys]),
            np.concatenate([steps[k].ranking for k in self.keys]),
        )

    def metrics(self, scores: tuple[np.ndarray, np.ndarray], version: int | None = None) -> dict:
        rows = slice(None) if version is None else self.version == version
        ranks = slice(None) if version is None else self.rank_version == version
        return evaluate(self.users[rows], self.labels[rows], scores[0][rows], self.rank_users[ranks], scores[1][ranks])

    def bucket(self, scores: tuple[np.ndarray, np.ndarray], users: np.ndarray) -> dict:
        return evaluate_users(self.users, self.labels, scores[0], self.rank_users, scores[1], users)


def pytorch_scores(
    devices: list[Device],
    plan: Plan,
    rows: Rows,
    models: dict[int, Checkpoint],
    recent_len: int,
    group: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The moving fleet scored offline in PyTorch: for each device and round, the parameters its
    version's checkpoint generates in process from the same upload, on the same rows."""
    pointwise: dict[tuple[int, int], np.ndarray] = {}
    ranking: dict[tuple[int, int], np.ndarray] = {}
    for v, ck in models.items():
        keys = [k for k in rows.keys if plan.version("moving", *k) == v]
        if not keys:
            continue
        generator = Generator(ck)
        generated = [generator.generate(devices[i].upload(plan.bounds(devices[i])[r], recent_len)) for i, r in keys]
        params = DeviceParams(
            np.arange(len(keys)), {n: torch.from_numpy(np.stack([g[n] for g in generated])) for n in generated[0]}
        )
        for j, (i, r) in enumerate(keys):
            d, bounds = devices[i], plan.bounds(devices[i])
            start, stop = bounds[r], bounds[r + 1]
            sl = slice(start * group, stop * group)
            pointwise[(i, r)] = score_rows(
                ck.model, d.row_history[sl], d.row_target[sl], np.full(sl.stop - sl.start, j), params
            ).reshape(-1)
            ranking[(i, r)] = score_rows(
                ck.model, d.rank_history[start:stop], d.rank_candidates[start:stop], np.full(stop - start, j), params
            )
    return np.concatenate([pointwise[k] for k in rows.keys]), np.concatenate([ranking[k] for k in rows.keys])


def timings(steps: dict[tuple[int, int], Step], seconds: float, version: int | None = None) -> dict:
    chosen = [s for s in steps.values() if version is None or s.version == version]
    if not chosen:
        return {"refreshes": 0}
    out = {
        "refreshes": len(chosen),
        "retries": int(sum(s.attempts for s in chosen)) - len(chosen),
        "fetch": percentiles([s.fetch_s for s in chosen]),
        "apply": percentiles([s.apply_s for s in chosen]),
    }
    if version is None:
        out |= {"seconds": seconds, "refreshes_per_s": len(chosen) / seconds}
    return out


# ---- the loop -------------------------------------------------------------------------------
def run(cfg: DcclFleetConfig) -> dict:
    torch.set_num_threads(1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    old_dir, new_dir, new_init = checkpoints(cfg)
    models = {1: load_checkpoint(old_dir), 2: load_checkpoint(new_dir)}
    for ck in models.values():
        if ck.task != "movielens":
            raise SystemExit(f"error: {ck.path} is a {ck.task} checkpoint; the DCCL fleet runs recommenders")
    if models[1].protocol != models[2].protocol or models[1].n_items != models[2].n_items:
        raise SystemExit(f"error: {old_dir} and {new_dir} were trained under other protocols or item sets")
    dataset = load_dataset(cfg.data, models[1].protocol)
    if dataset.n_items != models[1].n_items:
        raise SystemExit("error: the checkpoints were trained on other data")
    users = np.sort(
        np.random.default_rng(cfg.seed).choice(
            dataset.device_users, min(cfg.devices, len(dataset.device_users)), replace=False
        )
    )
    devices = devices_of(dataset, users)
    group, recent_len = dataset.config.n_negatives + 1, dataset.config.recent_len
    plan = Plan.of(devices, cfg.rounds, cfg.wave, cfg.seed)
    rows = Rows.of(devices, plan, group)

    work = Path(tempfile.mkdtemp(prefix="dccl-fleet-", dir=cfg.out))
    try:
        print(f"exporting v1 and v2 to {cfg.target} (candidate form: 1 history x 100 candidates)", file=sys.stderr)
        versions: dict[int, Version] = {}
        for v, ck in models.items():
            artifact = compiled(ck, cfg.target, work / f"v{v}")
            size = sum(f.stat().st_size for f in artifact.parent.rglob("*") if f.is_file())
            weight_map = find_weight_map(artifact)
            versions[v] = Version(f"v{v}", ck.path, artifact, weight_map.fingerprint, RankingForm.of(weight_map), size)
        if versions[1].fingerprint == versions[2].fingerprint:
            raise SystemExit("error: v1 and v2 compile to the same artifact (one fingerprint): nothing to move to")
        root_pub = cloud_keys(work)
        steps: dict[str, dict] = {}
        seconds: dict[str, float] = {}
        with ServerProcess.start(
            old_dir,
            [versions[1].artifact],
            "--signing-key",
            work / "online.key",
            "--key-list",
            work / "online.mnkeys",
            "--token",
            TOKEN,
            "--max-batch",
            cfg.max_batch,
            also=[(new_dir, versions[2].artifact)],
            workers=cfg.workers,
        ) as server:
            # A first call of each checkpoint pays one-off costs; keep them out of the latencies.
            warmup = [(v, f"warmup-{i}") for v in versions.values() for i in range(cfg.workers)]
            for v, device_id in warmup:
                fetch_patch(
                    server.url, v.fingerprint, devices[0].upload(0, recent_len), device_id=device_id, token=TOKEN
                )
            for fleet in PASSES:
                steps[fleet], seconds[fleet] = run_fleet(
                    cfg, fleet, devices, plan, versions, server, root_pub, recent_len, group, work
                )
            server_side = server_batches(server)
        for v in versions.values():
            assert wmap.load(v.artifact).fingerprint == v.fingerprint, "the served artifacts stay as exported"
    finally:
        shutil.rmtree(work)

    print("PyTorch cross-check of the moving fleet", file=sys.stderr)
    scores = {fleet: rows.scores(steps[fleet]) for fleet in PASSES}
    reference = pytorch_scores(devices, plan, rows, models, recent_len, group)
    buckets = activity_buckets(dataset)
    moving = steps["moving"]
    moved = sum(1 for s in moving.values() if s.download_bytes)
    patch_bytes = {f"v{v}": int(sum(s.patch_bytes for s in moving.values() if s.version == v)) for v in (1, 2)}
    download = int(sum(s.download_bytes for s in moving.values()))
    return {
        "old": str(old_dir),
        "new": str(new_dir),
        "new_init": str(new_init) if new_init else None,
        "methods": {"v1": models[1].config.method, "v2": models[2].config.method},
        "target": cfg.target,
        "devices": len(devices),
        "positives": int(sum(d.positives for d in devices)),
        "rounds": cfg.rounds,
        "wave": cfg.wave,
        "on_v2_by_round": plan.on_v2(),
        "moved_devices": moved,
        "workers": cfg.workers,
        "concurrency": cfg.concurrency,
        "max_batch": cfg.max_batch,
        "artifacts": {v.name: {"fingerprint": v.fingerprint, "bytes": v.bytes} for v in versions.values()},
        "online": {fleet: rows.metrics(scores[fleet]) for fleet in PASSES},
        "by_version": {
            f"v{v}": {
                "positives": int((rows.rank_version == v).sum()),
                **{fleet: rows.metrics(scores[fleet], v) for fleet in PASSES},
            }
            for v in (1, 2)
        },
        "buckets": {
            name: {
                "users": int(np.isin(users, buckets[name]).sum()),
                **{fleet: rows.bucket(scores[fleet], buckets[name]) for fleet in PASSES},
            }
            for name in BUCKETS
        },
        "pytorch_moving": rows.metrics(reference),
        "requests": {
            fleet: {f"v{v}": sum(1 for s in steps[fleet].values() if s.version == v) for v in (1, 2)}
            for fleet in PASSES
        },
        "bytes": {
            "download_per_device": versions[2].bytes,
            "downloads": download,
            "patches": patch_bytes,
            "total": download + sum(patch_bytes.values()),
        },
        "timings": {
            fleet: {
                "all": timings(steps[fleet], seconds[fleet]),
                **{f"v{v}": timings(steps[fleet], seconds[fleet], v) for v in (1, 2)},
            }
            for fleet in PASSES
        },
        "server": {
            **{k: v for k, v in server_side.items() if k != "by_fingerprint"},
            "warmup_patches": len(warmup),
            # the server's own count per version (mntool_patches_total by fingerprint), beside `requests`
            "patches_by_version": {
                v.name: server_side["by_fingerprint"].get(v.fingerprint, 0.0) for v in versions.values()
            },
        },
    }


def report(r: dict) -> str:
    waves = ", ".join(f"{share:.0%}" for share in r["on_v2_by_round"])
    lines = [
        f"v1 {r['old']} ({r['methods']['v1']}) -> v2 {r['new']} ({r['methods']['v2']}"
        + (f" on {r['new_init']}" if r["new_init"] else "")
        + f"), {r['target']} artifacts",
        f"{r['devices']} devices, {r['positives']} test interactions, {r['rounds']} rounds; on v2 by round: {waves}; "
        f"server: {r['workers']} worker(s), max batch {r['max_batch']}, {r['concurrency']} devices at a time",
        "",
        f"{'rows (compiled, scored on device)':34s} {'positives':>9s}  {'moving':>15s}  {'all v1':>15s}  {'all v2':>15s}",
        f"{'':34s} {'':>9s}  {'uauc  ndcg@10':>15s}  {'uauc  ndcg@10':>15s}  {'uauc  ndcg@10':>15s}",
    ]

    def cells(m: dict) -> str:
        return "  ".join(
            f"{m[f]['uauc']:.4f} {m[f]['ndcg@10']:.4f}" if m[f]["uauc"] is not None else f"{'-':>15s}" for f in PASSES
        )

    lines.append(f"{'all rows':34s} {r['positives']:9d}  {cells(r['online'])}")
    for v in ("v1", "v2"):
        m = r["by_version"][v]
        lines.append(f"{'rows the moving fleet scored on ' + v:34s} {m['positives']:9d}  {cells(m)}")
    for name, m in r["buckets"].items():
        lines.append(f"{name + ' users (' + str(m['users']) + ')':34s} {'':9s}  {cells(m)}")
    p = r["pytorch_moving"]
    lines.append(f"{'PyTorch offline, moving fleet':34s} {'':9s}  {p['uauc']:.4f} {p['ndcg@10']:.4f}")
    lines.append("")
    for fleet in PASSES:
        req, t = r["requests"][fleet], r["timings"][fleet]["all"]
        lines.append(
            f"{fleet.replace('_', ' ')}: patches for v1 {req['v1']}, v2 {req['v2']} in {t['seconds']:.1f} s "
            f"({t['refreshes_per_s']:.0f}/s, {t['retries']} retries); fetch p50 {t['fetch']['p50_ms']:.1f} ms "
            f"p99 {t['fetch']['p99_ms']:.1f} ms; verify+apply+reload p50 {t['apply']['p50_ms']:.1f} ms "
            f"p99 {t['apply']['p99_ms']:.1f} ms"
        )
    b = r["bytes"]
    lines.append(
        f"moving fleet: {r['moved_devices']} devices downloaded v2 ({b['download_per_device']:,} B each: "
        f"{b['downloads']:,} B); patches v1 {b['patches']['v1']:,} B, v2 {b['patches']['v2']:,} B; "
        f"total {b['total']:,} B"
    )
    s = r["server"]
    lines.append(
        f"server (all three fleets, {s['warmup_patches']} warm-up requests included): {s['patches']:.0f} patches "
        f"(v1 {s['patches_by_version']['v1']:.0f}, v2 {s['patches_by_version']['v2']:.0f}) "
        f"in {s['batches']:.0f} generator calls (mean batch {s['mean_batch']:.2f})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, help="v1 checkpoint [default: OUT/v1, metapatch, trained if missing]")
    parser.add_argument(
        "--new",
        type=Path,
        help="v2 checkpoint [default: OUT/v2, metapatch on MoMoDistill of --old, trained if missing]",
    )
    parser.add_argument("--data", type=Path, help="MovieLens-100k directory [default: the fetched cache]")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/dccl-fleet"), help="working directory and dccl_fleet.json"
    )
    parser.add_argument("--devices", type=int, default=DcclFleetConfig.devices)
    parser.add_argument("--target", choices=["onnx", "tflite"], default=DcclFleetConfig.target)
    parser.add_argument("--rounds", type=int, default=DcclFleetConfig.rounds, help="refreshes per device")
    parser.add_argument(
        "--wave", type=float, default=DcclFleetConfig.wave, help="share of the fleet moving to v2 before each round"
    )
    parser.add_argument("--workers", type=int, default=DcclFleetConfig.workers, help="server worker processes")
    parser.add_argument("--concurrency", type=int, default=DcclFleetConfig.concurrency, help="devices at a time")
    parser.add_argument("--max-batch", type=int, default=DcclFleetConfig.max_batch, help="the server's --max-batch")
    parser.add_argument("--epochs", type=int, help="when training here [default: early stopping]")
    parser.add_argument(
        "--history-len", type=int, default=DcclFleetConfig.history_len, help="when training here: device window"
    )
    parser.add_argument("--seed", type=int, default=DcclFleetConfig.seed)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    a = parser.parse_args()
    cfg = DcclFleetConfig(
        a.old,
        a.new,
        a.data,
        a.out,
        a.devices,
        a.target,
        a.rounds,
        a.wave,
        a.workers,
        a.concurrency,
        a.max_batch,
        a.epochs,
        a.history_len,
        a.seed,
    )
    result = run(cfg)
    (cfg.out / "dccl_fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if a.json else report(result))


if __name__ == "__main__":
    main()
