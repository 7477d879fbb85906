"""A simulated fleet: MovieLens-100k users as devices that refresh their compiled model from
`mntool serve` and score their own next interactions with it.

Each device holds its own copy of the compiled artifact (ONNX Runtime or LiteRT). Over its test
period it uploads its latest R items (at the test request time, then again after every K of its
test interactions, so an upload never holds an interaction it is about to be scored on), receives
a patch signed by the server's online key, verifies it with the root key alone (the patch carries
the root-signed key list), checks it is fresh, for this device and newer than the last, applies it
(`device_runtime.client.refresh`: A/B slots) and scores the next K
interactions (pointwise rows and 100-candidate ranking tasks) with the patched model. The same
rows are scored by the compiled static model, and by the metanetwork artifact as shipped
(unpatched); PyTorch's offline evaluation of the same devices is the cross-check. Prints online
UAUC/NDCG@10 per model and the server's throughput and latency during the run.

    .venv/bin/python examples/fleet.py --ckpt runs/sasrec-mn --data ../shared/data/ml-100k
    .venv/bin/python examples/fleet.py --devices 50 --json   # trains runs/fleet/sasrec-mn first (minutes)
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
from tqdm import tqdm

from device_runtime import ranking
from device_runtime.client import refresh
from device_runtime.ranking import RankingForm
from device_runtime.runners import Runner, RunnerConfig, find_weight_map, open_runner
from exporters import export
from mntool.data import DeviceDataset
from mntool.data.datasets import load_dataset
from mntool.metrics import evaluate
from mntool.patches import certify_keys, keygen, load_signing_key, raw_public_key
from mntool.serve import ServerProcess
from mntool.train import Checkpoint, device_params_for, evaluate_split, load_checkpoint

TOKEN = "fleet-token"


@dataclass
class FleetConfig:
    ckpt: Path | None  # metanetwork checkpoint; None: out/sasrec-mn, trained there first if missing
    static_ckpt: Path | None  # static baseline; None: the metanetwork checkpoint's init, if found
    data: Path | None  # MovieLens-100k files; None: the fetched cache
    out: Path
    devices: int = 200
    target: str = "onnx"  # onnx (ONNX Runtime) or tflite (LiteRT)
    refresh_every: int = 10  # K: re-upload after every K test interactions (the protocol's cloud cadence)
    workers: int = 2  # server worker processes
    concurrency: int = 8  # devices simulated at once (threads)
    epochs: int | None = None  # when training the checkpoint here (None: mntool train's default, early stopping)
    history_len: int = 10  # when training it here: clicks the device model reads (the upload stays 30)
    seed: int = 0


# ---- one device's test period ---------------------------------------------------------------
@dataclass
class Device:
    """One user's test period in time order: P positives, 1 + n_negatives pointwise rows each."""

    user: int
    request: np.ndarray  # (R,) the upload at the test request time
    rank_history: np.ndarray  # (P, L)
    rank_candidates: np.ndarray  # (P, 100)
    row_history: np.ndarray  # (P * G, L)
    row_target: np.ndarray  # (P * G,)
    row_label: np.ndarray  # (P * G,)

    @property
    def positives(self) -> int:
        return len(self.rank_history)

    def upload(self, start: int, recent_len: int) -> list[int]:
        """What the device uploads before scoring its positive `start`: its latest R items, all
        strictly earlier than that positive (a history row holds only the past)."""
        items = self.request if start == 0 else self.rank_history[start][-recent_len:]
        return [int(i) for i in items if i != 0]


def devices_of(dataset: DeviceDataset, users: np.ndarray) -> list[Device]:
    group = dataset.config.n_negatives + 1
    request = dict(zip(dataset.device_users.tolist(), dataset.test_request))
    out = []
    for user in users:
        rank = dataset.test_rank.for_users([user])
        rows = dataset.test.for_users([user])
        assert len(rows) == group * len(rank), "pointwise rows must come in positive + negatives groups"
        out.append(
            Device(int(user), request[int(user)], rank.history, rank.candidates, rows.history, rows.target, rows.label)
        )
    return out


