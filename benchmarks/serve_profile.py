"""Where a batched patch request's time goes in `mntool serve`, in one run: the figures of
docs/serving.md "Where the time goes".

1. A real `mntool serve` (one worker, signed patches) under `--clients` closed-loop keep-alive
   clients (benchmarks/load_test.py's): server CPU per request from /proc, split into the
   event-loop thread (HTTP, parsing, batching, responses, metrics) and the batch thread
   (generation and patches), for valid POST /v1/patches, for POSTs refused before their body is
   parsed (415: the HTTP stack and the patch route alone) and for GET /healthz (through Starlette).
2. In this process, one torch thread, the best of `--repeats` timed loops: parsing and checking
   an upload (`PatchService.parse`: JSON and validation), the generator per call and per device
   at batch 1, at the mean batch the server ran and at `--batch`, and `build_patch` per patch
   split into checks and cast (`stored_tensors`), packing (unsigned `build_patch` minus the
   checks) and the Ed25519 signature (signed minus unsigned `build_patch`).

    .venv/bin/python benchmarks/serve_profile.py --ckpt runs/sasrec-mn
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import MNTOOL, ROOT, batch_stats, closed_loop, patch_body  # noqa: E402

from mntool.patches import build_patch, load_signing_key, stored_tensors  # noqa: E402
from mntool.serve import PatchService, ServeConfig, ServerProcess, routes  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def timed(fn, loops: int, repeats: int) -> float:
    """Best over `repeats` of the mean seconds per call over `loops` calls (the least disturbed
    by other processes on shared cores)."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(loops):
            fn()
        runs.append((time.perf_counter() - started) / loops)
    return min(runs)


def in_process(args, artifact: Path, key: Path, served_batch: int) -> dict:
    torch.set_num_threads(1)
    service = PatchService.load(ServeConfig(str(args.ckpt), [str(artifact)], signing_key=str(key)))
    gen, wm = service.generator, next(iter(service.artifacts.values())).weight_map
    rng = np.random.default_rng(0)
    bodies = [patch_body(rng, wm.fingerprint, gen.n_items, gen.recent_len, i) for i in range(64)]
    parse = timed(lambda: [service.parse(b) for b in bodies], 20, args.repeats) / len(bodies)
    recent = np.asarray([service.parse(b).recent for b in bodies])
    batch = np.resize(recent, (args.batch, gen.recent_len))
    one = timed(lambda: gen.generate_batch(recent[:1]), 100, args.repeats)
    many = timed(lambda: gen.generate_batch(batch), 10, args.repeats)
    served = timed(lambda: gen.generate_batch(batch[:served_batch]), 20, args.repeats)
    params = {n: p[0] for n, p in gen.generate_batch(recent[:1]).items()}
    signing_key = load_signing_key(key)
    checks = timed(lambda: stored_tensors(wm, params), 500, args.repeats)
    unsigned = timed(lambda: build_patch(wm, params), 500, args.repeats)
    signed = timed(lambda: build_patch(wm, params, signing_key), 500, args.repeats)
    jobs = [service.parse(b) for b in bodies][:served_batch]
    build_patches = timed(lambda: service.build_patches(jobs), 10, args.repeats) / len(jobs)
    return {
        "parse_us": parse * 1e6,
        "generate_batch1_ms": one * 1e3,
        f"generate_batch{args.batch}_ms": many * 1e3,
        "generate_per_device_batch1_us": one * 1e6,
        f"generate_per_device_batch{args.batch}_us": many / args.batch * 1e6,
        "served_batch": served_batch,
        "generate_per_device_served_batch_us": served / served_batch * 1e6,
        "checks_and_cast_us": checks * 1e6,
        "packing_us": (unsigned - checks) * 1e6,
        "signature_us": (signed - unsigned) * 1e6,
        "build_patch_us": signed * 1e6,
        "build_patches_per_job_served_batch_us": build_patches * 1e6,
        "patch_bytes": len(build_patch(wm, params, signing_key)),
    }


def thread_cpu(pid: int) -> tuple[float, float]:
    """(main thread, other threads) CPU seconds of process `pid`."""
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        if int(task.name) == pid:
            main += seconds
        else:
            other += seconds
    return main, other