def score_device(
    runner: Runner, form: RankingForm, device: Device, start: int, stop: int, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """(pointwise scores, ranking scores (n, 100)) for positives [start, stop), through an artifact
    of ranking form `form` (each pointwise group, which shares one history, as a short request)."""
    rows = slice(start * group, stop * group)
    history = device.row_history[rows][::group]
    pointwise = ranking.score(runner, form, history, device.row_target[rows].reshape(-1, group)).reshape(-1)
    return pointwise, ranking.score(runner, form, device.rank_history[start:stop], device.rank_candidates[start:stop])


@dataclass
class Scores:
    """Scores of every device's rows, concatenated in device order, and refresh timings."""

    pointwise: list[np.ndarray] = field(default_factory=list)
    ranking: list[np.ndarray] = field(default_factory=list)
    fetch_s: list[float] = field(default_factory=list)
    apply_s: list[float] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)

    def metrics(self, devices: list[Device], group: int) -> dict:
        users = np.concatenate([np.full(d.positives * group, d.user) for d in devices])
        labels = np.concatenate([d.row_label for d in devices])
        rank_users = np.concatenate([np.full(d.positives, d.user) for d in devices])
        return evaluate(users, labels, np.concatenate(self.pointwise), rank_users, np.concatenate(self.ranking))


def run_static(artifact: Path, devices: list[Device], group: int, desc: str) -> Scores:
    """One shared compiled model for every device (no patch)."""
    scores = Scores()
    weight_map = find_weight_map(artifact)
    form = RankingForm.of(weight_map)
    with open_runner(artifact, weight_map=weight_map, config=RunnerConfig(threads=1)) as runner:
        for d in tqdm(devices, desc=desc, leave=False):
            p, r = score_device(runner, form, d, 0, d.positives, group)
            scores.pointwise.append(p)
            scores.ranking.append(r)
    return scores


def run_refreshing(
    cfg: FleetConfig,
    artifact: Path,
    devices: list[Device],
    every: int | None,
    server: ServerProcess,
    root_pub: Path,
    recent_len: int,
    group: int,
    work: Path,
    desc: str,
) -> tuple[Scores, float]:
    """Every device refreshes its own artifact copy from the server (once, or every `every`
    positives) and scores the positives that follow each refresh with the patched model."""
    form = RankingForm.of(find_weight_map(artifact))

    def simulate(device: Device) -> tuple[list, list, list[tuple[float, float, int]]]:
        home = work / f"{desc}-{device.user}"
        shutil.copytree(artifact.parent, home)
        local = home / artifact.name
        pointwise, ranking, timings = [], [], []
        step = every or device.positives
        try:
            for start in range(0, device.positives, step):
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
                    p, r = score_device(runner, form, device, start, min(start + step, device.positives), group)
                pointwise.append(p)
                ranking.append(r)
                timings.append((done.fetch_seconds, done.apply_seconds, done.attempts))
        finally:
            shutil.rmtree(home)
        return pointwise, ranking, timings

    scores = Scores()
    started = time.perf_counter()
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        for pointwise, ranking, timings in tqdm(
            pool.map(simulate, devices), total=len(devices), desc=desc, leave=False
        ):
            scores.pointwise += pointwise
            scores.ranking += ranking
            for fetch, apply, attempts in timings:
                scores.fetch_s.append(fetch)
                scores.apply_s.append(apply)
                scores.attempts.append(attempts)
    return scores, time.perf_counter() - started


# ---- setup ----------------------------------------------------------------------------------
def checkpoints(cfg: FleetConfig) -> tuple[Path, Path | None]:
    ckpt = cfg.ckpt
    if ckpt is None and (cfg.out / "sasrec-mn" / "config.json").is_file():
        ckpt = cfg.out / "sasrec-mn"
        print(f"using the checkpoint trained by an earlier run: {ckpt}", file=sys.stderr)
    elif ckpt is None:
        ckpt = cfg.out / "sasrec-mn"
        print(
            f"training a SASRec metanetwork checkpoint reading {cfg.history_len} clicks into {ckpt} (static first)",
            file=sys.stderr,
        )
        extra = (["--data", str(cfg.data)] if cfg.data else []) + (["--epochs", str(cfg.epochs)] if cfg.epochs else [])
        # frozen backbone: the fleet patches a deployed static model, which stays what an unpatched device runs
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mntool.cli.main",
                "train",
                "--model",
                "sasrec",
                "--method",
                "metanetwork",
                "--frozen-backbone",
                "--history-len",
                str(cfg.history_len),
                "--out",
                str(ckpt),
                "--quiet",
                *extra,
            ],
            check=True,
        )
    static = cfg.static_ckpt
    if static is None:
        init = json.loads((ckpt / "metrics.json").read_text()).get("init")
        static = next((Path(p) for p in (init, ckpt / "static") if p and (Path(p) / "config.json").is_file()), None)
    return ckpt, static