async def server_cpu(args, artifact: Path, key: Path, fingerprint: str, n_items: int, recent_len: int) -> dict:
    rng = np.random.default_rng(1)
    headers = {"Content-Type": "application/json"}
    patches = [
        ("POST", routes.PATCHES, patch_body(rng, fingerprint, n_items, recent_len, i), headers) for i in range(512)
    ]
    refused = [("POST", routes.PATCHES, patches[0][2], {"Content-Type": "text/plain"})]
    health = [("GET", routes.HEALTHZ, b"", {})]
    server = ServerProcess.start(args.ckpt, [artifact], "--signing-key", key, workers=1)
    out = {}
    try:
        await closed_loop(server, patches, args.clients, 300, 30.0)  # warm-up
        for name, requests, status in (("patch", patches, 200), ("refused", refused, 415), ("healthz", health, 200)):
            batches = await batch_stats(server)
            before = thread_cpu(server.proc.pid)
            latencies, statuses, seconds = await closed_loop(server, requests, args.clients, args.requests, 60.0)
            after = thread_cpu(server.proc.pid)
            batches = [b - a for a, b in zip(batches, await batch_stats(server))]
            assert set(statuses) == {status}, f"{name}: statuses {set(statuses)}"
            n = len(statuses)
            out[name] = {
                "requests": n,
                "per_s": n / seconds,
                "event_loop_us": (after[0] - before[0]) / n * 1e6,
                "batch_thread_us": (after[1] - before[1]) / n * 1e6,
                "mean_batch": batches[1] / batches[0] if batches[0] else None,
            }
    finally:
        server.stop()
    return out


def report(r: dict, batch: int, clients: int) -> str:
    p, s, refused, h = r["in_process"], r["server"]["patch"], r["server"]["refused"], r["server"]["healthz"]
    total = s["event_loop_us"] + s["batch_thread_us"]
    http = refused["event_loop_us"]
    rest = s["event_loop_us"] - http - p["parse_us"]
    gen = p["generate_per_device_served_batch_us"]
    alone = p["build_patches_per_job_served_batch_us"]
    share = lambda us: f"{us:6.0f} us {us / total:4.0%}"  # noqa: E731
    return "\n".join(
        [
            f"server CPU per patch at {clients} clients, 1 worker, signed patches: {total:.0f} us ({s['per_s']:.0f} patches/s, "
            f"mean batch {s['mean_batch']:.1f})",
            f"  event-loop thread                                  {share(s['event_loop_us'])}",
            f"    HTTP stack + patch route (POST answered 415)     {share(http)}",
            f"    JSON parsing + checks (PatchService.parse)       {share(p['parse_us'])}",
            f"    the rest (batcher, sending the patch, metrics)  {share(rest)}",
            f"  batch thread                                       {share(s['batch_thread_us'])}",
            f"    generation per device at batch {p['served_batch']:<3d}               {share(gen)}",
            f"    build_patch: checks and cast                     {share(p['checks_and_cast_us'])}",
            f"                 packing                             {share(p['packing_us'])}",
            f"                 Ed25519 signature                   {share(p['signature_us'])}",
            f"    PatchService.build_patches alone, per job        {share(alone)}",
            f"    the rest (in the server, beside the event loop)  {share(s['batch_thread_us'] - alone)}",
            f"GET /healthz through Starlette: {h['event_loop_us']:.0f} us per request ({h['per_s']:.0f}/s)",
            f"generator: batch 1 {p['generate_batch1_ms']:.2f} ms per call; batch {batch} {p[f'generate_batch{batch}_ms']:.2f} ms "
            f"per call = {p[f'generate_per_device_batch{batch}_us']:.0f} us per device; patch {p['patch_bytes']} B",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory (mntool train --out)")
    parser.add_argument("--artifact", type=Path, help="artifact to serve [default: ONNX export of --ckpt]")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the in-process generator timing")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=5000, help="requests per server measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mntool-profile-") as tmp:
        tmp = Path(tmp)
        subprocess.run([*MNTOOL, "keygen", "-o", str(tmp / "cloud")], cwd=ROOT, check=True, capture_output=True)
        key = tmp / "cloud.key"
        artifact = args.artifact
        if artifact is None:
            subprocess.run(
                [*MNTOOL, "export", str(args.ckpt), "--target", "onnx", "--out", str(tmp / "artifacts"), "--quiet"],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            artifact = tmp / "artifacts" / "model.onnx"
        fingerprint = json.loads(Path(f"{artifact}.weightmap.json").read_text())["fingerprint"]
        config = json.loads((args.ckpt / "config.json").read_text())
        result = {
            "server": asyncio.run(
                server_cpu(args, artifact, key, fingerprint, config["n_items"], config["protocol"]["recent_len"])
            )
        }
        result["in_process"] = in_process(args, artifact, key, round(result["server"]["patch"]["mean_batch"]))
    result["load_average"] = os.getloadavg()
    print(json.dumps(result, indent=2) if args.json else report(result, args.batch, args.clients))
    print(f"load average at the end (other processes included): {result['load_average'][0]:.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