def compiled(ckpt: Checkpoint, target: str, out: Path) -> Path:
    """The device artifact: candidate form, one ranking request of 100 candidates per call."""
    example, form = ckpt.export_inputs()
    return export(ckpt.model, example, ckpt.adaptive, target, out, output_names=("logits",), form=form)


def percentiles(values: list[float]) -> dict:
    ms = np.asarray(values) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def server_batches(server: ServerProcess) -> dict:
    """Requests, patches by fingerprint and batches over every worker: one /metrics scrape sees them all."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/metrics") as r:
        text = r.read().decode()

    def total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    batches = total(r"^mntool_batch_size_count(?:\{[^}]*\})? (\S+)$")
    return {
        "patches": total(r'^mntool_requests_total\{[^}]*endpoint="/v1/patches",status="200"\} (\S+)$'),
        "batches": batches,
        "mean_batch": total(r"^mntool_batch_size_sum(?:\{[^}]*\})? (\S+)$") / max(batches, 1),
        "by_fingerprint": {
            fp: float(n)
            for fp, n in re.findall(r'^mntool_patches_total\{fingerprint="([0-9a-f]+)"\} (\S+)$', text, re.M)
        },
    }


def cloud_keys(work: Path) -> Path:
    """The keys a deployment has: a root pair (its .pub ships in the app), an online pair that signs
    patches on the server, and the root-signed key list certifying the online key. Returns the root .pub."""
    root, online = keygen(work / "root"), keygen(work / "online")
    key_list = certify_keys(
        load_signing_key(root.private), [raw_public_key(load_signing_key(online.private))], serial=1
    )
    (work / "online.mnkeys").write_bytes(key_list)
    return root.public


def run(cfg: FleetConfig) -> dict:
    torch.set_num_threads(1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt_dir, static_dir = checkpoints(cfg)
    meta = load_checkpoint(ckpt_dir)
    assert meta.config.method == "metanetwork", f"{ckpt_dir} is a {meta.config.method} checkpoint, not metanetwork"
    dataset = load_dataset(cfg.data, meta.protocol)
    assert dataset.n_items == meta.n_items, "the checkpoint was trained on other data"
    users = np.sort(
        np.random.default_rng(cfg.seed).choice(
            dataset.device_users, min(cfg.devices, len(dataset.device_users)), replace=False
        )
    )
    devices = devices_of(dataset, users)
    group, recent_len = dataset.config.n_negatives + 1, dataset.config.recent_len

    work = Path(tempfile.mkdtemp(prefix="fleet-", dir=cfg.out))
    try:
        print(
            f"exporting {cfg.target} artifacts (candidate form: 1 history x 100 candidates per call)", file=sys.stderr
        )
        artifact = compiled(meta, cfg.target, work / "metanetwork")
        static_artifact = compiled(load_checkpoint(static_dir), cfg.target, work / "static") if static_dir else None
        root_pub = cloud_keys(work)
        results, timings = {}, {}
        if static_artifact is not None:
            results["static"] = run_static(static_artifact, devices, group, "static").metrics(devices, group)
        results["unpatched"] = run_static(artifact, devices, group, "unpatched").metrics(devices, group)
        with ServerProcess.start(
            ckpt_dir,
            [artifact],
            "--signing-key",
            work / "online.key",
            "--key-list",
            work / "online.mnkeys",
            "--token",
            TOKEN,
            workers=cfg.workers,
        ) as server:
            for name, every in (("refreshed_once", None), (f"refreshed_every_{cfg.refresh_every}", cfg.refresh_every)):
                scores, seconds = run_refreshing(
                    cfg, artifact, devices, every, server, root_pub, recent_len, group, work, name
                )
                results[name] = scores.metrics(devices, group)
                timings[name] = {
                    "refreshes": len(scores.fetch_s),
                    "seconds": seconds,
                    "refreshes_per_s": len(scores.fetch_s) / seconds,
                    "retries": int(sum(scores.attempts)) - len(scores.attempts),
                    "fetch": percentiles(scores.fetch_s),
                    "apply": percentiles(scores.apply_s),
                }
            server_side = server_batches(server)
    finally:
        shutil.rmtree(work)

    fleet = dataset.for_users(users)
    reference = evaluate_split(
        meta.model, fleet, "test", device_params_for(meta.model, "metanetwork", fleet, "test", meta.config, meta.meta)
    )
    return {
        "checkpoint": str(ckpt_dir),
        "static_checkpoint": str(static_dir) if static_dir else None,
        "target": cfg.target,
        "devices": len(devices),
        "positives": int(sum(d.positives for d in devices)),
        "refresh_every": cfg.refresh_every,
        "workers": cfg.workers,
        "concurrency": cfg.concurrency,
        "online": results,
        "pytorch_refreshed_once": reference,
        "refresh_timings": timings,
        "server": server_side,
    }


def report(r: dict) -> str:
    lines = [
        f"{r['devices']} devices, {r['positives']} test interactions, {r['target']} artifacts, "
        f"server: {r['workers']} workers, {r['concurrency']} devices at a time",
        f"{'model (compiled, scored on device)':40s} {'uauc':>7s} {'ndcg@10':>8s} {'auc':>7s} {'hr@10':>7s}",
    ]
    rows = [(name.replace("_", " "), m) for name, m in r["online"].items()] + [
        ("pytorch offline (refreshed once)", r["pytorch_refreshed_once"])
    ]
    lines += [f"{name:40s} {m['uauc']:7.4f} {m['ndcg@10']:8.4f} {m['auc']:7.4f} {m['hr@10']:7.4f}" for name, m in rows]
    for name, t in r["refresh_timings"].items():
        lines.append(
            f"{name.replace('_', ' ')}: {t['refreshes']} refreshes in {t['seconds']:.1f} s ({t['refreshes_per_s']:.0f}/s, "
            f"{t['retries']} retries); fetch p50 {t['fetch']['p50_ms']:.1f} ms p99 {t['fetch']['p99_ms']:.1f} ms; "
            f"verify+apply+reload p50 {t['apply']['p50_ms']:.1f} ms p99 {t['apply']['p99_ms']:.1f} ms"
        )
    s = r["server"]
    lines.append(
        f"server: {s['patches']:.0f} patches in {s['batches']:.0f} generator calls (mean batch {s['mean_batch']:.2f})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="metanetwork checkpoint [default: OUT/sasrec-mn, trained if missing]")
    parser.add_argument("--static-ckpt", type=Path, help="static baseline [default: the checkpoint's init, if found]")
    parser.add_argument("--data", type=Path, help="MovieLens-100k directory [default: the fetched cache]")
    parser.add_argument("--out", type=Path, default=Path("runs/fleet"), help="working directory and fleet.json")
    parser.add_argument("--devices", type=int, default=FleetConfig.devices)
    parser.add_argument("--target", choices=["onnx", "tflite"], default=FleetConfig.target)
    parser.add_argument("--refresh-every", type=int, default=FleetConfig.refresh_every)
    parser.add_argument("--workers", type=int, default=FleetConfig.workers)
    parser.add_argument("--concurrency", type=int, default=FleetConfig.concurrency)
    parser.add_argument(
        "--epochs", type=int, default=FleetConfig.epochs, help="when training here [default: early stopping]"
    )
    parser.add_argument(
        "--history-len", type=int, default=FleetConfig.history_len, help="when training here: device window"
    )
    parser.add_argument("--seed", type=int, default=FleetConfig.seed)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    a = parser.parse_args()
    cfg = FleetConfig(
        a.ckpt,
        a.static_ckpt,
        a.data,
        a.out,
        a.devices,
        a.target,
        a.refresh_every,
        a.workers,
        a.concurrency,
        a.epochs,
        a.history_len,
        a.seed,
    )
    result = run(cfg)
    (cfg.out / "fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if a.json else report(result))


if __name__ == "__main__":
    main()
